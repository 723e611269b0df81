"""
CPU benchmark: one fp32 training step of mixln's CPU backend (./train) against PyTorch eager.

What it measures
    The wall time of one full training step -- forward, backward (with the loss), gradient norm
    and AdamW update -- for the same Mix-LN LLaMA (same L, C, heads, F, V, T, alpha), the same
    batch B and the same number of threads, in
      * the engine:  ./train, which times each step itself and writes it as "ms" in log.jsonl;
      * PyTorch:     `dev/reference.py bench`, the independent fp32 reference run eagerly
                     (torch.optim.AdamW), which times each step with time.perf_counter().
    Both run 2 untimed warm-up steps first (allocator, first touch of the AdamW state); the
    number reported for each is the median over the timed steps (pooled over --repeats), and
    tokens/s is B*T divided by that median. The ratio is engine speed / PyTorch speed, so > 1
    means the engine is faster.

How
    * the engine reads a temporary llm.c token shard of random tokens (256 int32 header
      [20240520, 1, ntok, 0...], then uint16 tokens; uint32 [20240801, 7, ...] if V > 65536)
      with exactly enough tokens for warm-up + timed steps, and writes log.jsonl and its final
      checkpoint to a temporary directory that is deleted afterwards (the checkpoint write is
      outside the timed steps);
    * threads: ./train gets OMP_NUM_THREADS=K; the reference gets --threads K
      (torch.set_num_threads) and OMP_NUM_THREADS=K and OPENBLAS_NUM_THREADS=K, because the
      Debian torch does its matrix products in OpenBLAS (pthreads build), whose pool
      torch.set_num_threads does not size. K defaults to every core this process may run on.
      That torch then has two pools of K threads (OpenMP for its own kernels, OpenBLAS for
      matrix products) whose idle threads busy-wait; with K = all cores they can starve each
      other, and a step can take 10-20x longer (seen on 2 cores: 0.3 s -> 6 s per step, steps
      varying wildly). --torch-intraop-threads 1 keeps OpenBLAS at K threads but runs torch's
      own kernels on the calling thread (what this torch does by default: its
      torch.get_num_threads() is 1 here), so that no more than K threads are ever busy.
    * OpenBLAS tuning variables: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, when set in the
      environment, are passed on as they are unless --unset-openblas-env is given, which removes
      them for the PyTorch side (./train does not link OpenBLAS, so they cannot affect it).
      Forcing a core type that is not the CPU's can make OpenBLAS much slower, so a fair
      comparison should also be run with --unset-openblas-env. The table says which was used.
    * glibc malloc: torch frees and reallocates its large tensors every step; glibc serves big
      blocks with mmap (threshold adapting from 128 KiB up to 32 MiB) and trims the heap top, so
      the freed memory goes back to the kernel and PyTorch pays for page faults again each step
      (llama-71m, 2 cores: about 3 million minor faults and more system than user time per run).
      --torch-malloc-tuning sets MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ and
      MALLOC_TOP_PAD_ for the PyTorch side so that freed memory stays in the heap. ./train
      allocates its parameters, AdamW state and activations once before the first step (only
      small GEMM packing buffers per call; the same settings do not change its step time), so it
      is left as is.
    * with --repeats R the engine and PyTorch runs alternate R times (engine, torch, engine,
      ...), so slow drift of a shared machine hits both alike.

Configs: `small` (default; quick on 2 cores) and `llama-71m` (the paper's 71M model);
--batch, --seq-len, --steps and --threads override them.

    python3 dev/bench_cpu.py                                  # small config, environment as is
    python3 dev/bench_cpu.py --config llama-71m --unset-openblas-env
    # PyTorch at its best on this stack: no core-type override, no oversubscription, no refaulting
    python3 dev/bench_cpu.py --unset-openblas-env --torch-intraop-threads 1 --torch-malloc-tuning
"""

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from array import array

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "dev", "reference.py")
WARMUP = 2        # untimed steps before the timed ones, on both sides (reference.py bench skips 2 too)
ALPHA = 0.25      # Mix-LN: floor(alpha * L) leading Post-LN layers
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
# --torch-malloc-tuning: keep freed memory in glibc's heap (no mmap for big blocks, no trimming)
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "17179869184",
                 "MALLOC_TOP_PAD_": "1073741824"}

