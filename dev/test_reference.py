"""
Quick self-checks of dev/reference.py (a few seconds):

    /usr/bin/python3 dev/test_reference.py

The C++ engine is tested against reference.py, so reference.py itself is checked here: file
round trips, the causal mask, the Post-LN layer count, the lr schedule, autograd against
finite differences in float64, the layer analysis (`analyze`), and dev/plot.py (its figure test
only where matplotlib is installed: python3-matplotlib). The norm placements (pre, post, peri,
deepnorm, lns; RMSNorm or LayerNorm): each layer kind's equations and tensor names, LayerNorm
against torch's, gradients through every kind, config.json's norm_layers / norm_type (round trip
and bad input), DeepNet and scaled init statistics, and the CLI flags. The bf16 emulation
(--precision bf16 / bf16-pure): rounding to nearest even, the fp32 model unchanged, the forward
bit for bit against the storage points written out again here, stored values and activation
gradients bf16, weight gradients fp32 or bf16, closeness to fp32 (bounds argued in the test),
the optimizer state per mode, the bf16-pure AdamW step, and the CLI flag.
"""

import math
import operator
import os
import sys
import tempfile
import traceback

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.stateless import functional_call

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402


def tiny_model(alpha=0.5, L=2, seed=0, V=11, C=8, NH=2, F=12, T=6, norm_layers=None, norm_type="rmsnorm"):
    """A small model whose norm weights are not 1 (and LayerNorm biases not 0), so they take part
    in every check. norm_layers, when given, overrides alpha."""
    cfg = ref.Config.make(V, C, L, NH, F, T, alpha, norm_layers=norm_layers, norm_type=norm_type)
    model = ref.MixLNForCausalLM(cfg)
    gen = ref.init_weights(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ref.is_norm_weight(name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif ref.is_norm_bias(name):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
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
    # the other schedules share the warmup; linear and wsd decay in a straight line to r at `total`
    for schedule in ("linear", "constant", "wsd"):
        assert ref.lr_lambda(1, warmup, total, r, schedule, 4) == 1 / 3
        assert ref.lr_lambda(warmup, warmup, total, r, schedule, 4) == 1.0
    assert abs(ref.lr_lambda(total, warmup, total, r, "linear") - r) < 1e-12
    assert abs(ref.lr_lambda(6, warmup, total, r, "linear") - (r + (1 - r) * 4 / 7)) < 1e-12
    assert all(ref.lr_lambda(s, warmup, total, r, "constant") == 1.0 for s in range(warmup, total + 1))
    # wsd with 4 decay steps: the peak through step 6, then 3/4, 2/4, 1/4 of the way down, r at 10
    wsd = [ref.lr_lambda(s, warmup, total, r, "wsd", 4) for s in range(total + 1)]
    assert wsd[warmup:7] == [1.0] * 4
    for s, left in zip(range(7, 11), (0.75, 0.5, 0.25, 0.0)):
        assert abs(wsd[s] - (r + (1 - r) * left)) < 1e-12, (s, wsd[s])
    # wsd-sqrt: 1 - sqrt of the way: a quarter into the decay, halfway down
    sq = [ref.lr_lambda(s, warmup, total, r, "wsd-sqrt", 4) for s in range(total + 1)]
    assert sq[warmup:7] == [1.0] * 4 and abs(sq[7] - (r + (1 - r) * 0.5)) < 1e-12 and abs(sq[10] - r) < 1e-12
    # a decay that fills everything after the warmup is the linear schedule
    assert all(ref.lr_lambda(s, warmup, total, r, "wsd", total - warmup) == ref.lr_lambda(s, warmup, total, r, "linear")
               for s in range(total + 1))
    # the decay's length as train rounds it: float32 fraction, half away from zero
    assert ref.wsd_decay_steps(0.2, 10) == 2 and ref.wsd_decay_steps(0.25, 10) == 3
    assert ref.wsd_decay_steps(0.35, 10) == 3   # 0.35 in float32 is 0.3499999940...


def test_shuffled_order():
    # train's --data-order shuffled: a permutation per epoch, a function of (seed, epoch) only
    orders = [ref.shuffled_order(10, 5, e) for e in range(3)]
    assert all(sorted(o) == list(range(10)) for o in orders)
    assert orders[0] != orders[1] != orders[2] and orders[0] != list(range(10))
    assert ref.shuffled_order(10, 5, 1) == orders[1] and ref.shuffled_order(10, 6, 1) != orders[1]
    assert ref.shuffled_order(1, 5, 0) == [0] and ref.shuffled_order(0, 5, 0) == []
    # splitmix64's output function, against the reference values of its published C code (state 0
    # advanced once: the first output of a generator seeded with 0)
    assert ref.splitmix64_mix(ref.SPLITMIX64_STEP) == 0xE220A8397B1DCDAF


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



# ---- norm placements (norm_layers) and norm types (norm_type)
#
# Written from the contract, not from reference.py: the kinds, their norm names and equations.

KINDS = ("pre", "post", "peri", "deepnorm", "lns", "hybrid", "preqkv")
ZOO = ["post", "deepnorm", "peri", "lns", "pre"]  # one layer of each kind
KIND_NORMS = {  # a layer's norms by kind, as N1, (N1o,) N2, (N2o)
    "pre":      ["input_layernorm", "post_attention_layernorm"],
    "lns":      ["input_layernorm", "post_attention_layernorm"],
    "post":     ["post_attention_layernorm", "post_feedforward_layernorm"],
    "deepnorm": ["post_attention_layernorm", "post_feedforward_layernorm"],
    "peri":     ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"],
    # HybridNorm: QKV-Norm inside the attention (OLMo-2's names), N2 after the MLP residual add
    "hybrid":   ["self_attn.q_norm", "self_attn.k_norm", "self_attn.v_norm", "post_feedforward_layernorm"],
    # HybridNorm*'s first layer: pre's N1 and N2, and hybrid's QKV-Norm inside the attention
    "preqkv":   ["input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm",
                 "self_attn.v_norm"],
}


def expect_raises(fn, *phrases, exc=ValueError):
    """fn() must raise exc with every phrase in its message."""
    try:
        fn()
    except exc as e:
        for phrase in phrases:
            assert phrase in str(e), (phrase, str(e))
        return
    raise AssertionError(f"no {exc.__name__} (wanted one mentioning {phrases})")


def test_norm_layers_helpers():
    assert ref.norm_layers_for_alpha(0.25, 4) == ["post", "pre", "pre", "pre"]
    assert ref.norm_layers_for_alpha(0.0, 3) == ["pre"] * 3 and ref.norm_layers_for_alpha(1.0, 3) == ["post"] * 3
    assert ref.norm_layers_for_alpha(0.29, 100).count("post") == 29
    assert ref.parse_norm_layers("post, deepnorm,peri,lns ,pre") == ZOO
    assert ref.parse_norm_layers("post,pre", 2) == ["post", "pre"]
    expect_raises(lambda: ref.parse_norm_layers("post,pre", 3), "2 entries", "3 layers")
    expect_raises(lambda: ref.parse_norm_layers("post,sandwich"), "'sandwich'", "norm_layers[1]")
    expect_raises(lambda: ref.parse_norm_layers("post,,pre"), "''")
    for kinds, k in ((["pre"] * 3, 0), (["post"] * 3, 3), (["post", "post", "pre"], 2), ([], 0),
                     (["pre", "post"], None), (["post", "peri"], None), (["lns"], None), (["deepnorm"], None)):
        assert ref.mixln_post_count(kinds) == k, (kinds, ref.mixln_post_count(kinds))
    # the Config keeps post_ln_layers / mixln_alpha describing the list
    cfg = ref.Config.make(11, 8, 4, 2, 12, 6, 0.3)
    assert cfg.norm_layers == ["post", "pre", "pre", "pre"] and cfg.post_ln_layers == 1 and cfg.mixln_alpha == 0.3
    cfg = ref.Config.make(11, 8, 4, 2, 12, 6, 0.3, norm_layers=["post", "post", "pre", "pre"])  # list wins
    assert cfg.post_ln_layers == 2 and cfg.mixln_alpha == 0.5, cfg   # 0.3 gives 1, not 2: alpha = k/L
    cfg = ref.Config.make(11, 8, 4, 2, 12, 6, norm_layers=["peri"] * 4)
    assert cfg.post_ln_layers is None and cfg.mixln_alpha is None
    old = ref.Config(vocab_size=11, hidden_size=8, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=12, max_position_embeddings=6, post_ln_layers=3)
    assert old.norm_layers == ["post"] * 3 + ["pre"] and old.mixln_alpha == 0.75 and old.norm_type == "rmsnorm"
    expect_raises(lambda: ref.Config(vocab_size=11, hidden_size=8, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=12, max_position_embeddings=6, post_ln_layers=2,
                                     norm_layers=["post", "pre", "pre", "pre"]), "disagrees")


def test_layernorm_matches_torch():
    g = torch.Generator().manual_seed(21)
    for dtype in (torch.float64, torch.float32):
        for eps in (1e-6, 0.5):  # a large eps shows where it is added
            norm = ref.LayerNorm(16, eps).to(dtype)
            with torch.no_grad():
                norm.weight.copy_(1 + 0.3 * torch.randn(16, generator=g))
                norm.bias.copy_(0.3 * torch.randn(16, generator=g))
            x = (3 * torch.randn(2, 5, 16, generator=g) + 1.5).to(dtype)  # off-centre, so the mean matters
            want = F.layer_norm(x, (16,), norm.weight, norm.bias, eps)
            tol = 1e-12 if dtype == torch.float64 else 2e-6
            assert torch.allclose(norm(x), want, rtol=0, atol=tol), (dtype, eps, float((norm(x) - want).abs().max()))
    fresh = ref.LayerNorm(4, 1e-6)
    assert torch.equal(fresh.weight, torch.ones(4)) and torch.equal(fresh.bias, torch.zeros(4))
    # both norm types take the config's rms_norm_eps
    for norm_type, cls in (("rmsnorm", ref.RMSNorm), ("layernorm", ref.LayerNorm)):
        cfg = ref.Config.make(11, 8, 1, 2, 12, 6, 0.0, norm_type=norm_type)
        cfg.rms_norm_eps = 0.125
        norm = ref.make_norm(cfg)
        assert type(norm) is cls and norm.eps == 0.125


def layer_by_equation(layer, kind, x, l, L):
    """The contract's equations for one layer, from its submodules by name."""
    A, M = layer.self_attn, layer.mlp
    n1, *rest = [operator.attrgetter(name)(layer) for name in KIND_NORMS[kind]]
    if kind == "hybrid":  # the QKV norms are inside A: see spec_forward
        h = x + A(x)
        return rest[-1](h + M(h))
    if kind in ("pre", "preqkv"):  # (preqkv: A normalises q, k and v too)
        h = x + A(n1(x))
        return h + M(rest[0](h))
    if kind == "post":
        h = n1(x + A(x))
        return rest[0](h + M(h))
    if kind == "peri":
        n1o, n2, n2o = rest
        h = x + n1o(A(n1(x)))
        return h + n2o(M(n2(h)))
    if kind == "deepnorm":
        a = (2 * L) ** 0.25
        h = n1(a * x + A(x))
        return rest[0](a * h + M(h))
    s = 1 / math.sqrt(l + 1)  # lns
    h = x + A(n1(x) * s)
    return h + M(rest[0](h) * s)


def test_layer_equations_every_kind():
    g = torch.Generator().manual_seed(22)
    for norm_type in ("rmsnorm", "layernorm"):
        for kind in KINDS:
            model = tiny_model(L=3, seed=4, norm_layers=[kind] * 3, norm_type=norm_type)
            x = torch.randn(2, 6, 8, generator=g)
            with torch.no_grad():
                for l, layer in enumerate(model.model.layers):
                    assert layer.kind == kind
                    got, want = layer(x), layer_by_equation(layer, kind, x, l, 3)
                    assert torch.allclose(got, want, rtol=0, atol=1e-6), (norm_type, kind, l)
    # the zoo model is those layers in a row, then the final norm and the head
    model = tiny_model(L=5, seed=5, norm_layers=ZOO, norm_type="layernorm")
    tokens = random_tokens(12, 11, 23).view(2, 6)
    with torch.no_grad():
        h = model.model.embed_tokens(tokens)
        for l, kind in enumerate(ZOO):
            h = layer_by_equation(model.model.layers[l], kind, h, l, 5)
        want = model.lm_head(model.model.norm(h))
        assert torch.allclose(model(tokens)[0], want, rtol=0, atol=1e-5)


def test_lns_scales_norm_outputs():
    # Layer l's attention and MLP inputs are 1/sqrt(l+1) times what its norms return.
    L = 4
    model = tiny_model(L=L, seed=6, norm_layers=["lns"] * L)
    seen = {}
    hooks = []
    for l, layer in enumerate(model.model.layers):
        for mod, key in ((layer.input_layernorm, "n1"), (layer.post_attention_layernorm, "n2")):
            hooks.append(mod.register_forward_hook(lambda m, i, o, l=l, key=key: seen.__setitem__((l, key), o)))
        for mod, key in ((layer.self_attn, "attn_in"), (layer.mlp, "mlp_in")):
            hooks.append(mod.register_forward_pre_hook(lambda m, i, l=l, key=key: seen.__setitem__((l, key), i[0])))
    with torch.no_grad():
        model(random_tokens(12, 11, 24).view(2, 6))
    for h in hooks:
        h.remove()
    for l in range(L):
        s = 1 / math.sqrt(l + 1)
        for norm_key, in_key in (("n1", "attn_in"), ("n2", "mlp_in")):
            assert torch.allclose(seen[(l, in_key)], s * seen[(l, norm_key)], rtol=1e-6, atol=0), (l, in_key)
            if l > 0:
                assert not torch.allclose(seen[(l, in_key)], seen[(l, norm_key)], rtol=1e-3, atol=0)
    # the final norm is never scaled
    assert not hasattr(model.model.norm, "lns_scale")


def test_gradcheck_every_kind_float64():
    # Autograd vs central finite differences through each kind (L=2 all of one kind, RMSNorm) and
    # through the zoo (one layer of each kind) with LayerNorm: every norm weight and bias, the
    # embedding (its gradient passes through every layer) and layer 0's v_proj.
    x = random_tokens(12, 11, 25).view(2, 6)
    y = random_tokens(12, 11, 26).view(2, 6)
    setups = [([kind] * 2, "rmsnorm") for kind in KINDS] + [(ZOO, "layernorm")]
    for norm_layers, norm_type in setups:
        model = tiny_model(L=len(norm_layers), seed=7, norm_layers=norm_layers, norm_type=norm_type).double()
        params = dict(model.named_parameters())
        names = [n for n in params if ref.is_norm_param(n)]
        names += ["model.embed_tokens.weight", "model.layers.0.self_attn.v_proj.weight"]
        inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)

        def loss_of(*ws):
            return functional_call(model, dict(zip(names, ws)), (x, y))[1]

        assert torch.autograd.gradcheck(loss_of, inputs, eps=1e-6, atol=1e-7, rtol=1e-5), (norm_layers, norm_type)


def test_checkpoint_names_per_kind():
    linear = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
              "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    for norm_type in ("rmsnorm", "layernorm"):
        suffixes = ["weight"] if norm_type == "rmsnorm" else ["weight", "bias"]
        for kind in KINDS:
            model = tiny_model(L=2, norm_layers=[kind] * 2, norm_type=norm_type)
            names = [n for n, _ in model.named_parameters()]
            want = {"model.embed_tokens.weight", "lm_head.weight"} | {f"model.norm.{s}" for s in suffixes}
            for l in range(2):
                want |= {f"model.layers.{l}.{n}" for n in linear}
                want |= {f"model.layers.{l}.{norm}.{s}" for norm in KIND_NORMS[kind] for s in suffixes}
            assert set(names) == want and len(names) == len(want), (kind, norm_type, sorted(set(names) ^ want))
            norm_names = [n for n in names if ref.is_norm_param(n)]
            assert len(norm_names) == (2 * len(KIND_NORMS[kind]) + 1) * len(suffixes)
            assert all(ref.is_norm_weight(n) == n.endswith(".weight") for n in norm_names)
            assert all(ref.is_norm_bias(n) == n.endswith(".bias") for n in norm_names)
            # layer 0's norms are registered N1, (N1o,) N2, (N2o), after the QKV norms inside self_attn
            layer0 = [n[len("model.layers.0."):] for n in norm_names if n.startswith("model.layers.0.")]
            order = sorted(KIND_NORMS[kind], key=lambda norm: not norm.startswith("self_attn."))  # stable
            assert layer0 == [f"{norm}.{s}" for norm in order for s in suffixes], layer0
    assert not ref.is_norm_param("model.layers.0.self_attn.q_proj.weight") and not ref.is_norm_param("lm_head.weight")


def test_checkpoint_round_trip_every_kind():
    x = random_tokens(12, 11, 27).view(2, 6)
    with tempfile.TemporaryDirectory() as d:
        for norm_layers, norm_type in [([kind] * 2, "rmsnorm") for kind in KINDS] + [(ZOO, "layernorm")]:
            model = tiny_model(L=len(norm_layers), seed=8, norm_layers=norm_layers, norm_type=norm_type)
            ref.save_checkpoint(model, d)
            back = ref.load_checkpoint(d)
            assert back.config == model.config and back.config.norm_layers == norm_layers
            with torch.no_grad():
                assert torch.equal(model(x)[0], back(x)[0]), (norm_layers, norm_type)
        # the zoo's tensors under a config that says otherwise are refused: a missing bias, an
        # all-pre placement, rmsnorm (so the biases are unexpected)
        tensors, _ = ref.safetensors_load(os.path.join(d, "model.safetensors"))
        cfg = ref.config_load(os.path.join(d, "config.json"))
        no_bias = {k: v for k, v in tensors.items() if k != "model.layers.2.pre_feedforward_layernorm.bias"}
        ref.safetensors_save(os.path.join(d, "model.safetensors"), no_bias)
        expect_raises(lambda: ref.load_checkpoint(d), "missing", "pre_feedforward_layernorm.bias")
        ref.safetensors_save(os.path.join(d, "model.safetensors"), tensors)
        for other in (ref.Config.make(11, 8, 5, 2, 12, 6, 0.0, norm_type="layernorm"),
                      ref.Config.make(11, 8, 5, 2, 12, 6, norm_layers=ZOO, norm_type="rmsnorm")):
            ref.config_save(other, os.path.join(d, "config.json"))
            expect_raises(lambda: ref.load_checkpoint(d), "does not match config.json")
        ref.config_save(cfg, os.path.join(d, "config.json"))
        ref.load_checkpoint(d)  # and back as it was, it loads


def json_config(L=4, **extra):
    d = ref.config_to_json(ref.Config.make(11, 8, L, 2, 12, 6, 0.0))
    for key in ("post_ln_layers", "mixln_alpha", "norm_layers", "norm_type"):
        d.pop(key, None)
    d.update(extra)
    return d


def test_config_json_norm_layers():
    import json
    # a general list: norm_layers and norm_type written, no Mix-LN shorthand
    cfg = ref.Config.make(11, 8, 5, 2, 12, 6, norm_layers=ZOO, norm_type="layernorm")
    d = ref.config_to_json(cfg)
    assert d["norm_layers"] == ZOO and d["norm_type"] == "layernorm"
    assert "post_ln_layers" not in d and "mixln_alpha" not in d
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.json")
        ref.config_save(cfg, path)
        with open(path) as f:
            assert json.load(f) == d
        assert ref.config_load(path) == cfg
    # the Mix-LN form: the shorthand too, with the recorded alpha where it gives k, else k/L
    for alpha, norm_layers, want_k, want_alpha in ((0.3, None, 1, 0.3), (0.0, None, 0, 0.0), (1.0, None, 4, 1.0),
                                                   (0.3, ["post", "post", "pre", "pre"], 2, 0.5),
                                                   (None, ["post", "pre", "pre", "pre"], 1, 0.25)):
        cfg = ref.Config.make(11, 8, 4, 2, 12, 6, alpha, norm_layers=norm_layers)
        d = ref.config_to_json(cfg)
        assert d["post_ln_layers"] == want_k and d["mixln_alpha"] == want_alpha, (alpha, norm_layers, d)
        assert d["norm_layers"] == ["post"] * want_k + ["pre"] * (4 - want_k) and d["norm_type"] == "rmsnorm"
        assert ref.config_from_json(json.loads(json.dumps(d))) == cfg
    # reading: norm_layers wins; a post_ln_layers beside a Mix-LN-form list must agree
    mix = ["post", "pre", "pre", "pre"]
    assert ref.config_from_json(json_config(norm_layers=mix, post_ln_layers=1)).norm_layers == mix
    expect_raises(lambda: ref.config_from_json(json_config(norm_layers=mix, post_ln_layers=2)),
                  "config.json", "post_ln_layers 2 disagrees")
    # ... and one beside a list of another form is not compared (the contract errs only on a Mix-LN form)
    assert ref.config_from_json(json_config(norm_layers=["peri"] * 4, post_ln_layers=2)).norm_layers == ["peri"] * 4
    got = ref.config_from_json(json_config(norm_layers=mix, mixln_alpha=0.9))  # inconsistent alpha: k/L
    assert got.post_ln_layers == 1 and got.mixln_alpha == 0.25
    # without norm_layers: as before (post_ln_layers, else floor(mixln_alpha*L), else pure Pre-LN)
    assert ref.config_from_json(json_config(post_ln_layers=2)).norm_layers == ["post", "post", "pre", "pre"]
    assert ref.config_from_json(json_config(mixln_alpha=0.5)).norm_layers == ["post", "post", "pre", "pre"]
    stock = ref.config_from_json(json_config())
    assert stock.norm_layers == ["pre"] * 4 and stock.norm_type == "rmsnorm" and stock.post_ln_layers == 0


def test_bad_norm_specs_refused():
    bad = [(dict(norm_layers=["pre"] * 3), ["3 entries", "4 layers"]),
           (dict(norm_layers=["pre"] * 5), ["5 entries", "4 layers"]),
           (dict(norm_layers=[]), ["0 entries"]),
           (dict(norm_layers=["pre", "post", "sandwich", "pre"]), ["norm_layers[2]", "'sandwich'"]),
           (dict(norm_layers=["pre", "pre", "pre", 1]), ["norm_layers[3]"]),
           (dict(norm_layers="pre,pre,pre,pre"), ["must be a list"]),
           (dict(norm_type="batchnorm"), ["norm_type", "'batchnorm'"]),
           (dict(norm_layers=["peri"] * 4, norm_type="RMSNorm"), ["'RMSNorm'"]),
           (dict(post_ln_layers=5), ["post_ln_layers 5"])]
    for extra, phrases in bad:
        expect_raises(lambda: ref.config_from_json(json_config(**extra)), "config.json", *phrases)
    expect_raises(lambda: ref.Config.make(11, 8, 4, 2, 12, 6, norm_layers=["pre"] * 3), "3 entries")
    expect_raises(lambda: ref.Config.make(11, 8, 4, 2, 12, 6, norm_layers=["pre", "x", "pre", "pre"]), "'x'")
    expect_raises(lambda: ref.Config.make(11, 8, 4, 2, 12, 6, 0.0, norm_type="batchnorm"), "'batchnorm'")
    expect_raises(lambda: ref.Config.make(11, 8, 4, 2, 12, 6), "alpha or norm_layers")
    expect_raises(lambda: ref.DecoderLayer(ref.Config.make(11, 8, 1, 2, 12, 6, 0.0), "sandwich", 0), "'sandwich'")


def sample_std(p):
    return float(p.detach().double().std())


def test_deepnorm_init_statistics():
    # DeepNet: xavier normal, std = gain * sqrt(2 / (fan_in + fan_out)); q, k gain 1; v, o, gate,
    # up, down gain b = (8L)^(-1/4). The other layers keep 0.02. 64K..128K samples per tensor put
    # the sample std within ~0.3% of the true one; 3% is far outside chance.
    C, Fh, L = 256, 512, 4
    b = (8 * L) ** -0.25
    cfg = ref.Config.make(64, C, L, 4, Fh, 8, norm_layers=["deepnorm", "pre", "deepnorm", "post"])
    model = ref.MixLNForCausalLM(cfg)
    for scaled_init in (False, True):  # scaled init leaves deepnorm (and post) layers alone
        ref.init_weights(model, seed=9, scaled_init=scaled_init)
        want = {"self_attn.q_proj": math.sqrt(2 / (C + C)), "self_attn.k_proj": math.sqrt(2 / (C + C)),
                "self_attn.v_proj": b * math.sqrt(2 / (C + C)), "self_attn.o_proj": b * math.sqrt(2 / (C + C)),
                "mlp.gate_proj": b * math.sqrt(2 / (C + Fh)), "mlp.up_proj": b * math.sqrt(2 / (C + Fh)),
                "mlp.down_proj": b * math.sqrt(2 / (Fh + C))}
        for l in range(L):
            layer = model.model.layers[l]
            for proj, std in want.items():
                w = layer.get_submodule(proj).weight
                if cfg.norm_layers[l] != "deepnorm":
                    std = 0.02 / math.sqrt(2 * L) if (scaled_init and l == 1 and proj in
                                                      ("self_attn.o_proj", "mlp.down_proj")) else 0.02
                got = sample_std(w)
                assert abs(got / std - 1) < 0.03, (l, proj, scaled_init, got, std)
                assert abs(float(w.double().mean())) < 0.1 * std, (l, proj)
    assert abs(b - 0.4204482076) < 1e-9 and abs((2 * L) ** 0.25 - 1.6817928305) < 1e-9  # L = 4: b < 1 < a


def test_scaled_init_statistics():
    # scaled_init: o_proj and down_proj std 0.02/sqrt(2L) in pre, lns and peri layers; not in post
    # (nor deepnorm, above). Everything else as without it; norms 1 and biases 0; the embedding
    # embed_std.
    C, Fh, L = 256, 512, 4
    cfg = ref.Config.make(64, C, L, 4, Fh, 8, norm_layers=["pre", "lns", "peri", "post"], norm_type="layernorm")
    model = ref.MixLNForCausalLM(cfg)
    for scaled_init in (False, True):
        ref.init_weights(model, seed=10, embed_std=0.1, scaled_init=scaled_init)
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                assert torch.equal(p, torch.ones_like(p)), name
                continue
            if name.endswith(".bias"):
                assert torch.equal(p, torch.zeros_like(p)), name
                continue
            std = 0.02
            if name == "model.embed_tokens.weight":
                std = 0.1
            elif scaled_init and (".o_proj." in name or ".down_proj." in name) and int(name.split(".")[2]) < 3:
                std = 0.02 / math.sqrt(2 * L)
            assert abs(sample_std(p) / std - 1) < 0.03, (name, scaled_init, sample_std(p), std)


def test_init_draws_in_parameter_order():
    # One generator, parameters in named_parameters() order, each drawn normal(0, its std):
    # redone here by hand for the zoo with scaled init.
    L, C, Fh = 5, 8, 12
    model = tiny_model(L=L, norm_layers=ZOO, norm_type="layernorm")
    ref.init_weights(model, seed=12, embed_std=0.05, scaled_init=True)
    gen = torch.Generator().manual_seed(12)
    b = (8 * L) ** -0.25
    for name, p in model.named_parameters():
        if "norm" in name:
            continue  # filled, not drawn
        std = 0.05 if "embed" in name else 0.02
        if name.startswith("model.layers."):
            kind, proj = ZOO[int(name.split(".")[2])], name.split(".")[-2]
            fan_out, fan_in = p.shape
            if kind == "deepnorm":
                std = (1.0 if proj in ("q_proj", "k_proj") else b) * math.sqrt(2 / (fan_in + fan_out))
            elif kind in ("pre", "lns", "peri") and proj in ("o_proj", "down_proj"):
                std = 0.02 / math.sqrt(2 * L)
        want = torch.empty(p.shape).normal_(0.0, std, generator=gen)
        assert torch.allclose(p, want, rtol=1e-6, atol=0), name


def test_cli_norm_flags():
    import contextlib
    import io
    import json
    sizes = ["--vocab", "11", "--dim", "8", "--heads", "2", "--ffn", "12", "--seq-len", "6"]

    def run(*args):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ref.main(list(args))
        return buf.getvalue()

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "zoo")
        printed = json.loads(run("init", "--out", out, *sizes, "--layers", "5", "--seed", "3",
                                 "--norm-layers", ",".join(ZOO), "--norm-type", "layernorm", "--scaled-init"))
        assert printed["norm_layers"] == ZOO and printed["norm_type"] == "layernorm" and printed["post_ln_layers"] is None
        with open(os.path.join(out, "config.json")) as f:
            written = json.load(f)
        assert written["norm_layers"] == ZOO and written["norm_type"] == "layernorm" and "post_ln_layers" not in written
        model = ref.load_checkpoint(out)
        assert "model.norm.bias" in model.state_dict()
        o = model.model.layers[4].self_attn.o_proj.weight  # a pre layer: scaled init (8x8: a loose check)
        assert sample_std(o) < 0.02 * 0.6, sample_std(o)
        # --alpha as before, and --norm-layers overrides it
        out2 = os.path.join(d, "mix")
        run("init", "--out", out2, *sizes, "--layers", "4", "--seed", "3", "--alpha", "0.5")
        cfg = ref.config_load(os.path.join(out2, "config.json"))
        assert cfg.norm_layers == ["post", "post", "pre", "pre"] and cfg.post_ln_layers == 2 and cfg.mixln_alpha == 0.5
        run("init", "--out", out2, *sizes, "--layers", "2", "--seed", "3", "--alpha", "1", "--norm-layers", "lns,peri")
        assert ref.config_load(os.path.join(out2, "config.json")).norm_layers == ["lns", "peri"]
        # bench builds from the same flags
        line = json.loads(run("bench", *sizes, "--layers", "2", "--norm-layers", "deepnorm,peri",
                              "--norm-type", "layernorm", "--batch", "1", "--steps", "1").strip().splitlines()[-1])
        assert line["ms_per_step"] > 0
        # bad input ends with a message
        for args, phrase in (((*sizes, "--layers", "3", "--seed", "1", "--norm-layers", "pre,pre"), "2 entries"),
                             ((*sizes, "--layers", "2", "--seed", "1", "--norm-layers", "pre,sandwich"), "'sandwich'"),
                             ((*sizes, "--layers", "2", "--seed", "1"), "--alpha or --norm-layers")):
            expect_raises(lambda: run("init", "--out", os.path.join(d, "bad"), *args), phrase, exc=SystemExit)
        with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage message
            expect_raises(lambda: run("init", "--out", os.path.join(d, "bad"), *sizes, "--layers", "2", "--seed", "1",
                                      "--alpha", "0", "--norm-type", "batchnorm"), exc=SystemExit)
        assert not os.path.exists(os.path.join(d, "bad"))


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


