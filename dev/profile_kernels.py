"""Per-kernel GPU time of a training run, from Nsight Compute (ncu), as a table sorted by time.

    python3 dev/profile_kernels.py [--steps 2] [--top 30] -- ./train --device cuda --model llama-71m ...

Runs the command under `ncu --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum,
dram__bytes_write.sum` (each kernel's duration and the bytes it moved to and from the GPU's
memory, clocks as found: --clock-control none), adds them up per kernel (the name up to its
argument list, template arguments kept) and prints per kernel: its calls, its time per training
step (the total over --steps, which must be the run's step count), the time per call, its share
of the GPU time, the memory traffic per call and the rate it ran at. A memory-bound kernel far
below the GPU's bandwidth (an H200's is 4.8 TB/s) is waiting on something; a matmul or the
attention at a low rate is compute-bound, as it should be. `--time-only` leaves the byte counters
out. The device check runs it on the bf16 LLaMA-71M step. Needs ncu on PATH (the CUDA toolkit's,
/usr/local/cuda/bin).
"""
import argparse
import csv
import io
import subprocess
import sys
from collections import defaultdict

UNIT_TO_MS = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0,
              "second": 1e3, "s": 1e3}


UNIT_TO_BYTES = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}
DRAM_METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum")


def kernel_times(csv_text):
    """{kernel name: [calls, total ms, total DRAM bytes or None]} from ncu's per-launch CSV (one row
    per launch and metric; the bytes are None where ncu gave no DRAM counters)."""
    lines = csv_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError("no CSV header (a line starting with \"ID\") in ncu's output")
    times = defaultdict(lambda: [0, 0.0, None])
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        metric = row.get("Metric Name")
        if metric not in ("gpu__time_duration.sum",) + DRAM_METRICS:
            continue
        unit = row["Metric Unit"].strip()
        value = float(row["Metric Value"].replace(",", ""))
        name = row["Kernel Name"].split("(")[0].strip().removeprefix("void ")
        entry = times[name]
        if metric == "gpu__time_duration.sum":
            if unit not in UNIT_TO_MS:
                raise ValueError(f"unknown time unit {unit!r}")
            entry[0] += 1
            entry[1] += value * UNIT_TO_MS[unit]
        else:
            if unit not in UNIT_TO_BYTES:
                raise ValueError(f"unknown byte unit {unit!r}")
            entry[2] = (entry[2] or 0.0) + value * UNIT_TO_BYTES[unit]
    times = {name: entry for name, entry in times.items() if entry[0] > 0}
    if not times:
        raise ValueError("ncu's CSV holds no gpu__time_duration.sum rows")
    return times


def traffic_columns(calls, ms, dram_bytes):
    """The table's last two cells: MB moved per call and the rate in TB/s ("-" without counters)."""
    if dram_bytes is None or ms <= 0:
        return f"{'-':>8} {'-':>6}"
    return f"{dram_bytes / calls / 1e6:>8.1f} {dram_bytes / (ms * 1e-3) / 1e12:>6.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="training steps the command runs (per-step times)")
    parser.add_argument("--top", type=int, default=30, help="kernels to print, longest first")
    parser.add_argument("--time-only", action="store_true", help="durations only, no DRAM byte counters")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to profile after --")
    metrics = ["gpu__time_duration.sum"] + ([] if args.time_only else list(DRAM_METRICS))
    ncu = ["ncu", "--csv", "--clock-control", "none", "--metrics", ",".join(metrics)] + command
    result = subprocess.run(ncu, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
        sys.exit(f"error: ncu exited with {result.returncode}")
    times = kernel_times(result.stdout)
    total = sum(ms for _, ms, _ in times.values())
    print(f"GPU time per step: {total / args.steps:.2f} ms over {sum(c for c, _, _ in times.values())} launches "
          f"({args.steps} steps)")
    print(f"{'kernel':<72} {'calls/step':>10} {'ms/step':>8} {'us/call':>8} {'share':>6} {'MB/call':>8} {'TB/s':>6}")
    for name, (calls, ms, dram_bytes) in sorted(times.items(), key=lambda item: -item[1][1])[:args.top]:
        print(f"{name[:72]:<72} {calls / args.steps:>10.1f} {ms / args.steps:>8.3f} {1000 * ms / calls:>8.1f} "
              f"{100 * ms / total:>5.1f}% {traffic_columns(calls, ms, dram_bytes)}")


if __name__ == "__main__":
    main()