CONFIGS = {
    # name: model sizes, then the default batch and number of timed steps
    "small": dict(layers=4, dim=256, heads=4, ffn=688, vocab=8192, seq_len=128, batch=8, steps=10),
    "llama-71m": dict(layers=12, dim=512, heads=8, ffn=1368, vocab=32000, seq_len=256, batch=2, steps=5),
}


def die(msg):
    print(f"bench_cpu: error: {msg}", file=sys.stderr)
    sys.exit(1)


def log(msg):
    print(f"bench_cpu: {msg}", file=sys.stderr, flush=True)


def default_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_shard(path, ntok, vocab, seed=0):
    """An llm.c token shard of ntok random ids in [0, vocab)."""
    rng = random.Random(seed)
    uint32 = vocab > 65536
    magic, version, code = (20240801, 7, "I") if uint32 else (20240520, 1, "H")
    tokens = array(code, (rng.randrange(vocab) for _ in range(ntok)))
    if tokens.itemsize != (4 if uint32 else 2):
        die(f"array('{code}') has item size {tokens.itemsize} on this platform")
    if sys.byteorder != "little":
        tokens.byteswap()
    header = [magic, version, ntok] + [0] * 253
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", *header))
        f.write(tokens.tobytes())


def tail(text, n=20):
    return "\n".join(text.strip().splitlines()[-n:])