def test_padded_rows_batches_and_ignored_targets():
    # batch() with pad_id: rows of their own, no target across rows or on padding
    B, T, pad = 2, 4, 0
    toks = np.array([5, 6, 7, 8, 9, 10, 0, 0, 3, 0, 0, 0, 4, 5, 6, 7], dtype=np.uint16)
    assert ref.num_batches(len(toks), B, T, pad) == 2 and ref.num_batches(len(toks), B, T) == 1
    x, y = ref.batch(toks, 1, B, T, pad)
    X = ref.IGNORED_TARGET
    assert x.tolist() == [[3, 0, 0, 0], [4, 5, 6, 7]] and y.tolist() == [[X, X, X, X], [5, 6, 7, X]]
    x, y = ref.batch(toks, 0, B, T, pad)
    assert y.tolist() == [[6, 7, 8, X], [10, X, X, X]]
    # the loss is the mean over the targets left, as F.cross_entropy of those alone gives it
    model = tiny_model(L=2, seed=60, T=4)
    logits, loss = model(x, y)
    keep = y.reshape(-1) != X
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1])[keep], y.reshape(-1)[keep])
    assert torch.allclose(loss, want, rtol=1e-6, atol=0), (loss, want)
    # no target at all: 0 and no gradient, where F.cross_entropy would give nan
    _, none = model(x, torch.full_like(y, X))
    none.backward()
    assert float(none) == 0.0 and all(float(p.grad.abs().max()) == 0.0 for p in model.parameters())
    # evaluate: the token mean (each batch's mean weighted by its targets), and the targets counted
    model.zero_grad()
    loss, n = ref.evaluate(model, toks, B, T, pad_id=pad)
    sums = [(float(model(*ref.batch(toks, k, B, T, pad))[1]), int((ref.batch(toks, k, B, T, pad)[1] != X).sum()))
            for k in range(2)]
    assert n == 3 + 1 + 0 + 3 == sum(c for _, c in sums)
    assert abs(loss - sum(l * c for l, c in sums) / n) < 1e-9
    # val_mean "batches": the mean of the batches' means (the paper's code's), which differs here
    # (4 and 3 targets); a batch without targets (a third of padding only) is left out of both
    padded = np.concatenate([toks, np.zeros(B * T, dtype=np.uint16)])
    assert ref.num_batches(len(padded), B, T, pad) == 3
    by_batch, n_b = ref.evaluate(model, padded, B, T, pad_id=pad, val_mean="batches")
    assert n_b == n and abs(by_batch - (sums[0][0] + sums[1][0]) / 2) < 1e-9
    assert abs(by_batch - loss) > 1e-4
    assert abs(ref.evaluate(model, padded, B, T, pad_id=pad)[0] - loss) < 1e-12
    res = ref.analyze(model, padded, B, T, pad_id=pad, val_mean="batches")
    assert abs(res["val_loss"] - by_batch) < 1e-9 and res["tokens"] == n
    try:
        ref.evaluate(model, toks, B, T, pad_id=pad, val_mean="rows")
        raise AssertionError("a bad val_mean was accepted")
    except ValueError as e:
        assert "val_mean" in str(e)


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
    rms = res["hidden_rms"]
    assert len(rms) == L + 1 and all(v > 0 for v in rms), rms
    # layer 0 is Post-LN: its output is its last RMSNorm's. With that norm's weight 1 (tiny_model's
    # are 1 + noise) every token's output has RMS 1, up to the norm's eps (1e-6 against mean
    # squares of order 1e-2 here: 1e-4 relative at most)
    with torch.no_grad():
        model.model.layers[0].post_feedforward_layernorm.weight.fill_(1.0)
    rms = ref.analyze(model, toks, B, T)["hidden_rms"]
    assert abs(rms[1] - 1.0) < 1e-3, rms
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
    # model's own forward, distances and RMS in numpy; a dropped layer by replacing it with nn.Identity.
    import copy
    L, B, T = 3, 2, 6
    model = analysis_model(L=L, seed=1)
    toks = random_tokens(2 * B * T + 1, 11, 9).numpy()
    res = ref.analyze(model, toks, B, T)
    captured = []
    handles = [layer.register_forward_pre_hook(lambda m, inp: captured.append(inp[0].clone()))
               for layer in model.model.layers]
    handles.append(model.model.norm.register_forward_pre_hook(lambda m, inp: captured.append(inp[0].clone())))
    sums = np.zeros((L, L))
    squares = np.zeros(L + 1)
    with torch.no_grad():
        for k in range(2):
            captured.clear()
            model(ref.batch(toks, k, B, T)[0])
            for l, c in enumerate(captured):  # h_0 .. h_L, each (B, T, C)
                squares[l] += (c.double().numpy() ** 2).sum()
            hs = [c[:, -1, :].double().numpy() for c in captured]  # the last tokens, each (B, C)
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
    C = model.config.hidden_size
    for l in range(L + 1):
        # 1e-12 relative: float64 sums of the same fp32 squares in two orders
        want = math.sqrt(squares[l] / (2 * B * T * C))
        assert abs(res["hidden_rms"][l] - want) < 1e-12 * want, (l, res["hidden_rms"][l], want)
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
        assert res["hidden_rms"][l + 1] == res["hidden_rms"][l], "nor changes the stream's scale"
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
    assert set(written) == {"val_loss", "tokens", "angular_distance", "layer_drop", "hidden_rms"}
    assert written["tokens"] == 2 * 2 * 6
    want = ref.analyze(model, random_tokens(3 * 2 * 6 + 1, 11, 11).numpy(), 2, 6, max_batches=2)
    assert abs(written["val_loss"] - want["val_loss"]) < 1e-12  # the checkpoint is fp32, read back exactly


