"""
Tests of dev/sweep, the experiment runner (16 to 30 s on 2 cores, measured 2026-11-28):

    /usr/bin/python3 dev/test_sweep.py

Runs the real ./train (built with `make train` if missing) through dev/sweep on a tiny model and a
tiny shard of random tokens, and checks the tables, the figures, reuse of finished runs,
--report-only, --dry-run, diverged and failed runs, --analyze, and bad input; and, on synthetic
logs, the numbers the sweep collects. Needs matplotlib for the figures (python3-matplotlib on Debian).
"""

import csv
import importlib.machinery
import importlib.util
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SWEEP = os.path.join(HERE, "sweep")
TRAIN = os.path.join(REPO, "train")

# a tiny model: 6 steps take well under a second
MODEL = ["--layers", "2", "--dim", "32", "--heads", "2", "--ffn", "64", "--vocab", "64", "--seq-len", "16",
         "--batch", "2", "--steps", "6", "--val-every", "3", "--warmup", "0"]

_tmp = None


def tmp():
    global _tmp
    if _tmp is None:
        _tmp = tempfile.mkdtemp(prefix="test_sweep_")
    return _tmp


def shard_save(path, tokens):
    """llm.c's shard format: 256 int32 (magic 20240520, version 1, count), then uint16 tokens."""
    header = [0] * 256
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", *header))
        f.write(struct.pack(f"<{len(tokens)}H", *tokens))


_data = None


def data_args(lr="1e-2"):
    """The ./train arguments for the tiny model on random tokens. The tokens are drawn from 8 of
    the 64 ids, so a healthy run learns (its loss falls from ln 64 = 4.16 towards ln 8 = 2.08 in a
    few steps: measured 4.16 -> about 3.0 after 6 steps at lr 1e-2) and is not taken for a
    diverged one."""
    global _data
    if _data is None:
        rng = random.Random(0)
        train, val = os.path.join(tmp(), "train.bin"), os.path.join(tmp(), "val.bin")
        shard_save(train, [rng.randrange(8) for _ in range(4096)])
        shard_save(val, [rng.randrange(8) for _ in range(1024)])
        _data = ["--train-data", train, "--val-data", val]
    return MODEL + ["--lr", lr] + _data


