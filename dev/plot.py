"""
Figures from training logs and layer analyses, as PNG files (matplotlib, Agg backend):

  loss     training loss per step and validation loss points of several runs on one plot
  grads    per-layer gradient norms (layer_grad_norms in the log) at one step
  angular  the angular-distance heatmap over (layer l, distance n), as in the Mix-LN paper
  drop     the loss increase when each layer is removed, several models side by side
  rms      the hidden states' RMS at every layer boundary, several models on one plot
  drop-steps  each layer's layer-drop loss over training, from the analyses of the snapshots
           that ./train --keep-every keeps (RUN/step_NNNNNN), one panel per run
  lr       the final validation loss against the peak learning rate, from the results.csv of one
           or more sweeps (dev/sweep, one learning rate each or several with --lrs), pooled by placement

and, as functions for dev/sweep, the figures of a sweep over placements and seeds
(sweep_loss_curves, sweep_ppl_vs_alpha, sweep_loss_vs_lr with --lrs, and with --analyze sweep_hidden_rms,
sweep_layer_drop).

    python3 dev/plot.py loss --out loss.png runs/pre/log.jsonl runs/post/log.jsonl runs/mix/log.jsonl
    python3 dev/plot.py grads --out grads.png runs/pre/log.jsonl runs/mix/log.jsonl --step 0
    python3 dev/reference.py analyze --ckpt runs/mix --data data/val.bin --batch 8 --seq-len 256 --out runs/mix/analysis.json
    python3 dev/plot.py angular --out angular.png runs/mix/analysis.json
    python3 dev/plot.py drop --out drop.png runs/pre/analysis.json runs/mix/analysis.json
    python3 dev/plot.py rms --out rms.png runs/pre/analysis.json runs/mix/analysis.json --logy
    for d in runs/pre/step_* runs/mix/step_*; do ./train --analyze --init-from $d --val-data data/val.bin; done
    python3 dev/plot.py drop-steps --out drop_steps.png runs/pre runs/mix
    python3 dev/plot.py lr --out loss_vs_lr.png runs/sweep_lr1e-3/results.csv runs/sweep_lr3e-3/results.csv

Inputs: log.jsonl as ./train writes it (training lines: step, train_loss, lr, grad_norm and
optionally layer_grad_norms; validation lines: step, val_loss, tokens), and the JSON of
`reference.py analyze` (or the engine's equivalent), and the results.csv of dev/sweep. Bad input stops with `error: ...` and exit
status 1. Inputs are read and checked before matplotlib is imported, so those errors do not need it.

matplotlib is the Debian package python3-matplotlib (for /usr/bin/python3):
    apt-get install -y --no-install-recommends python3-matplotlib
"""