# ---- bf16 emulation (reference.py, "Precision")
#
# The engine's --precision bf16 / bf16-pure store activations, activation gradients and the weights
# the kernels read in bf16 (bf16-pure: parameters, weight gradients and AdamW moments too). The
# reference rounds fp32 tensors to bf16 values at those points. These checks write the rounding
# points down again from the engine's contract, independently of reference.py's modules.

U_BF16 = 2.0 ** -8  # unit roundoff of bf16 (8 significant bits): |round(x) - x| <= U_BF16 * |x|


def bf16_rne_numpy(x):
    """Round float32 values to bf16 (nearest, ties to even) by integer arithmetic on the bits:
    add 0x7FFF plus the lowest kept bit, then drop the low 16 bits (finite inputs only)."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def representable(t):
    return torch.equal(t.to(torch.bfloat16).float(), t)


def test_bf16_rounding_is_nearest_even():
    # ties: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7 (even mantissa 0: down); 1 + 3*2^-8
    # halfway between 1 + 2^-7 and 1 + 2^-6 (even: up); just past a tie rounds away
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -8 + 2 ** -20, 3.0e38, 1e-40])
    want = torch.tensor([1.0, 1 + 2 ** -6, -1.0, 1 + 2 ** -7, 2.9908e38, 1e-40])
    got = ref.round_bf16(ties)
    assert torch.equal(got[:4], want[:4]), got
    assert torch.equal(got, torch.from_numpy(bf16_rne_numpy(ties.numpy())))
    g = torch.Generator().manual_seed(40)
    x = torch.randn(100000, generator=g) * torch.exp(8 * torch.randn(100000, generator=g))
    assert torch.equal(ref.round_bf16(x), torch.from_numpy(bf16_rne_numpy(x.numpy())))
    assert float(((ref.round_bf16(x) - x).abs() / x.abs()).max()) <= U_BF16
    assert ref.round_bf16(x.double()).dtype == torch.float64


def test_precision_setting():
    assert ref.get_precision() == "fp32"  # the default
    t = torch.randn(3)
    assert ref.store(t) is t and ref.read_weight(t) is t  # fp32: the tensor itself, no copy, no op
    with ref.using_precision("bf16-pure"):
        assert ref.get_precision() == "bf16-pure"
        with ref.using_precision("bf16"):
            assert ref.get_precision() == "bf16" and representable(ref.store(t)) and ref.store(t) is not t
        assert ref.get_precision() == "bf16-pure"
    try:
        with ref.using_precision("bf16"):
            raise KeyError("inside")
    except KeyError:
        pass
    assert ref.get_precision() == "fp32", "using_precision must restore the mode after an exception"
    expect_raises(lambda: ref.set_precision("fp16"), "'fp16'", "bf16-pure")
    assert ref.get_precision() == "fp32"


def spec_forward(model, tokens, r):
    """Logits of `model` for tokens (B, T) with r applied at every point where the engine stores
    bf16 (r = round to bf16) or nowhere (r = identity: the plain fp32 model), from the contract's
    equations and the raw parameters (each read through r)."""
    cfg = model.config
    P = {n: r(p.detach()) for n, p in model.named_parameters()}
    L, NH, eps = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.rms_norm_eps

    def norm(x, name):  # the norm's output is stored; statistics in fp32
        w = P[name + ".weight"]
        if cfg.norm_type == "rmsnorm":
            return r(w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)))
        xc = x - x.mean(-1, keepdim=True)
        var = xc.pow(2).mean(-1, keepdim=True)
        return r(xc * torch.rsqrt(var + eps) * w + P[name + ".bias"])

    def linear(x, name):  # the matmul's output is stored
        return r(x @ P[name + ".weight"].t())

    def attn(a, pre, qkv_norm=False):
        B, T, C = a.shape
        hs = C // NH
        q, k, v = (linear(a, pre + p) for p in ("q_proj", "k_proj", "v_proj"))
        if qkv_norm:  # HybridNorm: each of q, k, v normalised over its C channels, before RoPE
            q, k, v = norm(q, pre + "q_norm"), norm(k, pre + "k_norm"), norm(v, pre + "v_norm")
        q, k, v = (t.view(B, T, NH, hs).transpose(1, 2) for t in (q, k, v))
        cos, sin = ref.rope_cos_sin(T, hs, cfg.rope_theta)
        half = lambda t: torch.cat([-t[..., hs // 2:], t[..., :hs // 2]], dim=-1)  # noqa: E731
        q, k = r(q * cos + half(q) * sin), r(k * cos + half(k) * sin)           # RoPE, stored
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        att = F.softmax(att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), dim=-1)
        y = r(att @ v).transpose(1, 2).contiguous().view(B, T, C)                  # stored
        return linear(y, pre + "o_proj")

    def mlp(m, pre):
        return linear(r(F.silu(linear(m, pre + "gate_proj")) * linear(m, pre + "up_proj")), pre + "down_proj")

    x = r(P["model.embed_tokens.weight"][tokens])
    for l, kind in enumerate(cfg.norm_layers):
        pre = f"model.layers.{l}."
        n1, *rest = [pre + name for name in KIND_NORMS[kind]]
        A = lambda a: attn(a, pre + "self_attn.", kind in ("hybrid", "preqkv"))  # noqa: E731
        M = lambda m: mlp(m, pre + "mlp.")         # noqa: E731
        if kind == "hybrid":
            h = r(x + A(x))
            x = norm(r(h + M(h)), rest[-1])
        elif kind in ("pre", "preqkv"):
            h = r(x + A(norm(x, n1)))
            x = r(h + M(norm(h, rest[0])))
        elif kind == "lns":
            s = 1 / math.sqrt(l + 1)
            h = r(x + A(r(norm(x, n1) * s)))
            x = r(h + M(r(norm(h, rest[0]) * s)))
        elif kind == "peri":
            n1o, n2, n2o = rest
            h = r(x + norm(A(norm(x, n1)), n1o))
            x = r(h + norm(M(norm(h, n2)), n2o))
        else:  # post (a = 1), deepnorm
            a = (2 * L) ** 0.25 if kind == "deepnorm" else 1.0
            h = norm(r(a * x + A(x)), n1) if kind == "deepnorm" else norm(r(x + A(x)), n1)
            x = norm(r(a * h + M(h)), rest[0]) if kind == "deepnorm" else norm(r(h + M(h)), rest[0])
    return linear(norm(x, "model.norm"), "lm_head")


def emulation_setups():
    return [([kind] * 2, norm_type) for kind in KINDS for norm_type in ("rmsnorm", "layernorm")] + [(ZOO, "layernorm")]


def test_fp32_forward_is_the_plain_model():
    # fp32 (the default): the logits are bit for bit the contract's equations on the raw parameters
    # with no rounding anywhere, for every kind and both norm types
    tokens = random_tokens(12, 11, 41).view(2, 6)
    for norm_layers, norm_type in emulation_setups():
        model = tiny_model(L=len(norm_layers), seed=42, norm_layers=norm_layers, norm_type=norm_type)
        with torch.no_grad():
            want = spec_forward(model, tokens, lambda t: t)
            assert torch.equal(model(tokens)[0], want), (norm_layers, norm_type)
            with ref.using_precision("fp32"):
                assert torch.equal(model(tokens)[0], want)


def test_bf16_forward_rounds_where_the_engine_stores():
    # bf16 and bf16-pure: bit for bit the same equations with every storage point rounded (the
    # forward of both modes is the same; bf16-pure differs in gradients and the optimizer)
    tokens = random_tokens(12, 11, 43).view(2, 6)
    for norm_layers, norm_type in emulation_setups():
        model = tiny_model(L=len(norm_layers), seed=44, norm_layers=norm_layers, norm_type=norm_type)
        with torch.no_grad():
            want = spec_forward(model, tokens, ref.round_bf16)
            plain = spec_forward(model, tokens, lambda t: t)
            for precision in ("bf16", "bf16-pure"):
                with ref.using_precision(precision):
                    got = model(tokens)[0]
                assert torch.equal(got, want), (norm_layers, norm_type, precision, float((got - want).abs().max()))
            assert not torch.equal(want, plain)


def test_bf16_stored_values_are_bf16():
    # every module output (each a stored activation), the logits, and the lns products seen by
    # attention and the MLP are bf16 values; in fp32 they are not (the check has teeth)
    tokens = random_tokens(12, 11, 45).view(2, 6)
    model = tiny_model(L=5, seed=46, norm_layers=ZOO, norm_type="layernorm")
    for precision in ("fp32", "bf16", "bf16-pure"):
        outs = []
        hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o))
                 for m in model.modules() if m is not model]
        hooks += [m.register_forward_pre_hook(lambda m, i: outs.append(i[0]))
                  for m in model.modules() if isinstance(m, (ref.Attention, ref.MLP))]
        with ref.using_precision(precision), torch.no_grad():
            logits = model(tokens)[0]
        for h in hooks:
            h.remove()
        outs = [o for o in outs if isinstance(o, torch.Tensor)]
        assert len(outs) > 60, len(outs)
        flags = [representable(o) for o in outs] + [representable(logits)]
        if precision == "fp32":
            assert not any(flags), "fp32 activations are not bf16 values"
        else:
            assert all(flags), (precision, flags)


def test_bf16_gradients_rounded_where_stored():
    # The gradient of a stored activation is stored in bf16: the embedding rows' gradient is the
    # gradient of x0 (tokens all distinct, so each row receives one position's gradient), so it is
    # made of bf16 values in bf16 and bf16-pure, not in fp32. Weight gradients: fp32 in bf16
    # (lm_head's is r(dlogits)^T final, an fp32 sum of products of bf16 values), bf16 in bf16-pure.
    V = 11
    model = tiny_model(L=2, seed=47, norm_layers=["peri", "post"], V=V)
    x = torch.randperm(V, generator=torch.Generator().manual_seed(48))[:6].view(1, 6)  # distinct tokens
    y = random_tokens(6, V, 49).view(1, 6)
    for precision in ("fp32", "bf16", "bf16-pure"):
        model.zero_grad(set_to_none=True)
        seen = {}
        hook = model.model.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("final", o))
        with ref.using_precision(precision):
            logits, loss = model(x, y)
            logits.register_hook(lambda g: seen.__setitem__("dlogits", g))  # the gradient into the store
            loss.backward()
        hook.remove()
        emb = model.model.embed_tokens.weight.grad
        rows = emb[x.view(-1)]
        unused = torch.ones(V, dtype=torch.bool)
        unused[x.view(-1)] = False
        assert not emb[unused].any()  # only the used rows have a gradient
        grads = dict((n, p.grad) for n, p in model.named_parameters())
        final, dlogits = seen["final"].detach().view(-1, 8), seen["dlogits"].view(-1, V)
        unrounded = dlogits.t() @ final
        rounded = ref.round_bf16(dlogits).t() @ final
        if precision == "fp32":
            assert not representable(rows)
            assert torch.allclose(grads["lm_head.weight"], unrounded, rtol=0, atol=1e-7)
            continue
        assert representable(rows), precision
        assert not torch.allclose(rounded, unrounded, rtol=0, atol=1e-7)  # the rounding is visible here
        # 1e-7: fp32 summation order of 6 products (the gradient is ~1e-2 here, fp32 steps ~1e-9);
        # bf16-pure rounds the sum, one bf16 step (2U) off where the order tips a rounding
        if precision == "bf16":
            assert torch.allclose(grads["lm_head.weight"], rounded, rtol=0, atol=1e-7)
        else:
            assert torch.allclose(grads["lm_head.weight"], ref.round_bf16(rounded), rtol=2 * U_BF16, atol=1e-7)
        flags = [representable(g) for g in grads.values()]
        if precision == "bf16":
            assert not all(flags), "bf16 weight gradients are fp32"
        else:
            assert all(flags), "bf16-pure weight gradients are bf16"


def mid_model(norm_layers, norm_type="rmsnorm", seed=50):
    """The fixtures' sizes (V 97, C 48, 4 heads, F 136, T 24), norm weights off 1."""
    return tiny_model(L=len(norm_layers), seed=seed, V=97, C=48, NH=4, F=136, T=24, norm_layers=norm_layers,
                      norm_type=norm_type)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_bf16_close_to_fp32_but_not_equal():
    # At the fixtures' sizes, bf16 against fp32 from the same weights and batch. Every rounding
    # moves a value by at most U = 2^-8 of itself, independently of the others, so errors add up
    # like a random walk: sqrt(n) U for n roundings on a path. The logits see ~10 roundings per
    # layer (L = 4 or 5 here) plus the final norm's and their own: sqrt(50) U ~ 7 U; the norms
    # rescale the stream, so no layer amplifies what it receives. Bound 8 U (measured 1.6 .. 5.2 U
    # over every kind and 3 seeds). Weight gradients pass the forward's roundings and about as many
    # in the backward: sqrt(100) U = 10 U; bound 12 U on each tensor's max|a-b|/max|b| (measured
    # <= 8.1 U). Below: U/16, far above fp32 noise (~1e-6): the emulation is on.
    # The loss: cross-entropy is logsumexp(z) - z_y and logsumexp moves by at most max|dz|, so
    # |loss_bf16 - loss_fp32| <= 2 max|logits_bf16 - logits_fp32| (+ fp32 noise).
    # Training (5 steps, lr 1e-2): AdamW moves an element by lr |m^| / (sqrt(v^) + eps) per step,
    # and |m^| <= 1.02 sqrt(v^) for t <= 5 (Cauchy-Schwarz over the moment weights: m^ averages g
    # with weights ~0.9^(t-i), v^ averages g^2 with ~equal weights); so each run moves an element by
    # at most 1.02 * sum(lr) (times 1 - lr wd <= 1), and the two runs end at most twice that apart,
    # plus bf16-pure's rounding of each parameter (U |p| per step).
    toks = random_tokens(6 * 3 * 24 + 1, 97, 51).numpy()
    x, y = ref.batch(toks, 0, 3, 24)
    for norm_layers, norm_type in ((["post", "pre", "pre", "pre"], "rmsnorm"), (ZOO, "layernorm")):
        runs = {}
        for precision in ("fp32", "bf16", "bf16-pure"):
            model = mid_model(norm_layers, norm_type)
            with ref.using_precision(precision):
                logits, loss = model(x, y)
                loss.backward()
                grads = {n: p.grad for n, p in model.named_parameters()}
                trained = mid_model(norm_layers, norm_type)
                log = ref.train(trained, toks, 3, 24, 5, 1e-2, 1, 0.1, 0.1, 0.0)
            runs[precision] = (logits.detach(), float(loss), grads, log, dict(trained.named_parameters()))
        f_logits, f_loss, f_grads, f_log, f_params = runs["fp32"]
        sum_lr = sum(lr for _, lr, _ in f_log)
        for precision in ("bf16", "bf16-pure"):
            logits, loss, grads, log, params = runs[precision]
            what = (norm_layers, precision)
            assert U_BF16 / 16 < rel(logits, f_logits) < 8 * U_BF16, (what, rel(logits, f_logits) / U_BF16)
            assert abs(loss - f_loss) <= 2 * float((logits - f_logits).abs().max()) + 1e-6, what
            worst = max(rel(grads[n], f_grads[n]) for n in f_grads)
            assert U_BF16 / 16 < worst < 12 * U_BF16, (what, worst / U_BF16)
            assert [lr for _, lr, _ in log] == [lr for _, lr, _ in f_log]
            assert all(a[0] != b[0] for a, b in zip(log, f_log)), what  # each step's loss moved
            for n, p in params.items():
                dw = float((p - f_params[n]).abs().max())
                slack = 5 * U_BF16 * float(f_params[n].abs().max()) if precision == "bf16-pure" else 0.0
                assert 0 < dw <= 2 * 1.02 * sum_lr + slack, (what, n, dw, 2 * 1.02 * sum_lr)


