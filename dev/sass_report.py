"""Instruction mix of the GPU kernels, from the machine code (SASS) nvcc built: no GPU needed.

Where no GPU is at hand, the SASS still says a lot about a kernel's speed: how many tensor-core
products (HMMA) against the other instructions the warps must issue, whether loads are 16 bytes
wide (LDG.E.128) or 2 (LDG.E.U16), whether anything goes to local memory (LDL/STL: spills), where
a library call hides (CALL). This prints, per kernel whose name contains every FILTER, the static
count of each opcode (an instruction counted once however often a loop runs it).

    python3 dev/sass_report.py [--binary train] [--arch sm_90] [--top 24] [FILTER ...]
    python3 dev/sass_report.py tensor_core_kernel 'ILi64E'        # the attention at head size 64

Needs cuobjdump: from the CUDA toolkit, or `pip install nvidia-cuda-cuobjdump` (then set
CUOBJDUMP to its bin/cuobjdump, or put that folder on PATH).
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys

# opcodes kept whole (their width or kind matters); the others are counted by their first part
WHOLE = ("LDG", "STG", "LDS", "STS", "LDL", "STL", "LDSM", "BAR", "MUFU", "HMMA", "SHFL", "ATOM", "RED")


def sass_of(binary, arch, cuobjdump):
    run = subprocess.run([cuobjdump, "-sass", "-arch", arch, binary], capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"sass_report: {cuobjdump} failed on {binary}: {run.stderr.strip() or run.stdout.strip()}")
    return run.stdout


def kernels(sass):
    """(mangled name, Counter of opcodes) per function in the listing."""
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name = part.split("\n", 1)[0].strip()
        ops = collections.Counter()
        # an instruction: /*addr*/ [@P0 | @!P0 | @UP0] OPCODE ...
        for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", part):
            op = m.group(1)
            ops[op if op.startswith(WHOLE) else op.split(".")[0]] += 1
        yield name, ops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("filters", nargs="*", help="substrings every reported kernel name contains")
    ap.add_argument("--binary", default="train")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--top", type=int, default=24, help="opcodes shown per kernel (default 24)")
    a = ap.parse_args()
    cuobjdump = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if not cuobjdump:
        sys.exit("sass_report: cuobjdump not found: install the CUDA toolkit's, or `pip install "
                 "nvidia-cuda-cuobjdump` and set CUOBJDUMP to its bin/cuobjdump")
    if not os.path.exists(a.binary):
        sys.exit(f"sass_report: {a.binary} not found: build it first with make")
    shown = 0
    for name, ops in kernels(sass_of(a.binary, a.arch, cuobjdump)):
        if not all(f in name for f in a.filters):
            continue
        shown += 1
        print(f"{name}: {sum(ops.values())} instructions")
        print("    " + ", ".join(f"{op} {n}" for op, n in ops.most_common(a.top)))
    if shown == 0:
        sys.exit(f"sass_report: no {a.arch} kernel in {a.binary} matches {a.filters}")


if __name__ == "__main__":
    main()