import argparse
import json
import math
import os
import sys


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    try:
        import matplotlib
    except ImportError:
        fail("matplotlib is not installed; on Debian: apt-get install -y --no-install-recommends python3-matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# -----------------------------------------------------------------------------
# Reading and checking the inputs


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    except UnicodeDecodeError:
        fail(f"{path}: not a text file")


def read_log(path):
    """log.jsonl -> (train, val): train a list of the training-step dicts (with a numeric
    train_loss), val a list of the validation dicts (with a numeric val_loss), each in file order.
    A last line cut short (a run still writing) is skipped with a warning; any other line that is
    not a JSON object is an error."""
    text = read_text(path)
    lines = text.split("\n")
    train, val = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError:
            if i == len(lines):  # no newline after it: the writer was interrupted mid-line
                print(f"warning: {path}:{i}: skipping an incomplete last line", file=sys.stderr)
                continue
            fail(f"{path}:{i}: not valid JSON")
        if not isinstance(d, dict):
            fail(f"{path}:{i}: expected a JSON object, got {type(d).__name__}")
        if "step" in d and not is_number(d["step"]):
            fail(f"{path}:{i}: step is not a number")
        if "train_loss" in d:
            if not is_number(d["train_loss"]) or "step" not in d:
                fail(f"{path}:{i}: a training line needs numeric step and train_loss")
            train.append(d)
        elif "val_loss" in d:
            if not is_number(d["val_loss"]) or "step" not in d:
                fail(f"{path}:{i}: a validation line needs numeric step and val_loss")
            val.append(d)
    if not train and not val:
        fail(f"{path}: no training or validation lines (objects with step and train_loss or val_loss)")
    return train, val


def layer_grads_at(path, train, step):
    """-> (step, [norm per layer]) from the first training line with layer_grad_norms, or the one
    at `step` if given."""
    logged = [d for d in train if "layer_grad_norms" in d]
    if not logged:
        fail(f"{path}: no line has layer_grad_norms (train with --layer-grads-every N)")
    if step is None:
        d = logged[0]
    else:
        at = [d for d in logged if d["step"] == step]
        if not at:
            steps = [d["step"] for d in logged]
            shown = ", ".join(str(s) for s in steps[:10]) + (", ..." if len(steps) > 10 else "")
            fail(f"{path}: no layer_grad_norms at step {step}; logged at steps {shown}")
        d = at[0]
    norms = d["layer_grad_norms"]
    if not isinstance(norms, list) or not norms or not all(is_number(v) for v in norms):
        fail(f"{path}: layer_grad_norms at step {d['step']} is not a non-empty list of numbers")
    return d["step"], norms


def check_analysis(d, need):
    """Raises ValueError naming what is wrong with an analysis object d (the JSON of --analyze or of
    reference.py analyze) in the parts `need` names ("angular_distance", "layer_drop",
    "hidden_rms"); val_loss must be a number when layer_drop is used. dev/sweep checks with it too."""
    if not isinstance(d, dict):
        raise ValueError("expected a JSON object (the output of reference.py analyze)")
    if "angular_distance" in need:
        rows = d.get("angular_distance")
        if not isinstance(rows, list) or not rows:
            raise ValueError("angular_distance missing or not a non-empty list of rows")
        L = len(rows)
        for l, row in enumerate(rows):
            if not isinstance(row, list) or not all(is_number(v) for v in row):
                raise ValueError(f"angular_distance row {l} is not a list of numbers")
            if len(row) != L - l:
                raise ValueError(f"angular_distance row {l} has {len(row)} entries, expected {L - l} "
                                 f"(row l holds n = 1..L-l, L = {L})")
    if "layer_drop" in need:
        if not is_number(d.get("val_loss")):
            raise ValueError("val_loss missing or not a number")
        drops = d.get("layer_drop")
        if not isinstance(drops, list) or not drops:
            raise ValueError("layer_drop missing or not a non-empty list")
        for i, e in enumerate(drops):
            if not (isinstance(e, dict) and isinstance(e.get("layer"), int) and is_number(e.get("val_loss"))):
                raise ValueError(f"layer_drop entry {i} is not {{\"layer\": int, \"val_loss\": number}}")
        layers = sorted(e["layer"] for e in drops)
        if layers != list(range(len(drops))):
            raise ValueError(f"layer_drop layers are {layers}, expected 0..{len(drops) - 1} once each")
    if "hidden_rms" in need:
        rms = d.get("hidden_rms")
        if not isinstance(rms, list) or len(rms) < 2:
            raise ValueError("hidden_rms missing or not a list of L+1 numbers (an analysis written before "
                             "2026-11-30 has none: run --analyze again)")
        if not all(is_number(v) and math.isfinite(v) and v > 0 for v in rms):
            raise ValueError("hidden_rms holds a value that is not a positive finite number")


def read_analysis(path, need):
    """analysis JSON -> dict, checked by check_analysis; bad input stops with its message."""
    try:
        d = json.loads(read_text(path))
    except ValueError:
        fail(f"{path}: not valid JSON (expected one JSON object, the output of reference.py analyze)")
    try:
        check_analysis(d, need)
    except ValueError as e:
        fail(f"{path}: {e}")
    return d


def labels_for(paths, given):
    """--labels a,b,... if given (one per file); else the files' directory names (a run's files
    live in its run directory), or the file names when those repeat, or the paths as given."""
    if given is not None:
        labels = given.split(",")
        if len(labels) != len(paths):
            fail(f"--labels has {len(labels)} labels for {len(paths)} files")
        return labels
    absolute = [os.path.abspath(p) for p in paths]
    for labels in ([os.path.basename(os.path.dirname(p)) for p in absolute],
                   [os.path.splitext(os.path.basename(p))[0] for p in absolute]):
        if all(labels) and len(set(labels)) == len(labels):
            return labels
    return list(paths)


def save(fig, out):
    try:
        fig.savefig(out, format="png", dpi=120)
    except OSError as e:
        fail(f"{out}: {e.strerror}")
    print(f"wrote {out}")


# -----------------------------------------------------------------------------
# Figures


def finish(fig, ax, title, out, grid_axis="both"):
    """Title, a light grid, the legend, then write the PNG."""
    ax.set_title(title)
    ax.grid(alpha=0.3, axis=grid_axis)
    ax.legend()
    fig.tight_layout()
    save(fig, out)


def cmd_loss(a):
    runs = [read_log(p) for p in a.logs]
    labels = labels_for(a.logs, a.labels)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for (train, val), label in zip(runs, labels):
        color = None
        if train:
            (line,) = ax.plot([d["step"] for d in train], [d["train_loss"] for d in train],
                              linewidth=1.2, label=f"{label} train")
            color = line.get_color()
        if val:  # same colour as the run's training curve, as points
            ax.plot([d["step"] for d in val], [d["val_loss"] for d in val], "o", markersize=5,
                    color=color, markeredgecolor="black", markeredgewidth=0.5, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    finish(fig, ax, a.title or "Training loss", a.out)


def cmd_grads(a):
    runs = [layer_grads_at(p, read_log(p)[0], a.step) for p in a.logs]
    labels = labels_for(a.logs, a.labels)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    if len(runs) == 1:
        step, norms = runs[0]
        ax.bar(range(len(norms)), norms, color="tab:blue")
        title = f"Gradient norm per layer, {labels[0]}, step {step}"
    else:
        for (step, norms), label in zip(runs, labels):
            ax.plot(range(len(norms)), norms, marker="o", markersize=4, label=f"{label} (step {step})")
        ax.legend()
        title = "Gradient norm per layer"
    L = max(len(norms) for _, norms in runs)
    ax.set_xticks(range(0, L, max(1, math.ceil(L / 16))))
    ax.set_xlabel("layer")
    ax.set_ylabel("gradient L2 norm (all parameters of the layer)")
    if a.logy:
        ax.set_yscale("log")
    ax.set_title(a.title or title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save(fig, a.out)


def cmd_angular(a):
    rows = read_analysis(a.analysis, ["angular_distance"])["angular_distance"]
    L = len(rows)
    plt = pyplot()
    import numpy as np
    # grid[n-1, l] = distance from the input of layer l to the input of layer l+n; NaN (masked,
    # drawn blank) where l+n would run past the last layer
    grid = np.full((L, L), np.nan)
    for l, row in enumerate(rows):
        grid[:len(row), l] = row
    grid = np.ma.masked_invalid(grid)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("white")
    im = ax.imshow(grid, origin="lower", cmap=cmap, aspect="auto", interpolation="nearest",
                   extent=(-0.5, L - 0.5, 0.5, L + 0.5))  # cell centres at l = 0..L-1, n = 1..L
    tick = max(1, math.ceil(L / 16))
    ax.set_xticks(range(0, L, tick))
    ax.set_yticks(range(1, L + 1, tick))
    ax.set_xlabel("layer l")
    ax.set_ylabel("distance n (layers)")
    ax.set_title(a.title or f"Angular distance between the inputs of layers l and l+n ({os.path.basename(a.analysis)})",
                 fontsize=10)
    fig.colorbar(im, ax=ax, label="arccos(cos_sim) / pi, last token")
    fig.tight_layout()
    save(fig, a.out)


def cmd_drop(a):
    models = [read_analysis(p, ["layer_drop"]) for p in a.analyses]
    labels = labels_for(a.analyses, a.labels)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(8, 0.25 * max(len(d["layer_drop"]) for d in models) * len(models)), 5))
    width = 0.8 / len(models)
    L = 0
    for i, (d, label) in enumerate(zip(models, labels)):
        drops = sorted(d["layer_drop"], key=lambda e: e["layer"])
        L = max(L, len(drops))
        xs = [e["layer"] - 0.4 + width * (i + 0.5) for e in drops]
        ax.bar(xs, [e["val_loss"] - d["val_loss"] for e in drops], width=width,
               label=f"{label} (full {d['val_loss']:.3f})")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(0, L, max(1, math.ceil(L / 16))))
    ax.set_xlabel("layer removed")
    ax.set_ylabel("val loss without the layer - full model val loss")
    finish(fig, ax, a.title or "Loss increase when one layer is removed", a.out, grid_axis="y")


