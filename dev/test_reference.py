"""
Quick self-checks of dev/reference.py (a few seconds):

    /usr/bin/python3 dev/test_reference.py

The C++ engine is tested against reference.py, so reference.py itself is checked here: file
round trips, the causal mask, the Post-LN layer count, the lr schedule, and autograd against
finite differences in float64.
"""

import math
import os
import sys
import tempfile
import traceback

import numpy as np
import torch
from torch.nn.utils.stateless import functional_call

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402


def tiny_model(alpha=0.5, L=2, seed=0, V=11, C=8, NH=2, F=12, T=6):
    """A small model whose norm weights are not 1, so they take part in every check."""
    cfg = ref.Config.make(V, C, L, NH, F, T, alpha)
    model = ref.MixLNForCausalLM(cfg)
    gen = ref.init_weights(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ref.is_norm_weight(name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def random_tokens(n, V, seed):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def test_safetensors_round_trip():
    tensors = {
        "a": torch.randn(3, 5),
        "b.weight": torch.arange(-6, 6, dtype=torch.int32).view(2, 3, 2),
        "scalar_like": torch.tensor([2.5]),
        "empty": torch.zeros(0, 4),
    }
    meta = {"lr": "0.01", "note": "héllo"}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.safetensors")
        ref.safetensors_save(path, tensors, meta)
        assert not os.path.exists(path + ".tmp")
        with open(path, "rb") as f:
            (n,) = np.frombuffer(f.read(8), dtype="<u8")
        assert n % 8 == 0, "header must be padded to a multiple of 8"
        back, meta_back = ref.safetensors_load(path)
    assert list(back) == list(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k]), k
    assert meta_back == meta


def test_shard_round_trip():
    with tempfile.TemporaryDirectory() as d:
        for uint32, top in ((False, 2**16), (True, 2**32)):
            toks = np.array([0, 1, 7, top - 1, 12345], dtype=np.int64)
            path = os.path.join(d, "s.bin")
            ref.shard_save(path, toks, uint32=uint32)
            header = np.fromfile(path, dtype="<i4", count=256)
            assert tuple(header[:3]) == ((20240801, 7, 5) if uint32 else (20240520, 1, 5))
            assert not header[3:].any()
            assert os.path.getsize(path) == 1024 + 5 * (4 if uint32 else 2)
            back = ref.shard_load(path)
            assert back.dtype == (np.uint32 if uint32 else np.uint16)
            assert np.array_equal(back.astype(np.int64), toks)


def test_checkpoint_round_trip():
    model = tiny_model(alpha=0.5, L=4)
    x = random_tokens(12, 11, 1).view(2, 6)
    with tempfile.TemporaryDirectory() as d:
        ref.save_checkpoint(model, d)
        back = ref.load_checkpoint(d)
        # wrong shape and missing tensor must both fail loudly
        tensors, _ = ref.safetensors_load(os.path.join(d, "model.safetensors"))
        bad = dict(tensors, **{"lm_head.weight": torch.zeros(3, 3)})
        for broken in (bad, {k: v for k, v in tensors.items() if k != "model.norm.weight"}):
            ref.safetensors_save(os.path.join(d, "model.safetensors"), broken)
            try:
                ref.load_checkpoint(d)
                raise AssertionError("load_checkpoint accepted a broken checkpoint")
            except ValueError:
                pass
    assert back.config == model.config
    names = [n for n, _ in model.named_parameters()]
    assert "model.layers.1.post_feedforward_layernorm.weight" in names  # layer 1 is Post-LN (2 of 4)
    assert "model.layers.2.input_layernorm.weight" in names             # layer 2 is Pre-LN
    with torch.no_grad():
        assert torch.equal(model(x)[0], back(x)[0]), "logits differ after save/load"


def test_causal_mask():
    model = tiny_model(alpha=0.5, L=2)
    x = random_tokens(12, 11, 2).view(2, 6)
    x2 = x.clone()
    x2[:, 4] = (x2[:, 4] + 1) % 11  # change a token at position 4
    with torch.no_grad():
        a, b = model(x)[0], model(x2)[0]
    assert torch.allclose(a[:, :4], b[:, :4], rtol=0, atol=1e-6), "earlier positions saw a future token"
    assert not torch.allclose(a[:, 4:], b[:, 4:]), "later positions ignored the changed token"


def test_post_ln_layers():
    for alpha, L, want in ((0, 12, 0), (0.25, 12, 3), (0.25, 24, 6), (0.29, 100, 29),
                           (0.5, 6, 3), (1, 4, 4), (1.0, 32, 32)):
        got = ref.post_ln_layers_for(alpha, L)
        assert got == want, f"alpha={alpha} L={L}: {got} != {want}"
    assert math.floor(0.29 * 100) == 28  # why the 1e-6 guard exists
    model = tiny_model(alpha=0.25, L=4)
    assert [layer.post_ln for layer in model.model.layers] == [True, False, False, False]


def test_lr_schedule():
    warmup, total, r = 3, 10, 0.1
    assert ref.lr_lambda(0, warmup, total, r) == 0.0
    assert abs(ref.lr_lambda(1, warmup, total, r) - 1 / 3) < 1e-12
    assert abs(ref.lr_lambda(warmup, warmup, total, r) - 1.0) < 1e-12
    assert abs(ref.lr_lambda(total, warmup, total, r) - r) < 1e-12
    fs = [ref.lr_lambda(s, warmup, total, r) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(fs, fs[1:])), "cosine part must not increase"
    assert ref.lr_lambda(0, 0, 10, r) == 1.0  # no warmup: full lr from step 0


def test_batches():
    toks = np.arange(2 * 3 * 4 + 5)  # 29 tokens, B*T = 12 -> 2 whole batches
    assert ref.num_batches(len(toks), 3, 4) == 2
    x, y = ref.batch(toks, 1, 3, 4)
    assert x.shape == (3, 4) and x[0, 0] == 12 and y[0, 0] == 13 and y[-1, -1] == 24


def test_gradcheck_float64():
    # Autograd vs central finite differences in float64 for weights of a Post-LN layer (0),
    # a Pre-LN layer (1), and the global tensors.
    model = tiny_model(alpha=0.5, L=2).double()
    x = random_tokens(12, 11, 3).view(2, 6)
    y = random_tokens(12, 11, 4).view(2, 6)
    names = ["model.embed_tokens.weight",
             "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.post_attention_layernorm.weight",
             "model.layers.0.post_feedforward_layernorm.weight",
             "model.layers.1.input_layernorm.weight",
             "model.layers.1.self_attn.k_proj.weight",
             "model.layers.1.mlp.down_proj.weight",
             "model.norm.weight",
             "lm_head.weight"]
    params = dict(model.named_parameters())
    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)

    def loss_of(*ws):
        return functional_call(model, dict(zip(names, ws)), (x, y))[1]

    assert torch.autograd.gradcheck(loss_of, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_train_matches_cli_semantics():
    # train() must record the loss before each update and walk batches 0,1,... wrapping to 0.
    model = tiny_model(alpha=0.5, L=2)
    toks = random_tokens(2 * 2 * 6 + 1, 11, 5).numpy()  # exactly 2 batches of 2x6
    with torch.no_grad():
        loss0 = float(model(*ref.batch(toks, 0, 2, 6))[1])
    log = ref.train(model, toks, 2, 6, steps=3, lr=1e-2, warmup=1, min_lr_ratio=0.1,
                    weight_decay=0.0, grad_clip=0.0)
    assert abs(log[0][0] - loss0) < 1e-6 and log[0][1] == 0.0
    assert abs(log[1][1] - 1e-2) < 1e-12


def main():
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
    failed = 0
    for name, fn in tests:
        try:
            fn()
            print(f"PASS {name}")
        except Exception:
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
    print(f"reference self-checks: {len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