def test_bf16_training_state():
    # bf16: the master weights and moments stay fp32 (not all bf16 values after a few steps);
    # bf16-pure: parameters (rounded once at the start, as the engine's load does) and both
    # moments hold bf16 values after every step
    toks = random_tokens(3 * 2 * 6 + 1, 11, 52).numpy()
    for precision in ("bf16", "bf16-pure"):
        model = tiny_model(L=3, seed=53, norm_layers=["post", "lns", "peri"], norm_type="layernorm")
        assert not all(representable(p) for p in model.parameters())
        with ref.using_precision(precision):
            params = list(model.parameters())
            opt = ref.make_optimizer(params, 1e-2, 0.1)
            if precision == "bf16-pure":
                ref.round_parameters_(model)
            for s in range(3):
                ref.train_step(model, opt, params, *ref.batch(toks, s, 2, 6), 1e-2, 1.0)
        if precision == "bf16":
            assert isinstance(opt, torch.optim.AdamW)
            moments = [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
        else:
            assert isinstance(opt, ref.BF16PureAdamW) and opt.t == 3
            moments = opt.m + opt.v
        flags = [representable(t) for t in params + moments]
        assert all(flags) if precision == "bf16-pure" else not any(flags), precision
        # train() does the same, including the initial rounding
        fresh = tiny_model(L=3, seed=53, norm_layers=["post", "lns", "peri"], norm_type="layernorm")
        with ref.using_precision(precision):
            ref.train(fresh, toks, 2, 6, 3, 1e-2, 0, 0.1, 0.1, 1.0)
        assert all(representable(p) for p in fresh.parameters()) == (precision == "bf16-pure")


def plain_attention(q, k, v):
    T = q.shape[-2]
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return F.softmax(att, dim=-1) @ v


def test_tensor_core_attention_emulation():
    # Without its two roundings (P and dS), the emulation of the engine's tensor-core attention is
    # the plain attention, forward and backward (the tiled online softmax and the hand-written
    # backward are exact rewrites, here over three key tiles: T = 150); with them it moves, by
    # about a bf16 step.
    g = torch.Generator().manual_seed(60)
    q, k, v = (ref.round_bf16(2 * torch.randn(2, 3, 150, 16, generator=g)) for _ in range(3))
    dy = ref.round_bf16(torch.randn(2, 3, 150, 16, generator=g))

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        y = fn(*leaves)
        y.backward(dy)
        return [y.detach()] + [t.grad for t in leaves]

    exact = run(plain_attention)
    real_round = ref.round_bf16
    try:
        ref.round_bf16 = lambda x: x
        unrounded = run(ref._TensorCoreAttention.apply)
    finally:
        ref.round_bf16 = real_round
    rounded = run(ref._TensorCoreAttention.apply)
    for name, a, b, c in zip(("y", "dq", "dk", "dv"), unrounded, rounded, exact):
        assert rel(a, c) < 2e-6, (name, rel(a, c))
        assert 1e-4 < rel(b, c) < 2e-2, (name, rel(b, c))
    # the model uses it only when asked, and only in bf16
    model = tiny_model(L=2, seed=61, C=32, NH=2)
    x = random_tokens(2 * 6, 11, 62).view(2, 6)
    outputs = {}
    for precision in ("fp32", "bf16"):
        for tensor_core in (False, True):
            ref.Attention.tensor_core = tensor_core
            try:
                with ref.using_precision(precision), torch.no_grad():
                    outputs[precision, tensor_core] = model(x)[0]
            finally:
                ref.Attention.tensor_core = False
    assert torch.equal(outputs["fp32", False], outputs["fp32", True])
    assert not torch.equal(outputs["bf16", False], outputs["bf16", True])


def test_adamw_math_is_torchs_adamw():
    # adamw_math (what BF16PureAdamW rounds) against torch.optim.AdamW: 5 steps, weight decay on,
    # a changing lr and a step with lr 0: equal bit for bit
    g = torch.Generator().manual_seed(54)
    p0 = torch.randn(1000, generator=g)
    p = p0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    q, m, v = p0.clone(), torch.zeros(1000), torch.zeros(1000)
    for t, lr in enumerate((0.0, 1e-2, 3e-3, 1e-2, 5e-4), start=1):
        grad = torch.randn(1000, generator=g) * 10 ** float(torch.randint(-4, 1, (1,), generator=g))
        p.grad = grad.clone()
        opt.param_groups[0]["lr"] = lr
        opt.step()
        q, m, v = ref.adamw_math(q, m, v, grad, lr, 0.9, 0.999, 1e-8, 0.1, t)
        assert torch.equal(p.detach(), q) and torch.equal(opt.state[p]["exp_avg"], m), t
        assert torch.equal(opt.state[p]["exp_avg_sq"], v), t


def test_weight_decay_on_matrices_or_all():
    # One step with zero gradients and fresh moments moves nothing but the weight decay (m' = v' =
    # 0, so p'' = p (1 - lr wd) exactly): with "matrices" the 2-D parameters (embedding, linear
    # layers, head) shrink and every norm weight and bias (all 1-D) stays, with "all" everything
    # shrinks; the same with torch's AdamW (fp32) and BF16PureAdamW (bf16-pure).
    lr, wd = 0.1, 0.5
    for precision in ("fp32", "bf16-pure"):
        for scope in ("matrices", "all"):
            model = tiny_model(L=3, seed=57, norm_layers=["post", "peri", "hybrid"], norm_type="layernorm")
            with ref.using_precision(precision):
                if precision == "bf16-pure":
                    ref.round_parameters_(model)
                before = {n: p.detach().clone() for n, p in model.named_parameters()}
                params = list(model.parameters())
                opt = ref.make_optimizer(params, lr, wd, weight_decay_on=scope)
                for p in params:
                    p.grad = torch.zeros_like(p)
                opt.step()
            shrunk = 0
            for n, p in model.named_parameters():
                want = before[n] * (1 - lr * wd) if p.dim() >= 2 or scope == "all" else before[n]
                if precision == "bf16-pure":
                    want = ref.round_bf16(want)
                assert torch.equal(p.detach(), want), (precision, scope, n)
                shrunk += p.dim() < 2 and not torch.equal(p.detach(), before[n])
            assert shrunk > 0 if scope == "all" else shrunk == 0, (precision, scope, shrunk)
    try:
        ref.make_optimizer([torch.zeros(2, requires_grad=True)], lr, wd, weight_decay_on="norms")
        raise AssertionError("weight_decay_on='norms' was accepted")
    except ValueError as e:
        assert "matrices or all" in str(e)


def test_bf16_pure_adamw_step():
    # The engine's bf16-pure update: read p, m, v, g as bf16 values and, in float32,
    #   p' = p (1 - lr wd);  m' = b1 m + (1 - b1) g;  v' = b2 v + (1 - b2) g^2
    #   p'' = p' - lr/(1 - b1^t) m' / (sqrt(v')/sqrt(1 - b2^t) + eps)
    # then store r(m'), r(v'), r(p'') (p'' from the unrounded m', v').
    g = torch.Generator().manual_seed(55)
    n, lr, wd, b1, b2, eps = 4000, 1e-2, 0.1, 0.9, 0.999, 1e-8
    f32 = np.float32
    p = torch.nn.Parameter(ref.round_bf16(torch.randn(n, generator=g)))
    opt = ref.BF16PureAdamW([p], lr=lr, weight_decay=wd)
    for t in (1, 2, 3):
        before = [x.detach().clone() for x in (p, opt.m[0], opt.v[0])]
        p.grad = ref.round_bf16(torch.randn(n, generator=g) * 1e-2)
        opt.step()
        after = [p.detach(), opt.m[0], opt.v[0]]
        assert all(representable(x) for x in after), t
        # exactly: adamw_math (torch's AdamW arithmetic, checked above) on the state read, rounded
        want = ref.adamw_math(*before, p.grad, lr, b1, b2, eps, wd, t)
        for got, w in zip(after, want):
            assert torch.equal(got, ref.round_bf16(w)), t
        # and against the formula above in float32 numpy, rounded by bf16_rne_numpy. Two float32
        # evaluations of one expression (with or without fused multiply-adds) differ by a couple of
        # fp32 roundings of its terms, 2^-24 of their size each: 2^-22 of the terms' size allows
        # for that, which matters where they cancel (m' near 0); and a difference that carries a
        # bf16 rounding across a boundary moves the stored value by one bf16 step, 2U of it.
        P, M, V = (x.numpy().astype(np.float32) for x in before)
        G = p.grad.numpy().astype(np.float32)
        Pd = P * f32(1 - lr * wd)
        Mn = f32(b1) * M + f32(1 - b1) * G
        Vn = f32(b2) * V + f32(1 - b2) * G * G
        step = f32(lr / (1 - b1 ** t)) * (Mn / (np.sqrt(Vn) / f32(math.sqrt(1 - b2 ** t)) + f32(eps)))
        Pn = Pd - step
        terms = (np.abs(Pd) + np.abs(step), np.abs(f32(b1) * M) + np.abs(f32(1 - b1) * G),
                 np.abs(f32(b2) * V) + np.abs(f32(1 - b2) * G * G))
        for got, w, size in zip(after, (Pn, Mn, Vn), terms):
            w = torch.from_numpy(bf16_rne_numpy(w))
            tol = torch.from_numpy(2 * U_BF16 * np.abs(w.numpy()) + 2.0 ** -22 * size)
            assert bool(((got - w).abs() <= tol).all()), t
            assert int((got != w).sum()) <= n // 100, (t, int((got != w).sum()))  # boundaries are rare
    # the update reads the unrounded m', v': from the rounded ones p'' would differ somewhere
    Pr = Pd - f32(lr / (1 - b1 ** 3)) * (bf16_rne_numpy(Mn) / (np.sqrt(bf16_rne_numpy(Vn)) / f32(math.sqrt(1 - b2 ** 3)) + f32(eps)))
    assert not np.array_equal(bf16_rne_numpy(Pr), bf16_rne_numpy(Pn))


def test_cli_precision():
    import contextlib
    import io
    import json
    model = tiny_model(L=2, seed=56, norm_layers=["post", "pre"])
    with tempfile.TemporaryDirectory() as d:
        ckpt = os.path.join(d, "init")
        ref.save_checkpoint(model, ckpt)
        shard = os.path.join(d, "train.bin")
        toks = random_tokens(3 * 2 * 6 + 1, 11, 57).numpy()
        ref.shard_save(shard, toks)
        common = ["--data", shard, "--batch", "2", "--seq-len", "6"]
        finals = {}
        for precision in ("fp32", "bf16", "bf16-pure"):
            out = os.path.join(d, precision)
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                ref.main(["train", "--ckpt", ckpt, *common, "--steps", "3", "--lr", "1e-2", "--out", out,
                          "--precision", precision])
                ref.main(["eval", "--ckpt", ckpt, *common, "--precision", precision])
            assert ref.get_precision() == "fp32", "the CLI must not leave its precision behind"
            lines = [json.loads(line) for line in buf.getvalue().strip().splitlines()]
            finals[precision] = ref.load_checkpoint(out)
            # same as the library calls in that precision
            want_model = ref.load_checkpoint(ckpt)
            with ref.using_precision(precision):
                want = ref.train(want_model, toks, 2, 6, 3, 1e-2, 0, 0.1, 0.0, 0.0)
                want_eval = ref.evaluate(ref.load_checkpoint(ckpt), toks, 2, 6)[0]
            assert [l["train_loss"] for l in lines[:3]] == [l for l, _, _ in want], precision
            assert lines[3]["val_loss"] == want_eval, precision
            for (n, p), q in zip(finals[precision].named_parameters(), want_model.parameters()):
                assert torch.equal(p, q), (precision, n)
        assert all(representable(p) for p in finals["bf16-pure"].parameters())
        assert not all(representable(p) for p in finals["bf16"].parameters())
        # fp32 by default: the run without the flag is the fp32 one
        with contextlib.redirect_stdout(io.StringIO()):
            ref.main(["train", "--ckpt", ckpt, *common, "--steps", "3", "--lr", "1e-2", "--out", os.path.join(d, "dflt")])
        for p, q in zip(ref.load_checkpoint(os.path.join(d, "dflt")).parameters(), finals["fp32"].parameters()):
            assert torch.equal(p, q)
        with contextlib.redirect_stderr(io.StringIO()):
            expect_raises(lambda: ref.main(["train", "--ckpt", ckpt, *common, "--steps", "1", "--lr", "1e-2",
                                            "--out", os.path.join(d, "x"), "--precision", "fp16"]), exc=SystemExit)


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
                       "layer_drop": [{"layer": l, "val_loss": 3.0 + 0.1 / (l + 1) + 0.05 * i} for l in range(L)],
                       "hidden_rms": [0.02 + (1 + i) * l for l in range(L + 1)]}, f)