def ensure_train():
    if not (os.path.isfile(TRAIN) and os.access(TRAIN, os.X_OK)):
        subprocess.run(["make", "train"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def sweep(*args, common=None, expect=0):
    """Runs dev/sweep; -> (stdout, stderr). expect: the exit status wanted (None: non-zero)."""
    cmd = [SWEEP, "--train", TRAIN] + list(args)
    if common is not None:
        cmd += ["--"] + common
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    ok = r.returncode != 0 if expect is None else r.returncode == expect
    assert ok, (f"dev/sweep {' '.join(args)}: exit status {r.returncode}, wanted "
                f"{'non-zero' if expect is None else expect}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r.stdout, r.stderr


def read_csv(out):
    with open(os.path.join(out, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


def result(out, run):
    with open(os.path.join(out, run, "result.json")) as f:
        return json.load(f)


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def load_sweep_module():
    loader = importlib.machinery.SourceFileLoader("sweep_module", SWEEP)
    spec = importlib.util.spec_from_loader("sweep_module", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


# -----------------------------------------------------------------------------
# The main sweep: pre, post, mix (alpha 0.5), seeds 1 and 2, two at once

RUNS = ["pre-s1", "pre-s2", "post-s1", "post-s2", "mix-0.5-s1", "mix-0.5-s2"]
MAIN_ARGS = ["--placements", "pre,post,mix", "--alphas", "0.5", "--seeds", "1,2", "--jobs", "2"]
_main = None


def main_sweep():
    """-> (out, stdout) of the main sweep, run once."""
    global _main
    if _main is None:
        ensure_train()
        out = os.path.join(tmp(), "main")
        stdout, _ = sweep("--out", out, *MAIN_ARGS, common=data_args())
        _main = (out, stdout)
    return _main


def test_executable():
    assert os.access(SWEEP, os.X_OK), "dev/sweep is not executable"
    with open(SWEEP) as f:
        assert f.readline().strip() == "#!/usr/bin/env python3"


def test_sweep_runs_every_placement_and_seed():
    out, stdout = main_sweep()
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert f"training 6 runs, 2 at once, OMP_NUM_THREADS={threads} each" in stdout, stdout
    for run in RUNS:
        assert os.path.isfile(os.path.join(out, run, "log.jsonl")), run
        assert os.path.isfile(os.path.join(out, run, "train.log")), run
        assert any(line.startswith("[") and f"] {run}: ok" in line for line in stdout.splitlines()), \
            f"no progress line for {run}:\n{stdout}"


def test_csv_one_row_per_run_with_finite_val_loss():
    out, _ = main_sweep()
    rows = read_csv(out)
    assert sorted(r["run"] for r in rows) == sorted(RUNS), [r["run"] for r in rows]
    for r in rows:
        loss = float(r["val_loss"])
        assert math.isfinite(loss) and 2.0 < loss < 4.5, r
        assert abs(float(r["perplexity"]) - math.exp(loss)) < 1e-6 * math.exp(loss), r
        assert r["status"] == "ok" and r["diverged"] == "0", r
        assert int(r["val_step"]) == 6 and int(r["train_steps_logged"]) == 6, r
        assert float(r["tokens_per_second"]) > 0 and float(r["wall_seconds"]) > 0, r
        assert f"--seed {r['seed']}" in r["command"], r
    mix = [r for r in rows if r["placement"] == "mix-0.5"]
    assert all(r["kind"] == "mix" and float(r["alpha"]) == 0.5 and "--norm mix --alpha 0.5" in r["command"]
               for r in mix), mix
    # a different seed is a different initialisation
    pre = {r["seed"]: float(r["val_loss"]) for r in rows if r["placement"] == "pre"}
    assert pre["1"] != pre["2"], pre


def test_result_json_holds_the_numbers_and_the_command():
    out, _ = main_sweep()
    r = result(out, "post-s2")
    assert r["command"][0] == TRAIN and r["command"][-2:] == ["--out", os.path.join(out, "post-s2")], r["command"]
    assert r["command"][1:1 + len(data_args())] == data_args()
    assert r["placement_args"] == ["--norm", "post"] and r["seed"] == 2 and r["status"] == "ok"
    with open(os.path.join(out, "post-s2", "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert r["val_loss"] == [e for e in log if "val_loss" in e][-1]["val_loss"]
    assert r["first_train_loss"] == log[0]["train_loss"]
    assert r["final_train_loss"] == [e for e in log if "train_loss" in e][-1]["train_loss"]  # 5% of 6 steps: 1


def test_markdown_has_command_runs_and_summary():
    out, _ = main_sweep()
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    lines = md.splitlines()
    command = " ".join([TRAIN] + data_args())
    fence = lines.index("```")
    assert lines[fence + 1] == command, lines[:6]      # the common command comes first
    assert fence < 5, lines[:6]
    for run in RUNS:
        assert any(l.startswith(f"| {run} |") for l in lines), run
    summary = lines.index("| placement | seeds | val loss | min | max | val ppl | min | max | diverged | failed | tok/s |")
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in lines[summary + 2:]
            if l.startswith("| ")}
    assert set(rows) == {"pre", "post", "mix-0.5"}, rows
    csv_rows = read_csv(out)
    for label, cells in rows.items():
        assert cells[0] == "2" and cells[7] == "0" and cells[8] == "0", cells   # 2 seeds, 0 diverged, 0 failed
        losses = [float(r["val_loss"]) for r in csv_rows if r["placement"] == label]
        mean, std = cells[1].split(" ± ")
        assert abs(float(mean) - sum(losses) / 2) < 1e-4, (cells, losses)
        assert abs(float(std) - abs(losses[0] - losses[1]) / math.sqrt(2)) < 1e-4, (cells, losses)  # sample std
        assert float(cells[2]) == round(min(losses), 4) and float(cells[3]) == round(max(losses), 4), cells


def test_figures_exist():
    out, stdout = main_sweep()
    for name in ("loss_curves.png", "ppl_vs_alpha.png"):
        assert is_png(os.path.join(out, name)), name
        assert f"wrote {os.path.join(out, name)}" in stdout


def test_rerun_reuses_results():
    out, _ = main_sweep()
    paths = [os.path.join(out, run, f) for run in RUNS for f in ("result.json", "train.log", "log.jsonl")]
    before = {p: os.stat(p).st_mtime_ns for p in paths}
    start = time.time()
    stdout, _ = sweep("--out", out, *MAIN_ARGS, common=data_args())
    assert time.time() - start < 15
    assert {p: os.stat(p).st_mtime_ns for p in paths} == before, "a finished run was trained again"
    assert "training" not in stdout and stdout.count("(reused)") == len(RUNS), stdout
    assert len(read_csv(out)) == len(RUNS)


def test_sweep_can_be_extended():
    out, _ = main_sweep()
    before = os.stat(os.path.join(out, "pre-s1", "result.json")).st_mtime_ns
    stdout, _ = sweep("--out", out, "--placements", "pre", "--seeds", "1,3", common=data_args())
    assert "training 1 runs" in stdout and "pre-s3: ok" in stdout, stdout
    assert os.stat(os.path.join(out, "pre-s1", "result.json")).st_mtime_ns == before
    rows = read_csv(out)   # the report covers every result in the directory, not only this call's
    assert sorted(r["run"] for r in rows) == sorted(RUNS + ["pre-s3"])
    with open(os.path.join(out, "results.md")) as f:
        assert any(l.startswith("| pre | 3 |") for l in f.read().splitlines())


def test_changed_command_is_refused():
    out, _ = main_sweep()
    common = data_args()
    common[common.index("--steps") + 1] = "7"
    _, stderr = sweep("--out", out, "--placements", "pre", "--seeds", "1", common=common, expect=None)
    assert "different command" in stderr and "pre-s1" in stderr, stderr


def test_report_only():
    out, _ = main_sweep()
    copy = os.path.join(tmp(), "report_copy")
    shutil.copytree(out, copy)
    for name in ("results.csv", "results.md", "loss_curves.png", "ppl_vs_alpha.png"):
        os.remove(os.path.join(copy, name))
    stdout, _ = sweep("--out", copy, "--report-only")
    assert "training" not in stdout
    assert sorted(r["run"] for r in read_csv(copy)) == sorted(r["run"] for r in read_csv(out))
    assert [r["val_loss"] for r in read_csv(copy)] == [r["val_loss"] for r in read_csv(out)]
    assert os.path.isfile(os.path.join(copy, "results.md"))
    assert is_png(os.path.join(copy, "loss_curves.png")) and is_png(os.path.join(copy, "ppl_vs_alpha.png"))
    _, stderr = sweep("--out", os.path.join(tmp(), "no_such_dir"), "--report-only", expect=None)
    assert "no_such_dir" in stderr, stderr


def test_lrs_train_every_placement_at_every_learning_rate():
    ensure_train()
    out = os.path.join(tmp(), "lrs")
    common = data_args()
    i = common.index("--lr")
    del common[i:i + 2]
    stdout, _ = sweep("--out", out, "--placements", "pre,mix", "--alphas", "0.5", "--lrs", "1e-2,3e-2,0.01",
                      "--jobs", "2", common=common)
    runs = ["pre-lr0.01-s1", "pre-lr0.03-s1", "mix-0.5-lr0.01-s1", "mix-0.5-lr0.03-s1"]   # 0.01 twice: once
    assert "training 4 runs" in stdout, stdout
    rows = read_csv(out)
    assert [r["run"] for r in rows] == runs, rows
    for r in rows:
        lr = "0.01" if "lr0.01" in r["run"] else "0.03"
        assert float(r["lr"]) == float(lr), r
        assert f"--lr {lr} --seed 1" in r["command"], r["command"]
        assert r["status"] == "ok" and math.isfinite(float(r["val_loss"])), r
    assert result(out, "pre-lr0.03-s1")["base"] == "pre"
    assert [r["base"] for r in rows] == ["pre", "pre", "mix-0.5", "mix-0.5"], rows
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    # the table by placement and learning rate holds each run's own loss (one seed: the mean is it)
    assert "| placement | lr 0.01 | lr 0.03 |" in md, md
    loss = {r["run"]: float(r["val_loss"]) for r in rows}
    assert f"| pre | {loss['pre-lr0.01-s1']:.4f} | {loss['pre-lr0.03-s1']:.4f} |" in md, md
    assert f"| mix-0.5 | {loss['mix-0.5-lr0.01-s1']:.4f} | {loss['mix-0.5-lr0.03-s1']:.4f} |" in md, md
    assert is_png(os.path.join(out, "loss_vs_lr.png")) and is_png(os.path.join(out, "ppl_vs_alpha.png"))
    # a sweep of one learning rate has neither
    main_out, _ = main_sweep()
    assert not os.path.exists(os.path.join(main_out, "loss_vs_lr.png"))
    assert all(float(r["lr"]) == 0.01 for r in read_csv(main_out))   # from the common --lr
    # --lr after -- would be overridden by every run: refused, as are learning rates that are not
    for args, c, message in [(["--lrs", "1e-3"], data_args(), "--lrs sets it for each run"),
                             (["--lrs", "1e-3,x"], common, "'x' is not a number"),
                             (["--lrs", "1e-3,0"], common, "0 is not a positive learning rate"),
                             (["--lrs", ""], common, "--lrs")]:
        _, stderr = sweep("--out", os.path.join(tmp(), "lrs_bad"), "--placements", "pre", *args, common=c, expect=None)
        assert message in stderr, (args, stderr)
    assert not os.path.exists(os.path.join(tmp(), "lrs_bad"))


def test_diverging_runs_are_results():
    ensure_train()
    out = os.path.join(tmp(), "diverge")
    # lr 1e6: finite but huge losses (final above the first); lr 1e30: train stops on a non-finite loss
    stdout, stderr = sweep("--out", out, "--placements", "post", common=data_args(lr="1e6"))
    assert "DIVERGED" in stdout, stdout
    r = result(out, "post-s1")
    assert r["status"] == "diverged" and r["exit_code"] == 0 and "above the first" in r["divergence"], r
    out2 = os.path.join(tmp(), "diverge2")
    stdout, stderr = sweep("--out", out2, "--placements", "pre,mix", "--alphas", "0.5", common=data_args(lr="1e30"))
    for run in ("pre-s1", "mix-0.5-s1"):
        r = result(out2, run)
        assert r["status"] == "diverged" and r["exit_code"] != 0 and "finite" in r["divergence"], r
        assert r["val_loss"] == "nan", r   # stopped early: no final validation
    rows = read_csv(out2)
    assert all(r["diverged"] == "1" for r in rows), rows
    with open(os.path.join(out2, "results.md")) as f:
        md = f.read()
    assert "| pre | 1 | - |" in md and "| 1 | 0 |" in md, md   # no mean, 1 diverged, 0 failed
    assert is_png(os.path.join(out2, "loss_curves.png")) and is_png(os.path.join(out2, "ppl_vs_alpha.png"))


def test_failed_run_makes_the_sweep_fail():
    ensure_train()
    out = os.path.join(tmp(), "fail")
    common = data_args()
    common[common.index("--heads") + 1] = "3"    # does not divide the width: train refuses
    stdout, stderr = sweep("--out", out, "--placements", "pre", common=common, expect=1)
    assert "FAILED" in stdout and "pre-s1" in stderr and "failed" in stderr, (stdout, stderr)
    r = result(out, "pre-s1")
    assert r["status"] == "failed" and r["exit_code"] == 1 and "error:" in r["failure"], r
    assert read_csv(out)[0]["status"] == "failed"
    # a failed run is tried again next time
    stdout, _ = sweep("--out", out, "--placements", "pre", common=common, expect=1)
    assert "training 1 runs" in stdout, stdout


def test_dry_run_passes_placements_and_flags_through():
    out = os.path.join(tmp(), "dry")
    extra = ["--norm-type", "layernorm", "--scaled-init", "--lns"]
    stdout, _ = sweep("--out", out, "--placements", "pre,peri,deepnorm,lns,hybrid,mix,mix:0.75,list:post/hybrid/pre/pre",
                      "--alphas", "0.25,0.5", "--seeds", "4", "--dry-run",
                      common=["--layers", "4", "--train-data", "x.bin"] + extra)
    assert not os.path.exists(out), "a dry run created the output directory"
    cmds = [l for l in stdout.splitlines() if not l.startswith("#")]
    want = {"pre": "--norm pre", "peri": "--norm peri", "deepnorm": "--norm deepnorm", "lns": "--norm lns",
            "hybrid": "--norm hybrid",
            "mix-0.25": "--norm mix --alpha 0.25", "mix-0.5": "--norm mix --alpha 0.5",
            "mix-0.75": "--norm mix --alpha 0.75", "list-post1-hybrid1-pre2": "--norm-layers post,hybrid,pre,pre"}
    assert len(cmds) == len(want), stdout
    for label, flags in want.items():
        line = f"{TRAIN} --layers 4 --train-data x.bin {' '.join(extra)} {flags} --seed 4 --out {out}/{label}-s4"
        assert line in cmds, (line, cmds)


def test_bad_input():
    common = ["--layers", "2", "--train-data", "x.bin"]
    out = os.path.join(tmp(), "bad")
    cases = [
        (["--placements", "pre,sandwich"], common, "unknown placement 'sandwich'"),
        (["--placements", "pre", "--seeds", ""], common, "--seeds"),
        (["--placements", "pre", "--seeds", "1,two"], common, "'two'"),
        (["--placements", "mix", "--alphas", "1.5"], common, "outside [0, 1]"),
        (["--placements", "mix:x"], common, "'x' is not a number"),
        (["--placements", "list:post/bogus"], common, "unknown layer kind 'bogus'"),
        (["--placements", "list:post/pre/pre"], common, "names 3 layers, but --layers is 2"),
        (["--placements", "pre"], common + ["--seed", "3"], "--seed"),
        (["--placements", "pre"], ["--layers", "2"], "--train-data"),
        (["--placements", "pre", "--jobs", "0"], common, "--jobs"),
        (["--seeds", "1"], common, "--placements"),
    ]
    for args, c, message in cases:
        _, stderr = sweep("--out", out, *args, common=c, expect=None)
        assert message in stderr, (args, stderr)
    r = subprocess.run([SWEEP, "--train", os.path.join(tmp(), "no_train"), "--out", out, "--placements", "pre",
                        "--"] + common, capture_output=True, text=True)
    assert r.returncode != 0 and "no_train" in r.stderr and "make train" in r.stderr, r.stderr
    assert not os.path.exists(out)


# -----------------------------------------------------------------------------
# --analyze: ./train --analyze on every finished run, and the report's layer section


def test_analyze_adds_the_layers_to_a_finished_sweep():
    ensure_train()
    out = os.path.join(tmp(), "analyze")
    args = ["--out", out, "--placements", "pre,mix:0.5", "--seeds", "1,2", "--jobs", "2"]
    runs = ["pre-s1", "pre-s2", "mix-0.5-s1", "mix-0.5-s2"]
    sweep(*args, common=data_args())
    assert not os.path.exists(os.path.join(out, "layers.csv"))
    # the same sweep with --analyze: nothing is trained again, every run is analysed
    stdout, _ = sweep(*args, "--analyze", common=data_args())
    assert stdout.count("(reused)") == 4 and "training" not in stdout, stdout
    assert stdout.count("[analysis ") == 4, stdout
    L = 2
    analyses = {}
    for run in runs:
        r = result(out, run)
        assert r["analysis"]["status"] == "ok", r["analysis"]
        cmd = r["analysis"]["command"]
        # the checkpoint, and the flags that say what to evaluate; none of training's
        assert cmd[:4] == [TRAIN, "--analyze", "--init-from", os.path.join(out, run)], cmd
        assert "--val-data" in cmd and "--batch" in cmd and "--seq-len" in cmd, cmd
        assert "--train-data" not in cmd and "--lr" not in cmd and "--steps" not in cmd, cmd
        with open(os.path.join(out, run, "analysis.json")) as f:
            analyses[run] = json.load(f)
        # the analysis evaluates the run's final checkpoint on the validation data the run
        # validated on at its last step: the same loss
        assert abs(analyses[run]["val_loss"] - r["val_loss"]) < 1e-5, (analyses[run]["val_loss"], r["val_loss"])
    with open(os.path.join(out, "layers.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(runs) * (L + 1)
    for row in rows:
        d, l = analyses[row["run"]], int(row["boundary"])
        assert float(row["hidden_rms"]) == d["hidden_rms"][l]
        if l < L:
            drop = d["layer_drop"][l]["val_loss"]
            assert float(row["drop_val_loss"]) == drop
            assert abs(float(row["drop_increase"]) - (drop - d["val_loss"])) < 1e-8
            assert float(row["angular_distance_next"]) == d["angular_distance"][l][0]
        else:
            assert row["layer"] == "" and row["drop_increase"] == ""
    # Pre-LN's stream grows from the embeddings' scale; Mix-LN's Post-LN layer 0 ends in a norm
    # with weights near 1, so h_1 sits near RMS 1
    for run in runs:
        rms = analyses[run]["hidden_rms"]
        assert rms[0] < 0.1 and rms[L] > rms[0], (run, rms)
        if run.startswith("mix"):
            assert 0.8 < rms[1] < 1.25, (run, rms)
    # results.md: the layer table, its means over the two seeds
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert "## Layers (`--analyze`)" in md
    for label, pair in (("pre", ("pre-s1", "pre-s2")), ("mix-0.5", ("mix-0.5-s1", "mix-0.5-s2"))):
        line = [l for l in md.splitlines() if l.startswith(f"| {label} | 2 | {L} |")]
        assert len(line) == 1, md
        cells = [c.strip() for c in line[0].strip("|").split("|")]
        assert cells[3] == f"{sum(analyses[r]['val_loss'] for r in pair) / 2:.4f}", cells
        assert cells[4] == f"{sum(analyses[r]['hidden_rms'][0] for r in pair) / 2:.3f}", cells
        assert cells[7] == f"{sum(analyses[r]['hidden_rms'][L] for r in pair) / 2:.3f}", cells
    for name in ("hidden_rms.png", "layer_drop.png"):
        assert is_png(os.path.join(out, name)), name
    # again: the analyses are reused, not redone
    stamp = os.path.getmtime(os.path.join(out, "pre-s1", "analysis.json"))
    stdout, _ = sweep(*args, "--analyze", common=data_args())
    assert stdout.count("(reused)") == 8, stdout
    assert os.path.getmtime(os.path.join(out, "pre-s1", "analysis.json")) == stamp
    # --report-only keeps the section
    sweep("--out", out, "--report-only")
    with open(os.path.join(out, "results.md")) as f:
        assert "## Layers (`--analyze`)" in f.read()
    # an analysis that fails (its checkpoint gone) makes the sweep fail, names the run, and the
    # report says so; the other runs' analyses stay
    os.remove(os.path.join(out, "pre-s1", "analysis.json"))
    os.remove(os.path.join(out, "pre-s1", "model.safetensors"))
    stdout, stderr = sweep(*args, "--analyze", common=data_args(), expect=1)
    assert "pre-s1: FAILED" in stdout and "model.safetensors" in stdout, stdout
    assert "the analysis of 1 run failed" in stderr and "pre-s1" in stderr, stderr
    assert result(out, "pre-s1")["analysis"]["status"] == "failed"
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert "- pre-s1: the analysis failed" in md and f"| pre | 1 | {L} |" in md, md


def test_analyze_follows_the_snapshots_over_training():
    ensure_train()
    out = os.path.join(tmp(), "snapshots")
    # 6 steps, a snapshot every 2: step_000002, step_000004, and step_000006 at the last step,
    # which holds the final checkpoint's weights and is not analysed again; the snapshots hold
    # the weights only (--keep-what weights), all the analysis reads
    args = ["--out", out, "--placements", "pre,mix:0.5", "--seeds", "1,2", "--jobs", "2", "--analyze"]
    common = data_args() + ["--keep-every", "2", "--keep-what", "weights"]
    stdout, _ = sweep(*args, common=common)
    runs = ["pre-s1", "pre-s2", "mix-0.5-s1", "mix-0.5-s2"]
    assert stdout.count("[analysis ") == 4 * 3, stdout
    L = 2
    analyses = {}
    for run in runs:
        r = result(out, run)
        assert sorted(r["snapshot_analyses"]) == ["step_000002", "step_000004"], r.get("snapshot_analyses")
        for name, record in r["snapshot_analyses"].items():
            assert record["status"] == "ok", record
            snapshot = os.path.join(out, run, name)
            assert record["command"][:4] == [TRAIN, "--analyze", "--init-from", snapshot], record["command"]
            with open(os.path.join(snapshot, "analysis.json")) as f:
                analyses[(run, int(name[5:]))] = json.load(f)
            assert os.path.isfile(os.path.join(snapshot, "analyze.log"))
            assert not os.path.exists(os.path.join(snapshot, "training_state.safetensors"))
        assert not os.path.exists(os.path.join(out, run, "step_000006", "analysis.json"))
        with open(os.path.join(out, run, "analysis.json")) as f:
            analyses[(run, 6)] = json.load(f)
        # each snapshot's validation loss is the one the run logged at that step (it validates
        # every 3 steps: compare at the steps both have) and the analyses differ over training
        val = {d["step"]: d["val_loss"] for d in map(json.loads, open(os.path.join(out, run, "log.jsonl")))
               if "val_loss" in d}
        assert abs(analyses[(run, 6)]["val_loss"] - val[6]) < 1e-5, (analyses[(run, 6)], val)
        assert analyses[(run, 2)]["val_loss"] != analyses[(run, 4)]["val_loss"] != analyses[(run, 6)]["val_loss"]
    # layers_over_training.csv: a row per run, step and boundary, the numbers of each analysis.json
    with open(os.path.join(out, "layers_over_training.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(runs) * 3 * (L + 1), len(rows)
    assert {(row["run"], int(row["step"])) for row in rows} == set(analyses)
    for row in rows:
        d, l = analyses[(row["run"], int(row["step"]))], int(row["boundary"])
        assert float(row["hidden_rms"]) == d["hidden_rms"][l]
        if l < L:
            assert float(row["drop_val_loss"]) == d["layer_drop"][l]["val_loss"]
            assert abs(float(row["drop_increase"]) - (d["layer_drop"][l]["val_loss"] - d["val_loss"])) < 1e-8
            assert float(row["angular_distance_next"]) == d["angular_distance"][l][0]
    # results.md: a row per placement and step, the means over the two seeds
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert "## Layers over training (`--keep-every` snapshots)" in md, md
    md = md.split("## Layers over training")[1]
    for label, pair in (("pre", ("pre-s1", "pre-s2")), ("mix-0.5", ("mix-0.5-s1", "mix-0.5-s2"))):
        for step in (2, 4, 6):
            line = [l for l in md.splitlines() if l.startswith(f"| {label} | {step} | 2 |")]
            assert len(line) == 1, (label, step, md)
            cells = [c.strip() for c in line[0].strip("|").split("|")]
            ds = [analyses[(run, step)] for run in pair]
            assert cells[3] == f"{sum(d['val_loss'] for d in ds) / 2:.4f}", cells
            assert cells[6] == f"{sum(d['hidden_rms'][1] for d in ds) / 2:.3f}", cells
            assert cells[7] == f"{sum(d['hidden_rms'][L] for d in ds) / 2:.3f}", cells
            rises = [sum(d["layer_drop"][l]["val_loss"] - d["val_loss"] for d in ds) / 2 for l in range(L)]
            worst = max(range(L), key=lambda l: rises[l])
            assert cells[4] == f"{rises[worst]:+.3f} ({worst})", (cells, rises)
    assert is_png(os.path.join(out, "drop_steps.png"))
    # again: every analysis is reused
    stamp = os.path.getmtime(os.path.join(out, "pre-s1", "step_000002", "analysis.json"))
    stdout, _ = sweep(*args, common=common)
    assert stdout.count("(reused)") == 4 + 12, stdout
    assert not any(line.startswith("training ") for line in stdout.splitlines()), stdout
    assert os.path.getmtime(os.path.join(out, "pre-s1", "step_000002", "analysis.json")) == stamp
    # a snapshot whose analysis fails (its weights gone) makes the sweep fail and is named; the
    # report keeps the rest of the run's steps and says which one is missing
    os.remove(os.path.join(out, "mix-0.5-s2", "step_000004", "analysis.json"))
    os.remove(os.path.join(out, "mix-0.5-s2", "step_000004", "model.safetensors"))
    stdout, stderr = sweep(*args, common=common, expect=1)
    assert "mix-0.5-s2/step_000004: FAILED" in stdout, stdout
    assert "the analysis of 1 snapshot failed" in stderr and "mix-0.5-s2/step_000004" in stderr, stderr
    assert result(out, "mix-0.5-s2")["snapshot_analyses"]["step_000004"]["status"] == "failed"
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert "- mix-0.5-s2/step_000004: the analysis failed" in md, md
    md = md.split("## Layers over training")[1]
    assert "| mix-0.5 | 4 | 1 |" in md and "| mix-0.5 | 2 | 2 |" in md, md
    # retraining a run clears its old snapshots: a failed run is rerun from scratch
    r = result(out, "pre-s2")
    r["status"] = "failed"
    with open(os.path.join(out, "pre-s2", "result.json"), "w") as f:
        json.dump(r, f)
    os.makedirs(os.path.join(out, "pre-s2", "step_000005"))
    sweep(*args, common=common, expect=1)   # mix-0.5-s2/step_000004 still fails
    assert sorted(n for n in os.listdir(os.path.join(out, "pre-s2")) if n.startswith("step_")) == \
        ["step_000002", "step_000004", "step_000006"]
    assert result(out, "pre-s2")["snapshot_analyses"]["step_000002"]["status"] == "ok"


def test_analyze_dry_run_and_bad_input():
    out = os.path.join(tmp(), "analyze_dry")
    # (--pad-id: the data's layout, which the analysis must read as the runs did; --val-mean: its
    # losses the runs' validation means)
    common = ["--layers", "2", "--train-data", "x.bin", "--val-data", "v.bin", "--val-batches", "3", "--batch", "4",
              "--pad-id", "0", "--val-mean", "batches", "--lr", "1e-3"]
    stdout, _ = sweep("--out", out, "--placements", "pre", "--analyze", "--dry-run", common=common)
    want = f"# {TRAIN} --analyze --init-from {out}/pre-s1 --val-data v.bin --val-batches 3 --batch 4 --pad-id 0 " \
           "--val-mean batches"
    assert want in stdout.splitlines(), stdout
    assert "snapshot" not in stdout, stdout
    stdout, _ = sweep("--out", out, "--placements", "pre", "--analyze", "--dry-run", common=common + ["--keep-every", "5"])
    assert f"# {TRAIN} --analyze --init-from {out}/<run>/step_NNNNNN --val-data v.bin --val-batches 3 --batch 4 " \
           "--pad-id 0 --val-mean batches" in stdout.splitlines(), stdout
    assert not os.path.exists(out)
    _, stderr = sweep("--out", out, "--placements", "pre", "--analyze", common=["--layers", "2", "--train-data", "x.bin"],
                      expect=None)
    assert "--analyze evaluates on the validation data: give --val-data after --" in stderr, stderr


# -----------------------------------------------------------------------------
# The numbers, on synthetic logs


def write_log(path, lines):
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def train_line(step, loss, tps=1000.0, grad="1.0"):
    return f'{{"step": {step}, "train_loss": {loss}, "lr": 1e-3, "grad_norm": {grad}, "ms": 1.0, "tokens_per_second": {tps}}}'


def test_collected_numbers():
    sw = load_sweep_module()
    d = os.path.join(tmp(), "synthetic")
    os.makedirs(d, exist_ok=True)
    # 40 steps: the final training loss is the mean of the last 2 (5%); tok/s the median of steps 5..39
    losses = [4.0 - 0.05 * s for s in range(40)]
    tps = [10.0] * 5 + [float(100 + s) for s in range(35)]
    lines = [train_line(s, losses[s], tps[s]) for s in range(40)]
    lines.insert(20, '{"step": 20, "val_loss": 3.5, "tokens": 64}')
    lines.append('{"step": 40, "val_loss": 2.25, "tokens": 64}')
    write_log(os.path.join(d, "log.jsonl"), lines)
    write_log(os.path.join(d, "train.log"), ["ok"])
    r = sw.collect(d, 0, 1.5)
    assert r["status"] == "ok" and r["divergence"] is None, r
    assert abs(r["final_train_loss"] - (losses[38] + losses[39]) / 2) < 1e-12, r
    assert r["first_train_loss"] == 4.0 and r["val_loss"] == 2.25 and r["val_step"] == 40, r
    assert abs(r["perplexity"] - math.exp(2.25)) < 1e-9, r
    assert r["tokens_per_second"] == 100 + 17, r    # the median of 100..134
    # the final loss above the first: diverged
    write_log(os.path.join(d, "log.jsonl"), [train_line(0, 4.0), train_line(1, 3.0), train_line(2, 4.5)])
    r = sw.collect(d, 0, 1.0)
    assert r["status"] == "diverged" and "above the first" in r["divergence"], r
    # non-finite values as ./train prints them (nan, inf: not JSON) are read, and mean divergence
    write_log(os.path.join(d, "log.jsonl"), [train_line(0, 4.0), train_line(1, 3.0, grad="inf"),
                                             train_line(2, 2.0), '{"step": 3, "val_loss": -nan, "tokens": 64}'])
    r = sw.collect(d, 0, 1.0)
    assert r["status"] == "diverged" and "step 1" in r["divergence"], r
    assert math.isnan(r["val_loss"]) and math.isnan(r["perplexity"]), r
    # train stopping on a non-finite loss: diverged; stopping for another reason: failed
    write_log(os.path.join(d, "log.jsonl"), [train_line(0, 4.0)])
    write_log(os.path.join(d, "train.log"), ["step 1/6 | loss 4.0", "error: the loss is non-finite at step 1"])
    r = sw.collect(d, 1, 1.0)
    assert r["status"] == "diverged" and "non-finite" in r["divergence"], r
    write_log(os.path.join(d, "train.log"), ["error: cannot open shard x.bin"])
    r = sw.collect(d, 1, 1.0)
    assert r["status"] == "failed" and "cannot open shard" in r["failure"], r
    # a huge loss has an infinite perplexity, and result.json keeps it as JSON ("inf")
    assert sw.perplexity(1e6) == float("inf")
    assert json.loads(json.dumps(sw.to_json(float("inf")))) == "inf" and sw.from_json("inf") == float("inf")


def test_placement_labels():
    sw = load_sweep_module()
    ps = sw.parse_placements("mix,pre,mix:0.25,list:post/post/pre/pre/pre", [0.25, 0.125])
    assert [p["label"] for p in ps] == ["mix-0.25", "mix-0.125", "pre", "list-post2-pre3"], ps
    assert ps[3]["args"] == ["--norm-layers", "post,post,pre,pre,pre"]
    assert sw.parse_seeds("3, 1,3") == [3, 1]
    lr = sw.with_lr(ps[0], 3e-3)
    assert lr["label"] == "mix-0.25-lr0.003" and lr["base"] == "mix-0.25" and lr["lr"] == 3e-3
    assert lr["args"] == ["--norm", "mix", "--alpha", "0.25", "--lr", "0.003"] and ps[0]["lr"] is None
    assert sw.lr_of(["--lr", "1e-3", "--steps", "5", "--lr", "2e-3"]) == 2e-3 and sw.lr_of(["--steps", "5"]) is None


def main():
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
    passed = failed = 0
    start = time.time()
    try:
        for name, fn in tests:
            try:
                fn()
                print(f"PASS {name}", flush=True)
                passed += 1
            except Exception:
                failed += 1
                print(f"FAIL {name}", flush=True)
                traceback.print_exc()
    finally:
        if _tmp is not None:
            shutil.rmtree(_tmp, ignore_errors=True)
    print(f"sweep tests: {passed} passed, {failed} failed ({time.time() - start:.0f} s)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