def run_engine(train, cfg, B, T, steps, threads, workdir, timeout):
    """-> (list of timed-step ms, parameters in millions or None, threads ./train reported)."""
    total = WARMUP + steps
    shard = os.path.join(workdir, "bench_train.bin")
    if not os.path.exists(shard):
        write_shard(shard, total * B * T + 1, cfg["vocab"])
    out = os.path.join(workdir, "engine_out")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [train, "--device", "cpu",
           "--layers", str(cfg["layers"]), "--dim", str(cfg["dim"]), "--heads", str(cfg["heads"]),
           "--ffn", str(cfg["ffn"]), "--vocab", str(cfg["vocab"]), "--seq-len", str(T),
           "--batch", str(B), "--steps", str(total), "--train-data", shard, "--out", out,
           "--norm", "mix", "--alpha", str(ALPHA)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        die(f"./train did not finish within {timeout} s (lower --steps or --batch, or raise --timeout)")
    if p.returncode != 0:
        die(f"./train exited with {p.returncode}:\n  {' '.join(cmd)}\n{tail(p.stdout + p.stderr)}")
    params, reported_threads = None, None
    for line in p.stdout.splitlines():
        if line.startswith("device: cpu,"):
            try:
                reported_threads = int(line.split(",")[1].split()[0])
            except (IndexError, ValueError):
                pass
        if line.startswith("model:") and "M parameters" in line:
            try:
                params = float(line.rsplit("|", 1)[1].split("M")[0])
            except (IndexError, ValueError):
                pass
    ms = {}
    with open(os.path.join(out, "log.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "ms" in rec:
                ms[rec["step"]] = rec["ms"]
    timed = [ms[s] for s in sorted(ms) if s >= WARMUP]
    if len(timed) != steps:
        die(f"./train's log.jsonl has {len(timed)} timed steps, expected {steps}")
    shutil.rmtree(out, ignore_errors=True)   # the checkpoint: up to hundreds of MiB
    return timed, params, reported_threads


def torch_env(threads, intraop, unset_openblas, malloc_tuning):
    env = dict(os.environ, OMP_NUM_THREADS=str(intraop), OPENBLAS_NUM_THREADS=str(threads))
    if malloc_tuning:
        env.update(MALLOC_TUNING)
    if unset_openblas:
        for v in OPENBLAS_VARS:
            env.pop(v, None)
    return env


def run_torch(python, cfg, B, T, steps, threads, intraop, unset_openblas, malloc_tuning, timeout):
    """-> list of timed-step ms."""
    cmd = [python, REFERENCE, "bench",
           "--vocab", str(cfg["vocab"]), "--dim", str(cfg["dim"]), "--layers", str(cfg["layers"]),
           "--heads", str(cfg["heads"]), "--ffn", str(cfg["ffn"]), "--seq-len", str(T),
           "--alpha", str(ALPHA), "--batch", str(B), "--steps", str(steps), "--threads", str(intraop)]
    try:
        p = subprocess.run(cmd, env=torch_env(threads, intraop, unset_openblas, malloc_tuning), cwd=REPO,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        die(f"reference.py bench did not finish within {timeout} s (lower --steps or --batch, or raise --timeout)")
    if p.returncode != 0:
        die(f"reference.py bench exited with {p.returncode}:\n  {' '.join(cmd)}\n{tail(p.stdout + p.stderr)}")
    lines = [l for l in p.stdout.splitlines() if l.strip().startswith("{")]
    if not lines:
        die(f"reference.py bench printed no JSON:\n{tail(p.stdout + p.stderr)}")
    rec = json.loads(lines[-1])
    if "ms_steps" in rec:
        return list(rec["ms_steps"])
    # an older reference.py reports only the mean: use it as the one sample
    return [rec["ms_per_step"]]


def main():
    ap = argparse.ArgumentParser(
        description="Time one fp32 training step (forward + backward + AdamW) of ./train's CPU backend "
                    "against PyTorch eager (dev/reference.py bench) on the same model, batch and threads.")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small",
                    help="model: small = L4 C256 heads4 F688 V8192 T128 B8 (default); "
                         "llama-71m = L12 C512 heads8 F1368 V32000 T256 B2 (the paper's 71M model)")
    ap.add_argument("--batch", type=int, help="sequences per step (default: the config's)")
    ap.add_argument("--seq-len", type=int, help="sequence length T (default: the config's)")
    ap.add_argument("--steps", type=int, help=f"timed steps per run, after {WARMUP} warm-up steps "
                                              "(default: 10 for small, 5 for llama-71m)")
    ap.add_argument("--threads", type=int, default=default_threads(),
                    help="threads for both sides (default: all cores available, here %(default)s)")
    ap.add_argument("--torch-intraop-threads", type=int,
                    help="PyTorch's own (OpenMP) threads: --threads and OMP_NUM_THREADS for the reference; "
                         "OpenBLAS keeps --threads (default: --threads; 1 avoids the two pools oversubscribing)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each side this many times, alternating; steps are pooled (default 1)")
    ap.add_argument("--unset-openblas-env", action="store_true",
                    help="remove " + " and ".join(OPENBLAS_VARS) + " from the PyTorch side's environment")
    ap.add_argument("--torch-malloc-tuning", action="store_true",
                    help="set " + ", ".join(MALLOC_TUNING) + " for the PyTorch side, so that glibc keeps "
                         "freed tensors in the heap instead of unmapping them and faulting them in again")
    ap.add_argument("--train", default=os.path.join(REPO, "train"), help="the engine binary (default: ./train)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter with torch for dev/reference.py (default: this one)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds allowed for each run (default 1800)")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    a = ap.parse_args()

    cfg = dict(CONFIGS[a.config])
    B = a.batch if a.batch is not None else cfg["batch"]
    T = a.seq_len if a.seq_len is not None else cfg["seq_len"]
    steps = a.steps if a.steps is not None else cfg["steps"]
    intraop = a.torch_intraop_threads if a.torch_intraop_threads is not None else a.threads
    for name, v in (("--batch", B), ("--seq-len", T), ("--steps", steps), ("--threads", a.threads),
                    ("--torch-intraop-threads", intraop), ("--repeats", a.repeats)):
        if v < 1:
            die(f"{name} must be at least 1, got {v}")

    # both sides must be there before anything is timed
    if not (os.path.isfile(a.train) and os.access(a.train, os.X_OK)):
        die(f"{a.train} not found or not executable: build it first with `make` (or run `make bench`)")
    p = subprocess.run([a.python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    if p.returncode != 0:
        die(f"torch is not importable by {a.python}: install it (Debian: apt-get install python3-torch) "
            f"or pass --python / PYTHON= an interpreter that has it\n{tail(p.stderr, 3)}")
    torch_version = p.stdout.strip()

    post_ln = int(ALPHA * cfg["layers"] + 1e-6)
    engine_ms, torch_ms, params, reported = [], [], None, None
    workdir = tempfile.mkdtemp(prefix="mixln_bench_")
    try:
        for r in range(a.repeats):
            tag = f" (repeat {r + 1}/{a.repeats})" if a.repeats > 1 else ""
            log(f"./train: {WARMUP} + {steps} steps{tag} ...")
            ms, params, reported = run_engine(a.train, cfg, B, T, steps, a.threads, workdir, a.timeout)
            engine_ms += ms
            log(f"PyTorch: {WARMUP} + {steps} steps{tag} ...")
            torch_ms += run_torch(a.python, cfg, B, T, steps, a.threads, intraop, a.unset_openblas_env,
                                  a.torch_malloc_tuning, a.timeout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if reported is not None and reported != a.threads:
        log(f"warning: ./train reported {reported} threads, not the {a.threads} asked for")

    tokens = B * T
    e_med, t_med = statistics.median(engine_ms), statistics.median(torch_ms)
    e_tps, t_tps = tokens / (e_med / 1e3), tokens / (t_med / 1e3)
    ratio = e_tps / t_tps

    present = {v: os.environ[v] for v in OPENBLAS_VARS if v in os.environ}
    if a.unset_openblas_env:
        blas = "unset (--unset-openblas-env): " + (", ".join(present) + " removed" if present else "none were set")
    else:
        blas = "as in the environment: " + (" ".join(f"{k}={v}" for k, v in present.items()) if present
                                            else "none of " + ", ".join(OPENBLAS_VARS) + " set")

    c = cfg
    params_s = f", {params:.2f}M parameters" if params is not None else ""
    rows = [("mixln ./train (CPU backend)", e_med, e_tps, min(engine_ms), max(engine_ms)),
            (f"PyTorch {torch_version} eager", t_med, t_tps, min(torch_ms), max(torch_ms))]
    print(f"mixln CPU benchmark, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {cpu_name()}")
    print(f"config:   {a.config}: L={c['layers']} C={c['dim']} heads={c['heads']} F={c['ffn']} V={c['vocab']} "
          f"T={T} B={B}, Mix-LN alpha {ALPHA} ({post_ln} of {c['layers']} layers Post-LN){params_s}, fp32")
    print(f"step:     forward + backward + AdamW; median of {steps * a.repeats} timed steps "
          f"({a.repeats} x {steps}, each run after {WARMUP} warm-up steps)")
    print(f"threads:  {a.threads} (./train: OMP_NUM_THREADS={a.threads}; PyTorch: --threads {intraop}, "
          f"OMP_NUM_THREADS={intraop}, OPENBLAS_NUM_THREADS={a.threads})")
    print(f"OpenBLAS: PyTorch side {blas}")
    print("malloc:   PyTorch side " + (" ".join(f"{k}={v}" for k, v in MALLOC_TUNING.items())
                                       + " (--torch-malloc-tuning)" if a.torch_malloc_tuning
                                       else "glibc defaults (no --torch-malloc-tuning)"))
    print()
    w = max(len(r[0]) for r in rows)
    print(f"| {'backend':<{w}} | {'ms/step':>9} | {'tokens/s':>9} | {'min-max ms':>17} |")
    print(f"|{'-' * (w + 2)}|{'-' * 10}:|{'-' * 10}:|{'-' * 18}:|")
    for name, med, tps, lo, hi in rows:
        print(f"| {name:<{w}} | {med:>9.1f} | {tps:>9.0f} | {f'{lo:.1f}-{hi:.1f}':>17} |")
    print()
    print(f"engine / PyTorch speed: {ratio:.2f}x  (> 1: the engine is faster)")
    if a.json:
        print(json.dumps({
            "config": a.config, "layers": c["layers"], "dim": c["dim"], "heads": c["heads"], "ffn": c["ffn"],
            "vocab": c["vocab"], "seq_len": T, "batch": B, "alpha": ALPHA, "threads": a.threads,
            "torch_intraop_threads": intraop,
            "steps": steps, "repeats": a.repeats, "openblas_env_unset": a.unset_openblas_env,
            "openblas_env": present, "torch_malloc_tuning": a.torch_malloc_tuning,
            "torch_version": torch_version,
            "engine_ms_median": e_med, "engine_tokens_per_second": e_tps, "engine_ms_steps": engine_ms,
            "torch_ms_median": t_med, "torch_tokens_per_second": t_tps, "torch_ms_steps": torch_ms,
            "ratio": ratio}))


if __name__ == "__main__":
    main()
