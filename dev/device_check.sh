#!/usr/bin/env bash
# The device check: everything that needs a real GPU, in one run of a few minutes.
#   1. build ./train and the GPU tests for sm_90 (the H200), with warnings as errors
#   2. run every GPU test: each kernel against its CPU twin (fp32 and bf16), the whole model
#      against the PyTorch fixtures (fp32, and bf16 against the reference's bf16 emulation),
#      determinism
#   3. compute-sanitizer memcheck and racecheck over a tiny training run on the GPU (and memcheck
#      over one with a layer of every placement kind under LayerNorm, with the fused attention,
#      over bf16 and bf16-pure runs, and racecheck over the tensor-core attention in bf16)
#   4. time training steps of LLaMA-71M on the GPU, and against PyTorch (dev/bench_gpu.py)
#   5. print a table of what passed and how long it took
# Usage (repository root): bash dev/device_check.sh        logs go to $OUT (or /tmp/device_check)
# The device machine has no network: where the system has no Catch2 header, carry one along in
# build/catch2-include/catch2/catch.hpp (copy it from /usr/include/catch2 on a development machine).
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${OUT:-/tmp/device_check}
mkdir -p "$logs"
export PATH="/usr/local/cuda/bin:/usr/local/cuda/compute-sanitizer:$PATH"
PYTHON=${PYTHON:-python3}
MAKE_ARGS=(CUDA_ARCHS=90 PYTHON="$PYTHON")
[ -f /usr/include/catch2/catch.hpp ] || MAKE_ARGS+=(CATCH_INCLUDE="$PWD/build/catch2-include")

results=()
run_step() {   # run_step NAME COMMAND...: runs, logs, records pass/fail and seconds
    local name=$1
    shift
    local start=$SECONDS
    echo "== $name: $*"
    if "$@" >"$logs/$name.log" 2>&1; then local status=passed; else local status=FAILED; fi
    tail -n 15 "$logs/$name.log"
    results+=("$(printf '%-22s %-7s %4ds' "$name" "$status" $((SECONDS - start)))")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(nvidia-smi not available)"

run_step build make -j8 "${MAKE_ARGS[@]}" train build/test_gpu build/fixtures/done
run_step gpu_tests env MIXLN_FIXTURES=build/fixtures MIXLN_REQUIRE_GPU=1 ./build/test_gpu

# a tiny run on random tokens for the sanitizers
"$PYTHON" - <<'EOF'
import sys
sys.path.insert(0, "dev")
import numpy as np
import reference
reference.shard_save("build/device_check_tokens.bin", np.random.default_rng(0).integers(0, 512, 64 * 64 * 4 + 1))
EOF
TINY=(--device cuda --model tiny --batch 4 --seq-len 64 --steps 2 --train-data build/device_check_tokens.bin)
run_step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 ./train "${TINY[@]}" --attention simple
run_step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 ./train "${TINY[@]}" --attention fused
# the other placements' kernels (LayerNorm, the scaled adds, the peri norms) under memcheck too
run_step memcheck_zoo compute-sanitizer --tool memcheck --error-exitcode 1 ./train "${TINY[@]}" \
    --norm-layers post,deepnorm,peri,lns --norm-type layernorm --attention fused
# the bf16 instantiations of every kernel, and cuBLASLt's bf16 products
run_step memcheck_bf16 compute-sanitizer --tool memcheck --error-exitcode 1 ./train "${TINY[@]}" \
    --norm-layers post,deepnorm,peri,lns --norm-type layernorm --precision bf16 --attention simple
run_step memcheck_bf16_pure compute-sanitizer --tool memcheck --error-exitcode 1 ./train "${TINY[@]}" \
    --attention fused --precision bf16-pure
# the tensor-core attention (bf16, the tiny model's head size 16) shares tiles and per-warp
# buffers in shared memory: racecheck it
run_step racecheck_bf16_fused compute-sanitizer --tool racecheck --error-exitcode 1 ./train "${TINY[@]}" \
    --attention fused --precision bf16

# throughput of the paper's 71M model on the GPU, fp32 and bf16, simple and fused attention
"$PYTHON" - <<'EOF'
import sys
sys.path.insert(0, "dev")
import numpy as np
import reference
reference.shard_save("build/device_check_71m.bin", np.random.default_rng(1).integers(0, 32000, 64 * 256 * 12 + 1))
EOF
run_step train_71m ./train --device cuda --attention simple --model llama-71m --batch 64 --steps 10 --train-data build/device_check_71m.bin
grep -E '^step (9|10)/10' "$logs/train_71m.log" || true
run_step train_71m_fused ./train --device cuda --attention fused --model llama-71m --batch 64 --steps 10 --train-data build/device_check_71m.bin
grep -E '^step (9|10)/10' "$logs/train_71m_fused.log" || true
run_step train_71m_bf16 ./train --device cuda --precision bf16 --attention simple --model llama-71m --batch 64 --steps 10 --train-data build/device_check_71m.bin
grep -E '^step (9|10)/10' "$logs/train_71m_bf16.log" || true
run_step train_71m_bf16_fused ./train --device cuda --precision bf16 --attention fused --model llama-71m --batch 64 --steps 10 --train-data build/device_check_71m.bin
grep -E '^step (9|10)/10' "$logs/train_71m_bf16_fused.log" || true
if [ -f dev/bench_gpu.py ]; then
    run_step bench_gpu "$PYTHON" dev/bench_gpu.py --configs llama-71m
fi

echo
echo "== device check summary ($(date -u +%Y-%m-%d))"
printf '%s\n' "${results[@]}"
! printf '%s\n' "${results[@]}" | grep -q FAILED