def cmd_rms(a):
    models = [read_analysis(p, ["hidden_rms"]) for p in a.analyses]
    labels = labels_for(a.analyses, a.labels)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    L = 0
    for d, label in zip(models, labels):
        rms = d["hidden_rms"]
        L = max(L, len(rms) - 1)
        ax.plot(range(len(rms)), rms, marker="o", markersize=4, label=label)
    ax.set_xticks(range(0, L + 1, max(1, math.ceil((L + 1) / 16))))
    ax.set_xlabel("layer boundary l (0: the embeddings, l: the output of layer l-1)")
    ax.set_ylabel("RMS of the hidden state h_l")
    if a.logy:
        ax.set_yscale("log")
    finish(fig, ax, a.title or "Hidden-state scale at every layer boundary", a.out)


def snapshot_analyses(run):
    """[(step, analysis)] of a run's snapshots (run/step_NNNNNN/analysis.json, as ./train
    --keep-every and --analyze write them), in step order, and of its final checkpoint
    (run/analysis.json, at the step its log.jsonl ends on) where no analysed snapshot is of that
    step. A snapshot not analysed yet is left out with a note; a run with no analysed snapshot at
    all stops."""
    if not os.path.isdir(run):
        fail(f"{run}: not a directory (expected a run folder with step_NNNNNN snapshots, from ./train --keep-every)")
    found, missing = [], []
    for name in sorted(os.listdir(run)):
        if not (name.startswith("step_") and name[5:].isdigit() and os.path.isdir(os.path.join(run, name))):
            continue
        path = os.path.join(run, name, "analysis.json")
        if os.path.exists(path):
            found.append((int(name[5:]), read_analysis(path, ["layer_drop"])))
        else:
            missing.append(name)
    if missing:
        print(f"note: {run}: {len(missing)} snapshot(s) not analysed, left out: {', '.join(missing)}", file=sys.stderr)
    if not found:
        fail(f"{run}: no analysed snapshot (run/step_NNNNNN/analysis.json); make them with "
             f"./train --analyze --init-from {os.path.join(run, 'step_NNNNNN')} --val-data ...")
    final, log = os.path.join(run, "analysis.json"), os.path.join(run, "log.jsonl")
    if os.path.exists(final) and os.path.exists(log):
        train, _ = read_log(log)
        last = int(max(d["step"] for d in train)) + 1 if train else None   # the steps taken
        if last is not None and all(step != last for step, _ in found):
            found.append((last, read_analysis(final, ["layer_drop"])))
    found.sort(key=lambda e: e[0])
    layers = {len(d["layer_drop"]) for _, d in found}
    if len(layers) != 1:
        fail(f"{run}: the snapshots' analyses disagree on the number of layers ({sorted(layers)})")
    return found


