"""
Quick self-checks of dev/reference.py (a few seconds):

    /usr/bin/python3 dev/test_reference.py

The C++ engine is tested against reference.py, so reference.py itself is checked here: file
round trips, the causal mask, the Post-LN layer count, the lr schedule, autograd against
finite differences in float64, the layer analysis (`analyze`), and dev/plot.py (its figure test
only where matplotlib is installed: python3-matplotlib).
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



# ---- layer analysis (reference.analyze)


def analysis_model(L=3, alpha=1 / 3, seed=0):
    """tiny_model with Linear weights 10x the 0.02 init, so that every layer visibly changes the
    residual stream (at std 0.02 a layer moves it by ~1e-3 and dropping one barely shows)."""
    model = tiny_model(alpha=alpha, L=L, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_proj" in name:
                p.mul_(10.0)
    return model


def test_angular_distance_formula():
    g = torch.Generator().manual_seed(7)
    h = torch.randn(5, 8, generator=g)
    assert torch.equal(ref.angular_distance(h, h), torch.zeros(5, dtype=torch.float64)), "h vs itself must be exactly 0"
    assert torch.allclose(ref.angular_distance(h, -h), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(ref.angular_distance(h, 3.0 * h), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-7)
    e = torch.eye(8)
    assert torch.allclose(ref.angular_distance(e[:2], e[2:4]), torch.full((2,), 0.5, dtype=torch.float64))  # orthogonal


def test_analyze_shapes_ranges_and_loss():
    L, B, T = 3, 2, 6
    model = analysis_model(L=L)
    assert [layer.post_ln for layer in model.model.layers] == [True, False, False]  # Mix-LN 1 of 3
    toks = random_tokens(3 * B * T + 4, 11, 8).numpy()  # 3 whole windows, and a few spare tokens
    res = ref.analyze(model, toks, B, T)
    assert res["tokens"] == 3 * B * T
    loss, n = ref.evaluate(model, toks, B, T)
    assert n == res["tokens"] and abs(res["val_loss"] - loss) < 1e-12, (res["val_loss"], loss)  # same ops, same order
    ad = res["angular_distance"]
    assert [len(row) for row in ad] == [L - l for l in range(L)], "row l must hold n = 1..L-l"
    assert all(0.0 <= v <= 1.0 for row in ad for v in row)
    assert all(v > 1e-4 for row in ad for v in row), "every layer of this model moves the residual stream"
    assert [e["layer"] for e in res["layer_drop"]] == list(range(L))
    for e in res["layer_drop"]:
        assert abs(e["val_loss"] - res["val_loss"]) > 1e-4, f"skipping layer {e['layer']} did not change the loss"
    # --batches K: only the first K windows
    one = ref.analyze(model, toks, B, T, max_batches=1)
    assert one["tokens"] == B * T and abs(one["val_loss"] - ref.evaluate(model, toks, B, T, 1)[0]) < 1e-12
    try:
        ref.analyze(model, toks[:B * T], B, T)  # B*T tokens: no room for the last target
        raise AssertionError("analyze accepted a shard without a whole window")
    except ValueError:
        pass


def test_analyze_matches_hooks_and_removed_layers():
    # Independent of layer_states/logits_from: layer inputs captured by forward pre-hooks during the
    # model's own forward, distances in numpy; a dropped layer by replacing it with nn.Identity.
    import copy
    L, B, T = 3, 2, 6
    model = analysis_model(L=L, seed=1)
    toks = random_tokens(2 * B * T + 1, 11, 9).numpy()
    res = ref.analyze(model, toks, B, T)
    captured = []
    handles = [layer.register_forward_pre_hook(lambda m, inp: captured.append(inp[0][:, -1, :].clone()))
               for layer in model.model.layers]
    handles.append(model.model.norm.register_forward_pre_hook(lambda m, inp: captured.append(inp[0][:, -1, :].clone())))
    sums = np.zeros((L, L))
    with torch.no_grad():
        for k in range(2):
            captured.clear()
            model(ref.batch(toks, k, B, T)[0])
            hs = [c.double().numpy() for c in captured]  # h_0 .. h_L, each (B, C)
            for l in range(L):
                for n in range(1, L - l + 1):
                    a, b = hs[l], hs[l + n]
                    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
                    sums[l, n - 1] += (np.arccos(np.clip(cos, -1, 1)) / np.pi).sum()
    for h in handles:
        h.remove()
    for l in range(L):
        for n in range(1, L - l + 1):
            # 1e-9: float64 rounding of two ways of taking the same norms; the inputs are identical fp32
            assert abs(res["angular_distance"][l][n - 1] - sums[l, n - 1] / (2 * B)) < 1e-9, (l, n)
    for l in range(L):
        cut = copy.deepcopy(model)
        cut.model.layers[l] = torch.nn.Identity()
        want, _ = ref.evaluate(cut, toks, B, T)
        # 1e-6: the same fp32 ops after layer l in both; only the summation over windows may differ
        assert abs(res["layer_drop"][l]["val_loss"] - want) < 1e-6, (l, res["layer_drop"][l]["val_loss"], want)


def test_analyze_identity_pre_ln_layer():
    # A Pre-LN layer with o_proj and down_proj zero adds exactly 0 to both residuals: it is the
    # identity, so dropping it leaves the loss as it is and h_l == h_{l+1}.
    L, B, T = 3, 2, 6
    toks = random_tokens(2 * B * T + 1, 11, 10).numpy()
    for l in (1, 2):  # the Pre-LN layers of Mix-LN 1 of 3
        model = analysis_model(L=L, seed=2)
        assert not model.model.layers[l].post_ln
        with torch.no_grad():
            model.model.layers[l].self_attn.o_proj.weight.zero_()
            model.model.layers[l].mlp.down_proj.weight.zero_()
        res = ref.analyze(model, toks, B, T)
        assert abs(res["layer_drop"][l]["val_loss"] - res["val_loss"]) < 1e-6, (l, res)  # 1e-6: the brief's bound
        assert res["angular_distance"][l][0] == 0.0, "an identity layer moves nothing"
        others = [e for e in res["layer_drop"] if e["layer"] != l]
        assert all(abs(e["val_loss"] - res["val_loss"]) > 1e-4 for e in others)


def test_analyze_cli():
    import contextlib
    import io
    import json
    model = analysis_model(L=3)
    with tempfile.TemporaryDirectory() as d:
        ref.save_checkpoint(model, d)
        shard = os.path.join(d, "val.bin")
        ref.shard_save(shard, random_tokens(3 * 2 * 6 + 1, 11, 11).numpy())
        out = os.path.join(d, "analysis.json")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ref.main(["analyze", "--ckpt", d, "--data", shard, "--batch", "2", "--seq-len", "6",
                      "--batches", "2", "--out", out])
        printed = json.loads(buf.getvalue().strip().splitlines()[-1])
        with open(out) as f:
            written = json.load(f)
    assert printed == written
    assert set(written) == {"val_loss", "tokens", "angular_distance", "layer_drop"}
    assert written["tokens"] == 2 * 2 * 6
    want = ref.analyze(model, random_tokens(3 * 2 * 6 + 1, 11, 11).numpy(), 2, 6, max_batches=2)
    assert abs(written["val_loss"] - want["val_loss"]) < 1e-12  # the checkpoint is fp32, read back exactly


# ---- dev/plot.py

PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot.py")


def run_plot(*args):
    import subprocess
    return subprocess.run([sys.executable, PLOT, *args], capture_output=True, text=True, timeout=120)


def write_synthetic_runs(d, L=4):
    """d/{pre,mix}/log.jsonl (train lines with layer_grad_norms at steps 0 and 5, val lines every
    5 steps) and d/{pre,mix}/analysis.json in the shapes ./train and reference.py analyze write."""
    import json
    for i, name in enumerate(("pre", "mix")):
        os.makedirs(os.path.join(d, name))
        with open(os.path.join(d, name, "log.jsonl"), "w") as f:
            for s in range(10):
                line = {"step": s, "train_loss": 5.0 - 0.3 * s + 0.1 * i, "lr": 1e-3, "grad_norm": 1.0}
                if s % 5 == 0:
                    line["layer_grad_norms"] = [0.5 + 0.1 * l + i for l in range(L)]
                f.write(json.dumps(line) + "\n")
                if s % 5 == 4:
                    f.write(json.dumps({"step": s, "val_loss": 4.9 - 0.3 * s, "tokens": 96}) + "\n")
        with open(os.path.join(d, name, "analysis.json"), "w") as f:
            json.dump({"val_loss": 3.0, "tokens": 96,
                       "angular_distance": [[0.1 * n + 0.01 * l for n in range(1, L - l + 1)] for l in range(L)],
                       "layer_drop": [{"layer": l, "val_loss": 3.0 + 0.1 / (l + 1) + 0.05 * i} for l in range(L)]}, f)


def test_plot_bad_input():
    # Inputs are checked before matplotlib is imported, so this runs with or without it.
    import json
    with tempfile.TemporaryDirectory() as d:
        write_synthetic_runs(d)
        png = os.path.join(d, "x.png")
        empty = os.path.join(d, "empty.jsonl")
        open(empty, "w").close()
        garbage = os.path.join(d, "garbage.jsonl")
        with open(garbage, "w") as f:
            f.write("not json\n{}\n")
        ragged = os.path.join(d, "ragged.json")
        with open(ragged, "w") as f:
            json.dump({"angular_distance": [[0.1, 0.2], [0.3, 0.4]]}, f)  # row 1 must hold 1 entry
        log, analysis = os.path.join(d, "pre", "log.jsonl"), os.path.join(d, "pre", "analysis.json")
        cases = [(("loss", "--out", png, os.path.join(d, "missing.jsonl")), "No such file"),
                 (("loss", "--out", png, empty), "no training or validation lines"),
                 (("loss", "--out", png, garbage), "not valid JSON"),
                 (("loss", "--out", png, log, "--labels", "a,b"), "--labels has 2 labels for 1 files"),
                 (("grads", "--out", png, log, "--step", "3"), "no layer_grad_norms at step 3"),
                 (("angular", "--out", png, ragged), "row 1 has 2 entries, expected 1"),
                 (("angular", "--out", png, log), "not valid JSON"),
                 (("drop", "--out", png, ragged), "val_loss missing")]
        for args, want in cases:
            r = run_plot(*args)
            assert r.returncode == 1 and "error: " in r.stderr and want in r.stderr, (args, r.returncode, r.stderr)
            assert not os.path.exists(png)


def _have_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


HAVE_MATPLOTLIB = _have_matplotlib()

if HAVE_MATPLOTLIB:  # defined (and counted) only when matplotlib is there: skipped is not passed
    def test_plot_figures():
        with tempfile.TemporaryDirectory() as d:
            write_synthetic_runs(d)
            logs = [os.path.join(d, n, "log.jsonl") for n in ("pre", "mix")]
            analyses = [os.path.join(d, n, "analysis.json") for n in ("pre", "mix")]
            runs = {"loss.png": ("loss", *logs, "--labels", "Pre-LN,Mix-LN"),
                    "grads_one.png": ("grads", logs[0], "--step", "5"),
                    "grads_two.png": ("grads", *logs),
                    "angular.png": ("angular", analyses[1]),
                    "drop.png": ("drop", *analyses)}
            for name, args in runs.items():
                out = os.path.join(d, name)
                r = run_plot(args[0], "--out", out, *args[1:])
                assert r.returncode == 0, (args, r.stderr)
                with open(out, "rb") as f:
                    assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"


def _have_transformers():
    try:
        import transformers  # noqa: F401
        return True
    except Exception:
        return False


HAVE_TRANSFORMERS = _have_transformers()

if HAVE_TRANSFORMERS:  # defined (and counted) only where the library is installed
    def test_pre_ln_checkpoint_is_a_stock_hf_llama():
        """A pure Pre-LN checkpoint (same files as ./train writes) loads into Hugging Face's own
        LlamaForCausalLM and gives the reference's logits."""
        import transformers
        cfg = ref.Config.make(61, 32, 2, 4, 72, 16, 0.0)
        model = ref.MixLNForCausalLM(cfg)
        ref.init_weights(model, seed=3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.mul_(1 + 0.1 * torch.randn_like(p))  # so that a misplaced norm weight shows
        d = tempfile.mkdtemp()
        ref.save_checkpoint(model, d)
        hf = transformers.LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
        hf.eval()
        x = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = model(x)[0]
            theirs = hf(x).logits
        # Hugging Face computes the RoPE angles in fp32 (the reference in float64), which at T = 16
        # costs almost nothing: measured 7e-8
        err = float((ours - theirs).norm() / theirs.norm())
        print(f"    Hugging Face LlamaForCausalLM vs reference logits: relative error {err:.2e}")
        assert err < 1e-5, err
        # and a checkpoint written by the engine itself, where ./train is built
        train = os.environ.get("MIXLN_TRAIN", "./train")
        if os.path.exists(train):
            import subprocess
            d2 = tempfile.mkdtemp()
            subprocess.run([train, "--steps", "0", "--norm", "pre", "--layers", "2", "--dim", "32", "--heads", "4",
                            "--ffn", "72", "--vocab", "61", "--seq-len", "16", "--seed", "5", "--out", d2],
                           check=True, capture_output=True)
            engine = ref.load_checkpoint(d2)
            hf2 = transformers.LlamaForCausalLM.from_pretrained(d2, torch_dtype=torch.float32)
            hf2.eval()
            with torch.no_grad():
                err2 = float((engine(x)[0] - hf2(x).logits).norm() / hf2(x).logits.norm())
            print(f"    the same for a checkpoint written by {train}: relative error {err2:.2e}")
            assert err2 < 1e-5, err2


def main():
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
    if not HAVE_TRANSFORMERS:
        print("SKIP test_pre_ln_checkpoint_is_a_stock_hf_llama (not counted): transformers is not installed")
    if not HAVE_MATPLOTLIB:
        print("SKIP test_plot_figures (not counted): matplotlib is not installed "
              "(apt-get install -y --no-install-recommends python3-matplotlib)")
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
