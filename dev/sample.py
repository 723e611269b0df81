"""Text from a trained model: the prompt is encoded with the tokenizer saved beside the data
(dev/data/prepare.py), ./train --sample generates token ids with the engine itself, and the ids
are decoded back to text.

    python3 dev/sample.py --ckpt runs/kjv-mix --data data/kjv --prompt "And God said" \
        [--tokens 200] [--temperature 0.8] [--top-k 40] [--seed 1] [--samples 3]

A document begins as it began in training: after the separator in a stream of documents; at the
row's first token in data of one document per row (prepare.py --rows), where the separator ends
a document, so the sample ends there too (./train --stop-id).
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
import tokenizer as tokenizers  # noqa: E402  dev/data/tokenizer.py


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint directory (model.safetensors + config.json)")
    ap.add_argument("--data", required=True, help="prepared data directory holding the tokenizer and meta.json")
    ap.add_argument("--prompt", default="", help="text to continue (default: the start of a document)")
    ap.add_argument("--tokens", type=int, default=200, help="tokens to generate per sample")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--train", default="./train", help="the engine binary")
    a = ap.parse_args()
    try:
        tok = tokenizers.load_tokenizer(a.data)
        meta = tokenizers.read_meta(a.data)
    except Exception as e:  # the tokenizer module's own errors name the problem
        sys.exit(f"error: {e}")
    separator = meta.get("separator_id")
    rows = meta.get("rows") is not None
    # a document starts as in training: after the separator in a stream, at the row's start in rows
    ids = ([separator] if separator is not None and not rows else []) + tok.encode(a.prompt)
    if not ids:
        sys.exit("error: empty prompt and no document separator to start from" if not rows else
                 "error: empty prompt: with one document per row a document starts at its own first token")
    stop = ["--stop-id", str(separator)] if rows and separator is not None else []
    for i in range(a.samples):
        cmd = [a.train, "--init-from", a.ckpt, "--sample", str(a.tokens), "--prompt-ids", ",".join(map(str, ids)),
               "--temperature", str(a.temperature), "--top-k", str(a.top_k), "--seed", str(a.seed + i)] + stop
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(run.stderr.strip() or f"error: {a.train} failed")
        generated = json.loads(run.stdout.strip().splitlines()[-1])["ids"]
        print(f"--- sample {i + 1} (seed {a.seed + i})")
        print(a.prompt + tok.decode(generated, skip_separator=True))


if __name__ == "__main__":
    main()