def cmd_drop_steps(a):
    runs = [snapshot_analyses(r) for r in a.runs]
    labels = labels_for([os.path.join(r, "log.jsonl") for r in a.runs], a.labels)
    groups = []
    for snapshots, label in zip(runs, labels):
        series = []
        for step, d in snapshots:
            drops = sorted(d["layer_drop"], key=lambda e: e["layer"])
            series.append((step, [e["val_loss"] - d["val_loss"] for e in drops]))
        groups.append({"label": label, "runs": [series]})
    sweep_drop_steps(groups, a.out, title=a.title, logy=a.logy)


def read_sweep_lines(paths):
    """results.csv files of dev/sweep -> the lines of sweep_loss_vs_lr: one per placement (the
    base column, the placement without its -lr suffix; older files without it: the placement),
    the runs of every file pooled, so the seeds and learning rates of separate sweeps meet on one
    line. Failed runs are left out; so are runs without a learning rate, with a warning."""
    import csv
    lines, unknown = {}, []
    for path in paths:
        text = read_text(path)
        rows = list(csv.DictReader(text.splitlines()))
        if not rows:
            fail(f"{path}: no runs (expected the results.csv of dev/sweep)")
        missing = [k for k in ("run", "placement", "lr", "status", "val_loss") if k not in rows[0]]
        if missing:
            fail(f"{path}: no {', '.join(missing)} column (expected the results.csv of dev/sweep)")
        for i, row in enumerate(rows, start=2):
            if row["status"] == "failed":
                continue
            if row["status"] not in ("ok", "diverged"):
                fail(f"{path}: line {i} (run {row['run']}): status '{row['status']}', expected ok, diverged or failed")
            if row["lr"] == "":
                unknown.append(f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{row['run']}")
                continue
            try:
                lr, loss = float(row["lr"]), float(row["val_loss"])
            except ValueError:
                fail(f"{path}: line {i} (run {row['run']}): lr '{row['lr']}' or val_loss '{row['val_loss']}' "
                     "is not a number")
            if not (math.isfinite(lr) and lr > 0):
                fail(f"{path}: line {i} (run {row['run']}): lr {row['lr']} is not a positive learning rate")
            label = row.get("base") or row["placement"]
            lines.setdefault(label, []).append({"lr": lr, "loss": loss, "diverged": row["status"] == "diverged"})
    if unknown:
        print(f"warning: {len(unknown)} run(s) without a learning rate (no --lr in their command), left out: "
              + ", ".join(unknown), file=sys.stderr)
    if not lines:
        fail("no run with a learning rate and a result in " + ", ".join(paths))
    return [{"label": label, "points": points} for label, points in lines.items()]


def cmd_lr(a):
    sweep_loss_vs_lr(read_sweep_lines(a.results), a.out, title=a.title)


# -----------------------------------------------------------------------------
# Figures of a sweep (dev/sweep): several placements, several seeds each. The caller has read and
# checked the logs; these take plain lists and draw.


def _finite(v):
    return is_number(v) and math.isfinite(v)


def _smooth(values, window):
    """Trailing moving average over `window` points (fewer at the start); NaN stays NaN."""
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _over_seeds(curves):
    """[[(step, value), ...] per run] -> (steps, mean, lo, hi) over the runs that have each step,
    finite values only (a step where no run has a finite value is left out)."""
    by_step = {}
    for curve in curves:
        for step, v in curve:
            if _finite(v):
                by_step.setdefault(step, []).append(v)
    steps = sorted(by_step)
    vals = [by_step[s] for s in steps]
    return steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def _finish_sweep_figure(fig, ax, title, out, grid_axis="both"):
    """The sweep figures' one-panel ending: a small title, a light grid, the legend (where anything
    is labelled), then write the PNG and free the figure."""
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis=grid_axis)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, out)
    pyplot().close(fig)


