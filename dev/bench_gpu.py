"""GPU benchmark: this engine against PyTorch on the same GPU, in one run.

For each config (the paper's LLaMA-71M and LLaMA-130M at T=256, B=64 by default) it times full
training steps (forward, backward, AdamW) of
  - ./train --device cuda --precision bf16 --attention fused (--engine-precision: fp32, bf16 or
    bf16-pure; --engine-attention: fused, which in bf16 runs on the tensor cores, or simple),
  - the PyTorch reference (dev/reference.py) on the GPU, in bf16 autocast with torch.compile and
    PyTorch's fused causal attention (the target to beat), and in plain fp32 (like for like with
    the engine's fp32),
and prints tokens per second, the engine/PyTorch ratio, and the model FLOPs utilisation (MFU)
against the GPU's measured bf16 matrix rate. Medians over the timed steps, after warm-up.

Model FLOPs per token: 6 * (parameters outside the embedding table) + 6 * L * T * C (causal
attention scores and values, forward and backward). Usage, on a machine with a GPU:
    python3 dev/bench_gpu.py [--configs llama-71m,llama-130m] [--batch 64] [--steps 10] [--no-torch-fp32]
A PyTorch run that fails (out of memory, say) is reported in its cell; the other runs go on.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402

CONFIGS = {  # name: (L, C, heads, F); vocab 32000, the paper's configs
    "llama-71m": (12, 512, 8, 1368),
    "llama-130m": (12, 768, 12, 2048),
    "llama-1b": (24, 2048, 32, 5461),
}
VOCAB = 32000


def model_flops_per_token(L, C, F, T):
    non_embedding = L * (4 * C * C + 3 * C * F + 2 * C) + C + VOCAB * C  # the LM head is a matmul
    return 6 * non_embedding + 6 * L * T * C


def measured_bf16_tflops(torch):
    """The GPU's bf16 matrix rate as PyTorch reaches it: large square products."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def bench_engine(train, name, B, T, steps, precision, attention, shard):
    with tempfile.TemporaryDirectory() as out:
        cmd = [train, "--device", "cuda", "--model", name, "--batch", str(B), "--seq-len", str(T),
               "--steps", str(steps + 3), "--train-data", shard, "--out", out, "--precision", precision,
               "--attention", attention]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            return None, run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "failed"
        with open(os.path.join(out, "log.jsonl")) as f:
            rows = [json.loads(line) for line in f if '"train_loss"' in line]
    ms = [r["ms"] for r in rows[3:]]  # the first steps include cuBLASLt's algorithm search
    return statistics.median(ms), None


def bench_torch(torch, L, C, NH, F, B, T, steps, bf16):
    cfg = reference.Config.make(VOCAB, C, L, NH, F, T, 0.25)
    model = reference.MixLNForCausalLM(cfg).cuda()
    reference.Attention.fused = bf16 and hasattr(torch.nn.functional, "scaled_dot_product_attention")
    opt_kwargs = {"fused": True} if bf16 else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, **opt_kwargs)
    step_model = torch.compile(model) if bf16 and hasattr(torch, "compile") else model
    x = torch.randint(0, VOCAB, (B, T), device="cuda")
    y = torch.randint(0, VOCAB, (B, T), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            _, loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up, and torch.compile's compilation
        step()
    torch.cuda.synchronize()
    ms = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        ms.append((time.perf_counter() - start) * 1e3)
    reference.Attention.fused = False
    return statistics.median(ms)


def bench_torch_or_error(torch, *args, **kwargs):
    """bench_torch's median, or None and what went wrong (out of memory, say), so that the table goes on."""
    try:
        return bench_torch(torch, *args, **kwargs), None
    except RuntimeError as error:  # torch.cuda.OutOfMemoryError is one
        reference.Attention.fused = False
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return None, "failed: " + first_line[:80]
    finally:
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="llama-71m,llama-130m")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    ap.add_argument("--engine-precision", default="bf16", choices=["fp32", "bf16", "bf16-pure"])
    ap.add_argument("--engine-attention", default="fused", choices=["fused", "simple"])
    ap.add_argument("--train", default="./train")
    ap.add_argument("--no-torch-fp32", action="store_true", help="skip the PyTorch fp32 runs (the slowest)")
    a = ap.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("bench_gpu: torch is not importable")
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no GPU")
    if not os.path.exists(a.train):
        sys.exit(f"bench_gpu: {a.train} not found: build it first with make")
    B, T = a.batch, a.seq_len
    peak = measured_bf16_tflops(torch)
    print(f"mixln GPU benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {torch.cuda.get_device_name(0)}, "
          f"torch {torch.__version__}; measured bf16 matmul rate {peak:.0f} TFLOP/s")
    print(f"B={B} T={T}, median of {a.steps} timed steps; MFU against the measured bf16 rate\n")
    print("| config | engine (" + a.engine_precision + ", " + a.engine_attention + " attention) tok/s | MFU | PyTorch bf16+compile tok/s | MFU "
          "| PyTorch fp32 tok/s | engine / PyTorch bf16 | engine / PyTorch fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        shard = os.path.join(tmp, "tokens.bin")
        reference.shard_save(shard, np.random.default_rng(0).integers(0, VOCAB, B * T * (a.steps + 4) + 1))
        for name in a.configs.split(","):
            L, C, NH, F = CONFIGS[name]
            flops = model_flops_per_token(L, C, F, T)
            engine_ms, error = bench_engine(a.train, name, B, T, a.steps, a.engine_precision, a.engine_attention,
                                            shard)
            torch_bf16_ms, torch_bf16_error = bench_torch_or_error(torch, L, C, NH, F, B, T, a.steps, bf16=True)
            torch_fp32_ms, torch_fp32_error = (None, "skipped") if a.no_torch_fp32 else \
                bench_torch_or_error(torch, L, C, NH, F, B, T, a.steps, bf16=False)
            tok = lambda ms: B * T / (ms / 1e3)  # noqa: E731
            mfu = lambda ms: tok(ms) * flops / (peak * 1e12)  # noqa: E731
            ratio = lambda ms: "-" if engine_ms is None or ms is None else f"{ms / engine_ms:.2f}x"  # noqa: E731
            engine = f"failed: {error} | -" if engine_ms is None else f"{tok(engine_ms):.0f} | {mfu(engine_ms):.1%}"
            torch_bf16 = f"{torch_bf16_error} | -" if torch_bf16_ms is None else \
                f"{tok(torch_bf16_ms):.0f} | {mfu(torch_bf16_ms):.1%}"
            torch_fp32 = torch_fp32_error if torch_fp32_ms is None else f"{tok(torch_fp32_ms):.0f}"
            print(f"| {name} | {engine} | {torch_bf16} | {torch_fp32} | {ratio(torch_bf16_ms)} | {ratio(torch_fp32_ms)} |",
                  flush=True)


if __name__ == "__main__":
    main()
