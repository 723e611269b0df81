#!/usr/bin/env bash
# The one-command demo (make demo): real English text to a trained Mix-LN model and its samples.
#   1. installs what it needs (Debian's King James Bible and its reader; the tokenizers library)
#   2. builds ./train
#   3. prepares the KJV as token shards with a BPE tokenizer of 4096 trained on it (data/kjv)
#   4. trains an 8-layer Mix-LN model (2 of 8 layers Post-LN) for 1000 steps, a few minutes on
#      2 CPU cores, validating and checkpointing every 250 steps (runs/demo)
#   5. evaluates the checkpoint and prints a few samples of generated text
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/usr/bin/python3}
STEPS=${STEPS:-1000}

echo "== 1. dependencies"
if ! "$PYTHON" -c 'import numpy, torch' 2>/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-torch python3-numpy libopenblas0-pthread
fi
"$PYTHON" -c 'import tokenizers' 2>/dev/null || "$PYTHON" -m pip install -q --break-system-packages --no-deps 'tokenizers>=0.19'

echo "== 2. build"
make train

echo "== 3. data: the King James Bible, BPE 4096"
[ -f data/kjv/meta.json ] || "$PYTHON" dev/data/prepare.py --corpus kjv --tokenizer bpe --vocab-size 4096 --out data/kjv

echo "== 4. train: 8 layers, width 128, Mix-LN alpha 0.25, $STEPS steps of 16 x 128 tokens"
if [ -f runs/demo/training_state.safetensors ] && ! grep -q "\"step\": $((STEPS - 1))," runs/demo/log.jsonl 2>/dev/null; then
    ./train --resume runs/demo          # an interrupted demo picks up where it stopped
elif [ ! -f runs/demo/training_state.safetensors ]; then
    ./train --layers 8 --dim 128 --heads 4 --ffn 344 --vocab 4096 --seq-len 128 --norm mix --alpha 0.25 \
        --train-data 'data/kjv/train_*.bin' --val-data 'data/kjv/val_*.bin' --val-every 250 --val-batches 20 \
        --batch 16 --steps "$STEPS" --lr 2e-3 --warmup 100 --checkpoint-every 250 --layer-grads-every 50 --out runs/demo
fi

echo "== 5. evaluate and sample"
./train --init-from runs/demo --eval-only --val-data 'data/kjv/val_*.bin' --batch 16 | tail -n 1
"$PYTHON" dev/sample.py --ckpt runs/demo --data data/kjv --prompt "And God said" --tokens 60 --samples 3
echo "checkpoint and log: runs/demo (figures: python3 dev/plot.py loss --out loss.png runs/demo/log.jsonl)"
