"""Per-kernel GPU time of a training run, from Nsight Compute (ncu), as a table sorted by time.

    python3 dev/profile_kernels.py [--steps 2] [--top 30] -- ./train --device cuda --model llama-71m ...

Runs the command under `ncu --csv --metrics gpu__time_duration.sum` (each kernel's duration, one
replay pass per launch, clocks as found: --clock-control none), adds the durations per kernel
(the name up to its argument list, template arguments kept) and prints per kernel: its calls,
its time per training step (the total over --steps, which must be the run's step count), the
time per call and its share of the GPU time. The device check runs it on the bf16 LLaMA-71M
step. Needs ncu on PATH (the CUDA toolkit's, /usr/local/cuda/bin).
"""
import argparse
import csv
import io
import subprocess
import sys
from collections import defaultdict

UNIT_TO_MS = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0,
              "second": 1e3, "s": 1e3}


def kernel_times(csv_text):
    """{kernel name: [calls, total ms]} from ncu's per-launch CSV."""
    lines = csv_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError("no CSV header (a line starting with \"ID\") in ncu's output")
    times = defaultdict(lambda: [0, 0.0])
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = row["Metric Unit"].strip()
        if unit not in UNIT_TO_MS:
            raise ValueError(f"unknown time unit {unit!r}")
        value = float(row["Metric Value"].replace(",", ""))
        name = row["Kernel Name"].split("(")[0].strip().removeprefix("void ")
        times[name][0] += 1
        times[name][1] += value * UNIT_TO_MS[unit]
    if not times:
        raise ValueError("ncu's CSV holds no gpu__time_duration.sum rows")
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="training steps the command runs (per-step times)")
    parser.add_argument("--top", type=int, default=30, help="kernels to print, longest first")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to profile after --")
    ncu = ["ncu", "--csv", "--clock-control", "none", "--metrics", "gpu__time_duration.sum"] + command
    result = subprocess.run(ncu, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
        sys.exit(f"error: ncu exited with {result.returncode}")
    times = kernel_times(result.stdout)
    total = sum(ms for _, ms in times.values())
    print(f"GPU time per step: {total / args.steps:.2f} ms over {sum(c for c, _ in times.values())} launches "
          f"({args.steps} steps)")
    print(f"{'kernel':<72} {'calls/step':>10} {'ms/step':>8} {'us/call':>8} {'share':>6}")
    for name, (calls, ms) in sorted(times.items(), key=lambda item: -item[1][1])[:args.top]:
        print(f"{name[:72]:<72} {calls / args.steps:>10.1f} {ms / args.steps:>8.3f} {1000 * ms / calls:>8.1f} "
              f"{100 * ms / total:>5.1f}%")


if __name__ == "__main__":
    main()