def write_synthetic_snapshots(d, L=4):
    """d/{pre,mix}/step_{000050,000100,000150}/analysis.json, as ./train --keep-every and --analyze
    leave them (step_000150 of mix not analysed), for plot.py drop-steps."""
    import json
    for i, name in enumerate(("pre", "mix")):
        for step in (50, 100, 150):
            snap = os.path.join(d, name, f"step_{step:06d}")
            os.makedirs(snap)
            if name == "mix" and step == 150:
                continue
            with open(os.path.join(snap, "analysis.json"), "w") as f:
                json.dump({"val_loss": 5.0 - step / 100, "tokens": 96,
                           "layer_drop": [{"layer": l, "val_loss": 5.0 - step / 100 + 0.1 * step / (100 * (l + 1)) - 0.01 * i}
                                          for l in range(L)]}, f)


SWEEP_CSV_HEADER = "run,placement,base,kind,alpha,lr,seed,status,val_loss\n"


def write_synthetic_sweeps(d):
    """d/a/results.csv (pre and mix-0.5 at lr 0.01 and 0.03, seed 1, one failed run) and
    d/b/results.csv (an older sweep: no base column, one learning rate, seed 2, one diverged run,
    one without a learning rate), in the columns of dev/sweep that plot.py lr reads."""
    os.makedirs(os.path.join(d, "a"))
    os.makedirs(os.path.join(d, "b"))
    with open(os.path.join(d, "a", "results.csv"), "w") as f:
        f.write(SWEEP_CSV_HEADER
                + "pre-lr0.01-s1,pre-lr0.01,pre,pre,0.0,0.01,1,ok,5.1\n"
                + "pre-lr0.03-s1,pre-lr0.03,pre,pre,0.0,0.03,1,ok,5.3\n"
                + "mix-0.5-lr0.01-s1,mix-0.5-lr0.01,mix-0.5,mix,0.5,0.01,1,ok,4.8\n"
                + "mix-0.5-lr0.03-s1,mix-0.5-lr0.03,mix-0.5,mix,0.5,0.03,1,failed,nan\n")
    with open(os.path.join(d, "b", "results.csv"), "w") as f:
        f.write("run,placement,kind,alpha,lr,seed,status,val_loss\n"
                + "pre-s2,pre,pre,0.0,0.01,2,ok,5.2\n"
                + "mix-0.5-s2,mix-0.5,mix,0.5,0.01,2,diverged,nan\n"
                + "post-s2,post,post,1.0,,2,ok,4.7\n")