def sweep_loss_curves(groups, out, title=None):
    """Two panels: validation loss vs step (mean over seeds, band from min to max) and smoothed
    training loss vs step (mean over seeds), one colour per placement.
    groups: [{"label": str, "runs": [{"train": [(step, loss)], "val": [(step, loss)]}, ...]}, ...]
    The y range covers the placements whose curve ends at or below the largest first training
    loss (about ln V at initialisation); one that ends above it (diverged) leaves the chart and
    says so in the legend, instead of flattening everyone else. When every curve ends above it,
    the whole range is shown, on a logarithmic axis if it spans more than a factor of 100."""
    plt = pyplot()
    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(13, 5))
    firsts = []                           # first training losses: the cap of the y range
    drawn = {ax_val: [], ax_train: []}    # per panel: (line, name, last value, values) per placement
    for i, g in enumerate(groups):
        color = f"C{i % 10}"
        runs = g["runs"]
        n = len(runs)
        name = f"{g['label']} ({n} seed{'s' if n != 1 else ''})"
        firsts += [r["train"][0][1] for r in runs if r["train"] and _finite(r["train"][0][1])]
        steps, mean, lo, hi = _over_seeds([r["val"] for r in runs])
        if steps:
            (line,) = ax_val.plot(steps, mean, "-o", color=color, markersize=3, linewidth=1.4, label=name)
            if n > 1:
                ax_val.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
            drawn[ax_val].append((line, name, mean[-1], lo + hi))
        smoothed = []
        for r in runs:
            pts = [(s, v if _finite(v) else float("nan")) for s, v in r["train"]]
            window = max(1, len(pts) // 25)
            smoothed.append(list(zip([s for s, _ in pts], _smooth([v for _, v in pts], window))))
        steps, mean, lo, hi = _over_seeds(smoothed)
        if steps:
            (line,) = ax_train.plot(steps, mean, color=color, linewidth=1.2, label=name)
            drawn[ax_train].append((line, name, mean[-1], mean))
    cap = max(firsts) if firsts else None
    for ax, curves in drawn.items():
        if not curves:
            continue
        tame = [c for c in curves if cap is None or c[2] <= cap]
        if tame and len(tame) < len(curves):
            bottom = min(min(c[3]) for c in tame)
            top = min(cap, max(max(c[3]) for c in tame))
            if top > bottom:
                pad = 0.05 * (top - bottom)
                ax.set_ylim(bottom - pad, top + 2 * pad)
            for line, name, _, _ in curves:
                if not any(line is c[0] for c in tame):
                    line.set_label(f"{name}: diverged, off the chart")
        elif not tame:
            vals = [v for c in curves for v in c[3]]
            if min(vals) > 0 and max(vals) / min(vals) > 100:
                ax.set_yscale("log")
    ax_val.set_title("Validation loss (mean over seeds, band: min..max)", fontsize=10)
    ax_train.set_title("Training loss (moving average, mean over seeds)", fontsize=10)
    for ax in (ax_val, ax_train):
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save(fig, out)
    plt.close(fig)


def sweep_ppl_vs_alpha(points, out, title=None):
    """Validation perplexity against the Mix-LN alpha: the mean over the seeds that did not
    diverge as a line, every such seed as a point, and diverged runs as crosses on the top edge.
    points: [{"alpha": a, "ppl": p, "diverged": bool, "series": name or None}, ...] (alpha 0 =
    Pre-LN runs, alpha 1 = Post-LN runs, when the caller includes them); one line and colour per
    series (the sweep's learning rates), in the order they first appear. A logarithmic axis when
    the perplexities span more than a factor of 20."""
    plt = pyplot()
    import matplotlib.transforms as mtransforms
    fig, ax = plt.subplots(figsize=(8, 5))
    series = []
    for p in points:
        if p.get("series") not in series:
            series.append(p.get("series"))
    edge = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    alphas = sorted({p["alpha"] for p in points})
    vals = []
    for i, name in enumerate(series):
        mine = [p for p in points if p.get("series") == name]
        good = [p for p in mine if not p["diverged"] and _finite(p["ppl"])]
        bad = [p for p in mine if p not in good]
        color = "tab:blue" if len(series) == 1 else f"C{i % 10}"
        prefix = f"{name}: " if name is not None else ""
        means = []
        for a in sorted({p["alpha"] for p in good}):
            v = [p["ppl"] for p in good if p["alpha"] == a]
            means.append((a, sum(v) / len(v)))
        if good:
            ax.plot([p["alpha"] for p in good], [p["ppl"] for p in good], "o", color=color, alpha=0.45,
                    markersize=5, label=prefix + "one seed" if len(series) == 1 else None)
        if means:
            ax.plot([a for a, _ in means], [m for _, m in means], "-s", color=color, markersize=7,
                    linewidth=1.6, label=prefix + "mean over seeds (not diverged)" if len(series) == 1 else name)
        if bad:
            ax.plot([p["alpha"] for p in bad], [0.97] * len(bad), "x", color="tab:red" if len(series) == 1 else color,
                    markersize=9, markeredgewidth=2, transform=edge, clip_on=False, label=prefix + "diverged")
        vals += [p["ppl"] for p in good]
    if not vals:
        ax.text(0.5, 0.5, "every run diverged", transform=ax.transAxes, ha="center", va="center", color="tab:red")
        ax.set_yticks([])
    if vals and min(vals) > 0 and max(vals) / min(vals) > 20:
        ax.set_yscale("log")
    names = {0.0: "0\n(Pre-LN)", 1.0: "1\n(Post-LN)"}
    ax.set_xticks(alphas)
    ax.set_xticklabels([names.get(a, f"{a:g}") for a in alphas])
    if len(alphas) == 1:
        ax.set_xlim(alphas[0] - 0.1, alphas[0] + 0.1)
    ax.set_xlabel("alpha (fraction of layers, from the first, that are Post-LN)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title or "Mix-LN: validation perplexity vs alpha")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, out)
    plt.close(fig)


def sweep_loss_vs_lr(lines, out, title=None):
    """The final validation loss against the peak learning rate (logarithmic axis), one colour per
    placement: the mean over the seeds that did not diverge as a line, every such seed as a point,
    and diverged runs as crosses on the top edge in the placement's colour.
    lines: [{"label": str, "points": [{"lr": lr, "loss": loss, "diverged": bool}, ...]}, ...]."""
    plt = pyplot()
    import matplotlib.transforms as mtransforms
    fig, ax = plt.subplots(figsize=(8, 5))
    edge = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    lrs = sorted({p["lr"] for line in lines for p in line["points"]})
    any_good = False
    for i, line in enumerate(lines):
        color = f"C{i % 10}"
        good = [p for p in line["points"] if not p["diverged"] and _finite(p["loss"])]
        bad = [p for p in line["points"] if p not in good]
        means = []
        for lr in sorted({p["lr"] for p in good}):
            v = [p["loss"] for p in good if p["lr"] == lr]
            means.append((lr, sum(v) / len(v)))
        if good:
            any_good = True
            ax.plot([p["lr"] for p in good], [p["loss"] for p in good], "o", color=color, alpha=0.4, markersize=4)
            ax.plot([lr for lr, _ in means], [m for _, m in means], "-s", color=color, markersize=6, linewidth=1.5,
                    label=line["label"])
        if bad:
            ax.plot([p["lr"] for p in bad], [0.97] * len(bad), "x", color=color, markersize=9, markeredgewidth=2,
                    transform=edge, clip_on=False, label=f"{line['label']}: diverged")
    if not any_good:
        ax.text(0.5, 0.5, "every run diverged", transform=ax.transAxes, ha="center", va="center", color="tab:red")
        ax.set_yticks([])
    ax.set_xscale("log")
    ax.set_xticks(lrs)
    ax.set_xticklabels([f"{lr:g}" for lr in lrs])
    ax.minorticks_off()
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss")
    _finish_sweep_figure(fig, ax, (title + ": " if title else "") + "final validation loss vs learning rate "
                         "(mean over seeds)", out)


def sweep_hidden_rms(groups, out, title=None):
    """The hidden state's RMS at every layer boundary, one line per placement: the mean over its
    seeds, a band from min to max. groups: [{"label": str, "rms": [[h_0..h_L] per run]}, ...].
    A logarithmic axis when the values span more than a factor of 20."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    values, L = [], 0
    for i, g in enumerate(groups):
        color = f"C{i % 10}"
        n = len(g["rms"])
        steps, mean, lo, hi = _over_seeds([list(enumerate(rms)) for rms in g["rms"]])
        if not steps:
            continue
        L = max(L, steps[-1])
        ax.plot(steps, mean, "-o", color=color, markersize=4, label=f"{g['label']} ({n} seed{'s' if n != 1 else ''})")
        if n > 1:
            ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
        values += [v for v in lo + hi if v > 0]
    if values and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xticks(range(0, L + 1, max(1, math.ceil((L + 1) / 16))))
    ax.set_xlabel("layer boundary l (0: the embeddings, l: the output of layer l-1)")
    ax.set_ylabel("RMS of the hidden state h_l")
    _finish_sweep_figure(fig, ax, (title + ": " if title else "") + "hidden-state RMS (mean over seeds, band: min..max)",
                         out)


def sweep_layer_drop(groups, out, title=None):
    """The validation loss's rise with each layer dropped, bars side by side per layer, one colour
    per placement: the mean over its seeds, a whisker from min to max.
    groups: [{"label": str, "rises": [[rise of layer 0..L-1] per run]}, ...]."""
    plt = pyplot()
    L = max((len(r) for g in groups for r in g["rises"]), default=1)
    fig, ax = plt.subplots(figsize=(max(8, 0.25 * L * len(groups)), 5))
    width = 0.8 / max(1, len(groups))
    for i, g in enumerate(groups):
        n = len(g["rises"])
        layers, mean, lo, hi = _over_seeds([list(enumerate(r)) for r in g["rises"]])
        if not layers:
            continue
        xs = [l - 0.4 + width * (i + 0.5) for l in layers]
        whiskers = [[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]] if n > 1 else None
        ax.bar(xs, mean, width=width, yerr=whiskers, capsize=2, color=f"C{i % 10}",
               label=f"{g['label']} ({n} seed{'s' if n != 1 else ''})")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(0, L, max(1, math.ceil(L / 16))))
    ax.set_xlabel("layer removed")
    ax.set_ylabel("val loss without the layer - full model val loss")
    _finish_sweep_figure(fig, ax, (title + ": " if title else "") + "loss rise with one layer removed (mean over seeds, "
                         "whiskers: min..max)", out, grid_axis="y")


def sweep_drop_steps(groups, out, title=None, logy=False):
    """Each layer's layer-drop loss (the validation loss's rise with the layer removed) against the
    training step, a panel per placement, a line per layer (viridis, layer 0 dark): the mean over
    the runs analysed at each step. groups: [{"label": str, "runs": [[(step, [rise of layer
    0..L-1]), ...] per run]}, ...], every run of a group as deep as the others."""
    plt = pyplot()
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.5 * max(1, len(groups)), 4.5), sharey=True,
                             squeeze=False)
    colors = plt.get_cmap("viridis")
    for ax, g in zip(axes[0], groups):
        L = max((len(rises) for series in g["runs"] for _, rises in series), default=0)
        for layer in range(L):
            curves = [[(step, rises[layer]) for step, rises in series if layer < len(rises)] for series in g["runs"]]
            steps, mean, _, _ = _over_seeds(curves)
            ax.plot(steps, mean, marker="o", markersize=3, color=colors(layer / max(1, L - 1)),
                    label=f"layer {layer}" if L <= 12 or layer in (0, L // 2, L - 1) else None)
        ax.axhline(0.0, color="black", linewidth=0.8)
        if logy:
            ax.set_yscale("symlog", linthresh=1e-3)
        n = len(g["runs"])
        ax.set_xlabel("step")
        ax.set_title(g["label"] + (f" (mean of {n} runs)" if n > 1 else ""))
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7, ncol=2 if L > 6 else 1)
    axes[0][0].set_ylabel("val loss without the layer - full model val loss")
    fig.suptitle(title or "Loss increase when one layer is removed, over training")
    fig.tight_layout()
    save(fig, out)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="mixln figures: loss curves, per-layer gradient norms, "
                                            "angular distances, layer-drop losses, hidden-state RMS (PNG)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q):
        q.add_argument("--out", required=True, help="PNG file to write")
        q.add_argument("--title", default=None)

    q = sub.add_parser("loss", help="training loss per step and val loss points of one or more runs")
    common(q)
    q.add_argument("logs", nargs="+", metavar="LOG.jsonl")
    q.add_argument("--labels", default=None, help="a,b,...: one per log (default: the run directory names)")
    q.set_defaults(fn=cmd_loss)

    q = sub.add_parser("grads", help="per-layer gradient norms at one step: bars for one run, lines for several")
    common(q)
    q.add_argument("logs", nargs="+", metavar="LOG.jsonl")
    q.add_argument("--step", type=int, default=None, help="the step to show (default: the first with layer_grad_norms)")
    q.add_argument("--labels", default=None, help="a,b,...: one per log (default: the run directory names)")
    q.add_argument("--logy", action="store_true", help="logarithmic y axis")
    q.set_defaults(fn=cmd_grads)

    q = sub.add_parser("angular", help="angular-distance heatmap over (layer l, distance n)")
    common(q)
    q.add_argument("analysis", metavar="ANALYSIS.json")
    q.set_defaults(fn=cmd_angular)

    q = sub.add_parser("drop", help="val loss increase with each layer removed, several models side by side")
    common(q)
    q.add_argument("analyses", nargs="+", metavar="ANALYSIS.json")
    q.add_argument("--labels", default=None, help="a,b,...: one per file (default: the directory names)")
    q.set_defaults(fn=cmd_drop)

    q = sub.add_parser("rms", help="hidden-state RMS at every layer boundary, several models on one plot")
    common(q)
    q.add_argument("analyses", nargs="+", metavar="ANALYSIS.json")
    q.add_argument("--labels", default=None, help="a,b,...: one per file (default: the directory names)")
    q.add_argument("--logy", action="store_true", help="logarithmic y axis")
    q.set_defaults(fn=cmd_rms)

    q = sub.add_parser("lr", help="final val loss against the peak learning rate, from the results.csv of "
                                  "one or more sweeps (their runs pooled by placement)")
    common(q)
    q.add_argument("results", nargs="+", metavar="RESULTS.csv")
    q.set_defaults(fn=cmd_lr)

    q = sub.add_parser("drop-steps", help="each layer's layer-drop loss over training, from a run's analysed snapshots")
    common(q)
    q.add_argument("runs", nargs="+", metavar="RUN", help="run folders with step_NNNNNN/analysis.json")
    q.add_argument("--labels", default=None, help="a,b,...: one per run (default: the run folder names)")
    q.add_argument("--logy", action="store_true", help="symmetric-log y axis (linear within 1e-3 of 0)")
    q.set_defaults(fn=cmd_drop_steps)

    a = p.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