def test_plot_sweep_lines():
    # plot.py lr pools the runs of several sweeps by placement (base, else placement), leaves out
    # failed runs and, with a warning, runs without a learning rate
    import plot   # dev/, on the path since the reference's import
    with tempfile.TemporaryDirectory() as d:
        write_synthetic_sweeps(d)
        lines = plot.read_sweep_lines([os.path.join(d, "a", "results.csv"), os.path.join(d, "b", "results.csv")])
    assert [line["label"] for line in lines] == ["pre", "mix-0.5"], lines
    pre, mix = lines[0]["points"], lines[1]["points"]
    assert pre == [{"lr": 0.01, "loss": 5.1, "diverged": False}, {"lr": 0.03, "loss": 5.3, "diverged": False},
                   {"lr": 0.01, "loss": 5.2, "diverged": False}], pre
    assert len(mix) == 2 and mix[0] == {"lr": 0.01, "loss": 4.8, "diverged": False}, mix
    assert mix[1]["lr"] == 0.01 and math.isnan(mix[1]["loss"]) and mix[1]["diverged"] is True, mix


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
        negative = os.path.join(d, "negative.json")
        with open(negative, "w") as f:
            json.dump({"hidden_rms": [0.02, -1.0, 2.0]}, f)
        log, analysis = os.path.join(d, "pre", "log.jsonl"), os.path.join(d, "pre", "analysis.json")
        cases = [(("loss", "--out", png, os.path.join(d, "missing.jsonl")), "No such file"),
                 (("loss", "--out", png, empty), "no training or validation lines"),
                 (("loss", "--out", png, garbage), "not valid JSON"),
                 (("loss", "--out", png, log, "--labels", "a,b"), "--labels has 2 labels for 1 files"),
                 (("grads", "--out", png, log, "--step", "3"), "no layer_grad_norms at step 3"),
                 (("angular", "--out", png, ragged), "row 1 has 2 entries, expected 1"),
                 (("angular", "--out", png, log), "not valid JSON"),
                 (("drop", "--out", png, ragged), "val_loss missing"),
                 (("rms", "--out", png, ragged), "hidden_rms missing"),
                 (("rms", "--out", png, negative), "not a positive finite number")]
        # drop-steps: run folders of analysed snapshots
        os.makedirs(os.path.join(d, "unanalysed", "step_000010"))
        os.makedirs(os.path.join(d, "deeper", "step_000010"))
        os.makedirs(os.path.join(d, "deeper", "step_000020"))
        for step, L in ((10, 2), (20, 3)):
            with open(os.path.join(d, "deeper", f"step_{step:06d}", "analysis.json"), "w") as f:
                json.dump({"val_loss": 3.0, "layer_drop": [{"layer": l, "val_loss": 3.1} for l in range(L)]}, f)
        cases += [(("drop-steps", "--out", png, os.path.join(d, "nowhere")), "not a directory"),
                  (("drop-steps", "--out", png, os.path.join(d, "unanalysed")), "no analysed snapshot"),
                  (("drop-steps", "--out", png, os.path.join(d, "deeper")), "disagree on the number of layers ([2, 3])")]
        # lr: the results.csv of sweeps
        bad_csvs = {"nolr.csv": "run,placement,status,val_loss\npre-s1,pre,ok,5.0\n",
                    "header_only.csv": SWEEP_CSV_HEADER,
                    "status.csv": SWEEP_CSV_HEADER + "pre-s1,pre,pre,pre,0.0,0.01,1,running,5.0\n",
                    "lr_text.csv": SWEEP_CSV_HEADER + "pre-s1,pre,pre,pre,0.0,fast,1,ok,5.0\n",
                    "lr_zero.csv": SWEEP_CSV_HEADER + "pre-s1,pre,pre,pre,0.0,0,1,ok,5.0\n",
                    "lr_none.csv": SWEEP_CSV_HEADER + "pre-s1,pre,pre,pre,0.0,,1,ok,5.0\n"}
        for name, text in bad_csvs.items():
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        cases += [(("lr", "--out", png, os.path.join(d, "missing.csv")), "No such file"),
                  (("lr", "--out", png, os.path.join(d, "nolr.csv")), "no lr column"),
                  (("lr", "--out", png, os.path.join(d, "header_only.csv")), "no runs"),
                  (("lr", "--out", png, os.path.join(d, "status.csv")), "line 2 (run pre-s1): status 'running'"),
                  (("lr", "--out", png, os.path.join(d, "lr_text.csv")), "lr 'fast' or val_loss '5.0' is not a number"),
                  (("lr", "--out", png, os.path.join(d, "lr_zero.csv")), "lr 0 is not a positive learning rate"),
                  (("lr", "--out", png, os.path.join(d, "lr_none.csv")), "no run with a learning rate")]
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
            write_synthetic_sweeps(d)
            logs = [os.path.join(d, n, "log.jsonl") for n in ("pre", "mix")]
            analyses = [os.path.join(d, n, "analysis.json") for n in ("pre", "mix")]
            runs = {"loss.png": ("loss", *logs, "--labels", "Pre-LN,Mix-LN"),
                    "grads_one.png": ("grads", logs[0], "--step", "5"),
                    "grads_two.png": ("grads", *logs),
                    "angular.png": ("angular", analyses[1]),
                    "drop.png": ("drop", *analyses),
                    "rms.png": ("rms", *analyses, "--logy"),
                    "lr.png": ("lr", os.path.join(d, "a", "results.csv"), os.path.join(d, "b", "results.csv"))}
            for name, args in runs.items():
                out = os.path.join(d, name)
                r = run_plot(args[0], "--out", out, *args[1:])
                assert r.returncode == 0, (args, r.stderr)
                with open(out, "rb") as f:
                    assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
                if name == "lr.png":   # the run without a learning rate is named, not drawn
                    assert "1 run(s) without a learning rate" in r.stderr and "b/post-s2" in r.stderr, r.stderr
        with tempfile.TemporaryDirectory() as d:
            write_synthetic_snapshots(d)
            out = os.path.join(d, "drop_steps.png")
            r = run_plot("drop-steps", "--out", out, os.path.join(d, "pre"), os.path.join(d, "mix"), "--logy")
            assert r.returncode == 0, r.stderr
            # the snapshot without an analysis is named, not drawn
            assert "mix: 1 snapshot(s) not analysed, left out: step_000150" in r.stderr, r.stderr
            with open(out, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n", "drop_steps.png is not a PNG"
            # a run's final checkpoint, analysed in its folder, stands at the step its log ends on
            # (200 steps taken: 0..199), after its snapshots; where an analysed snapshot is of
            # that step, the snapshot's analysis is the one drawn
            import json
            import plot   # dev/, on the path since the reference's import
            for name, steps in (("pre", 200), ("mix", 150)):
                with open(os.path.join(d, name, "log.jsonl"), "w") as f:
                    for s in range(steps):
                        f.write(json.dumps({"step": s, "train_loss": 5.0}) + "\n")
                with open(os.path.join(d, name, "analysis.json"), "w") as f:
                    json.dump({"val_loss": 2.5, "tokens": 96,
                               "layer_drop": [{"layer": l, "val_loss": 2.6} for l in range(4)]}, f)
            pre = plot.snapshot_analyses(os.path.join(d, "pre"))
            assert [step for step, _ in pre] == [50, 100, 150, 200] and pre[-1][1]["val_loss"] == 2.5, pre
            mix = plot.snapshot_analyses(os.path.join(d, "mix"))   # step_000150 not analysed: the final one
            assert [step for step, _ in mix] == [50, 100, 150] and mix[-1][1]["val_loss"] == 2.5, mix
            with open(os.path.join(d, "pre", "log.jsonl"), "w") as f:   # a run that ended at its last snapshot
                for s in range(150):
                    f.write(json.dumps({"step": s, "train_loss": 5.0}) + "\n")
            pre = plot.snapshot_analyses(os.path.join(d, "pre"))
            assert [step for step, _ in pre] == [50, 100, 150] and pre[-1][1]["val_loss"] == 5.0 - 1.5, pre


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
