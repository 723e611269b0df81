"""
Generate the fixtures the C++ parity tests compare against (at test time; never committed).

    /usr/bin/python3 dev/make_fixtures.py --out DIR [--cases pre,post,mix,...] [--fp64-drift]

Cases (CASES below): Mix-LN by alpha (pre, post, mix, mix_half) and by an explicit per-layer list
of norm kinds (peri, deepnorm, lns, zoo: one layer of each kind, with LayerNorm, and hybrid,
hybrid_ln: HybridNorm layers beside others, preqkv: HybridNorm*'s first layer), all in fp32,
with mix_rows: mix's model on one padded document per row (train.bin 6*B rows of T, train.json's
"pad_id"; targets after a row's end are IGNORED_TARGET, -1);
and the bf16 cases (mix_bf16, mix_bf16_pure, zoo_bf16, hybrid_bf16): the mix, zoo and hybrid cases (same checkpoint,
data and hyperparameters) computed by the reference's emulation of --precision bf16 / bf16-pure;
mix_bf16_tc is mix_bf16 with 3 heads of 16 channels (the others have 4 of 12) and the emulation
of the engine's tensor-core attention.

For each case, DIR/<case>/ holds:
  config.json, model.safetensors   the initial checkpoint (norm weights and biases perturbed, see below)
  train.bin                        uint16 shard of 10*B*T + 1 random tokens in [0, V)
  train.json                       training hyperparameters (numbers)
  fixture.safetensors              inputs, targets (I32 (B,T), batch 0), logits (B,T,V), loss [1],
                                   grad.<name> at the initial weights, train_loss/lr/grad_norm (10,)
                                   of a 10-step run, final.<name> after it; __metadata__ holds the
                                   hyperparameters as strings.
bf16 cases: train.json and __metadata__ also hold "precision" ("bf16" or "bf16-pure"); the keys
above come from the bf16 emulation, and the fp32 reference's results from the same checkpoint and
data sit beside them under the prefix fp32.: fp32.logits, fp32.loss, fp32.grad.<name>,
fp32.train_loss, fp32.grad_norm, fp32.final.<name> (so a test can see how far bf16 itself moves
the numbers). The checkpoint stays the fp32 file; in bf16-pure the engine rounds it on load.
--fp64-drift also trains a float64 copy and prints how far fp32 lands from it: a floor for the
tolerances a C++ fp32 implementation can be held to.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

# Shared by all cases: small enough that every case takes well under a second.
V, C, NH, F, T, B = 97, 48, 4, 136, 24, 3
EMBED_STD = 0.02
STEPS, LR, WARMUP, MIN_LR_RATIO = 10, 1e-2, 3, 0.1

# name -> layers, the norm placement, seed, weight_decay, grad_clip. The placement is either
# alpha (Mix-LN: floor(alpha*L) Post-LN layers, the rest Pre-LN) or norm_layers (one kind per
# layer), with norm_type (default rmsnorm). weight_decay_on: what the weight decay applies to
# (reference.py make_optimizer; default "all", every parameter, as the cases were first made).
CASES = {
    "pre":      dict(L=4, alpha=0.0,  seed=1001, weight_decay=0.0, grad_clip=0.0),
    "post":     dict(L=4, alpha=1.0,  seed=1002, weight_decay=0.0, grad_clip=0.0),
    # grad_clip 0.5: about half the first step's grad norm (1.19; the norms stay in 1.13..1.20
    # over the 10 steps), so clipping engages on every step. make_case asserts that it engages
    # and that it moves the final weights (by ~5e-3 here, far above fp32 noise).
    "mix":      dict(L=4, alpha=0.25, seed=1003, weight_decay=0.0, grad_clip=0.5),
    "mix_half": dict(L=6, alpha=0.5,  seed=1004, weight_decay=0.1, grad_clip=0.0),
    "peri":     dict(L=4, norm_layers=["peri"] * 4,     seed=1005, weight_decay=0.0, grad_clip=0.0),
    "deepnorm": dict(L=4, norm_layers=["deepnorm"] * 4, seed=1006, weight_decay=0.0, grad_clip=0.0),
    "lns":      dict(L=4, norm_layers=["lns"] * 4,      seed=1007, weight_decay=0.0, grad_clip=0.0),
    # weight decay on the matrices only: the norms' weights and biases (LayerNorm) are left alone
    "zoo":      dict(L=5, norm_layers=["post", "deepnorm", "peri", "lns", "pre"], norm_type="layernorm",
                     seed=1008, weight_decay=0.1, weight_decay_on="matrices", grad_clip=0.0),
    # HybridNorm beside the kinds it meets at its edges: a pre layer after a hybrid one normalises
    # the hybrid's output, a hybrid layer after a pre one takes the stream as it is
    "hybrid":   dict(L=4, norm_layers=["hybrid", "pre", "hybrid", "post"], seed=1009, weight_decay=0.0, grad_clip=0.0),
    "hybrid_ln": dict(L=3, norm_layers=["peri", "hybrid", "hybrid"], norm_type="layernorm", seed=1010,
                      weight_decay=0.1, grad_clip=0.0),
    # preqkv (HybridNorm*'s first layer: pre with QKV-Norm) first, as in HybridNorm*; after a hybrid
    # layer, whose output it normalises with its own N1; and before a pre layer, whose N1 it runs
    # fused with its last residual add
    "preqkv":   dict(L=4, norm_layers=["preqkv", "hybrid", "preqkv", "pre"], seed=1011, weight_decay=0.0,
                     grad_clip=0.0),
    # one document per row, padded with token 0 (the paper's C4 data, T5's <pad>): the loader's
    # --pad-id; documents of every length from 1 token to longer than the row (make_rows)
    "mix_rows": dict(L=4, alpha=0.25, seed=1012, weight_decay=0.0, grad_clip=0.0, pad_id=0),
}
# bf16 emulation (reference.py, "Precision"): an fp32 case with a "precision" key. Same seed, so
# the same checkpoint and tokens as the case they copy.
CASES["mix_bf16"] = dict(CASES["mix"], precision="bf16")
CASES["mix_bf16_pure"] = dict(CASES["mix"], precision="bf16-pure")
CASES["zoo_bf16"] = dict(CASES["zoo"], precision="bf16")
CASES["hybrid_bf16"] = dict(CASES["hybrid"], precision="bf16")
# mix_bf16 with 3 heads of 16 channels instead of 4 of 12 (a head size that is a multiple of 16,
# which sends the engine's fused attention in bf16 to its tensor-core kernels), emulating that
# attention: P and dS rounded to bf16 before their products (reference.py, _TensorCoreAttention).
CASES["mix_bf16_tc"] = dict(CASES["mix"], precision="bf16", NH=3, attention="tensor-core")

# the results of a reference run that a bf16 case also records from the fp32 reference
FP32_KEYS = ("logits", "loss", "grad.", "train_loss", "grad_norm", "final.")


def case_config(spec):
    """The Config of a case: Mix-LN from alpha, or the explicit norm_layers list."""
    if ("alpha" in spec) == ("norm_layers" in spec):
        raise ValueError(f"a case gives exactly one of alpha and norm_layers: {spec}")
    return ref.Config.make(V, C, spec["L"], spec.get("NH", NH), F, T, spec.get("alpha"),
                           norm_layers=spec.get("norm_layers"), norm_type=spec.get("norm_type", "rmsnorm"))


def reference_train(model, train_args, pad_id=None):
    """ref.train on a case's train_args: the positional arguments, then weight_decay_on."""
    *args, weight_decay_on = train_args
    return ref.train(model, *args, weight_decay_on=weight_decay_on, pad_id=pad_id)


def make_rows(gen, rows, pad_id):
    """Tokens of `rows` rows of T, one document each, padded with pad_id: documents of 1 to T + 8
    tokens (a row of 1 has no target; one of T or more is cut to T), their tokens drawn from the
    vocabulary without pad_id. The first rows take the edge lengths 1, T - 1, T and T + 8."""
    lengths = torch.randint(1, T + 9, (rows,), generator=gen)
    lengths[:4] = torch.tensor([1, T - 1, T, T + 8])
    out = torch.full((rows, T), pad_id, dtype=torch.int64)
    for r in range(rows):
        n = min(int(lengths[r]), T)
        doc = torch.randint(0, V - 1, (n,), generator=gen)
        out[r, :n] = doc + (doc >= pad_id).long()  # skips pad_id
    return out.reshape(-1).numpy()


def check_scales_matter(name, d, tokens, train_args, log, pad_id=None):
    """For each layer kind with a constant of its own (deepnorm's a = (2L)^(1/4) on the residual,
    lns's 1/sqrt(l+1) on the norm outputs), the same 10 steps with that constant set to 1 must
    end elsewhere by more than float noise, or the case would not test it."""
    for kind, attr in (("deepnorm", "deepnorm_alpha"), ("lns", "lns_scale")):
        model = ref.load_checkpoint(d)
        layers = [layer for layer in model.model.layers if layer.kind == kind]
        if not layers:
            continue
        if kind == "lns" and all(layer.layer_idx == 0 for layer in layers):
            continue  # 1/sqrt(0 + 1) = 1: nothing to check
        for layer in layers:
            setattr(layer, attr, 1.0)
        unscaled = reference_train(model, train_args, pad_id)
        diff = max(abs(a[0] - b[0]) for a, b in zip(log, unscaled))
        assert diff > 1e-4, f"{name}: {kind} with its scale set to 1 changed the train losses by only {diff:.2e}"


def run_reference(d, tokens, train_args, pad_id=None):
    """Forward + backward of batch 0 at the initial weights, then 10 training steps from them, both
    from the checkpoint in d and in the current precision -> (results dict in fixture order, the
    training log, the loss)."""
    model = ref.load_checkpoint(d)
    x, y = ref.batch(tokens, 0, B, T, pad_id)
    logits, loss = model(x, y)
    loss.backward()
    fx = {
        "inputs": x.to(torch.int32),
        "targets": y.to(torch.int32),
        "logits": logits.detach(),
        "loss": loss.detach().reshape(1),
    }
    for pname, p in model.named_parameters():
        fx["grad." + pname] = p.grad.detach().clone()

    # 10 training steps from the same initial weights.
    model = ref.load_checkpoint(d)
    log = reference_train(model, train_args, pad_id)
    fx["train_loss"] = torch.tensor([l for l, _, _ in log], dtype=torch.float32)
    fx["lr"] = torch.tensor([lr for _, lr, _ in log], dtype=torch.float32)
    fx["grad_norm"] = torch.tensor([g for _, _, g in log], dtype=torch.float32)
    for pname, p in model.named_parameters():
        fx["final." + pname] = p.detach().clone()
    return fx, log, loss, model


def rel_err(a, b):
    """max|a - b| / max|b| over one tensor."""
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def print_bf16_vs_fp32(fx, fp32):
    """The bf16 emulation against the fp32 reference: logits, the worst gradient and the worst
    final parameter tensor (relative error per tensor, rel_err)."""
    def worst(prefix):
        return max((rel_err(fx[k], fp32[k]), k[len(prefix):]) for k in fp32 if k.startswith(prefix))
    g, gname = worst("grad.")
    w, wname = worst("final.")
    print(f"{'':9s} bf16 vs fp32 (max|a-b|/max|b|): logits {rel_err(fx['logits'], fp32['logits']):.2e}, "
          f"loss {abs(float(fx['loss']) - float(fp32['loss'])):.2e} (abs), "
          f"train_loss {rel_err(fx['train_loss'], fp32['train_loss']):.2e}, "
          f"worst grad {g:.2e} ({gname}), worst final {w:.2e} ({wname})")


def make_case(out, name, spec, fp64_drift):
    t0 = time.perf_counter()
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)

    # Initial checkpoint. Norm weights are moved off 1 (and LayerNorm biases off 0), drawn in
    # named_parameters order, so that a C++ bug that ignores a norm weight or bias (or uses the
    # wrong one of a layer's norms) changes the numbers.
    cfg = case_config(spec)
    model = ref.MixLNForCausalLM(cfg)
    gen = ref.init_weights(model, spec["seed"], EMBED_STD)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ref.is_norm_weight(pname):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif ref.is_norm_bias(pname):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    ref.save_checkpoint(model, d)

    tok_gen = torch.Generator().manual_seed(spec["seed"] + 500)
    pad_id = spec.get("pad_id")
    if pad_id is None:
        tokens = torch.randint(0, V, (10 * B * T + 1,), generator=tok_gen).numpy()
    else:  # 6 batches of rows, so that the 10 steps also wrap around to the first
        tokens = make_rows(tok_gen, 6 * B, pad_id)
    ref.shard_save(os.path.join(d, "train.bin"), tokens)
    tokens = ref.shard_load(os.path.join(d, "train.bin"))  # use exactly what the C++ side reads

    hp = dict(batch=B, seq_len=T, steps=STEPS, lr=LR, warmup=WARMUP, min_lr_ratio=MIN_LR_RATIO,
              weight_decay=spec["weight_decay"], weight_decay_on=spec.get("weight_decay_on", "all"),
              grad_clip=spec["grad_clip"])
    precision = spec.get("precision", "fp32")
    if precision != "fp32":  # recorded only where it is not the default, so fp32 cases stay as they were
        hp["precision"] = precision
    if "attention" in spec:  # likewise: the attention the case emulates, where it is not the plain one
        hp["attention"] = spec["attention"]
    if pad_id is not None:  # likewise: one document per row, padded with this token
        hp["pad_id"] = pad_id
    with open(os.path.join(d, "train.json"), "w") as f:
        json.dump(hp, f, indent=2)
        f.write("\n")

    # Forward + backward of batch 0 at the initial weights, from the checkpoint as written, and
    # 10 training steps from the same initial weights, in the case's precision.
    train_args = (tokens, B, T, STEPS, LR, WARMUP, MIN_LR_RATIO, spec["weight_decay"], spec["grad_clip"],
                  spec.get("weight_decay_on", "all"))
    ref.Attention.tensor_core = spec.get("attention") == "tensor-core"
    with ref.using_precision(precision):
        fx, log, loss, model = run_reference(d, tokens, train_args, pad_id)
        if pad_id is not None:
            # the case must ignore targets: some in the first batch, and a row with none at all
            y = fx["targets"]
            assert (y == ref.IGNORED_TARGET).any() and (y != ref.IGNORED_TARGET).any(), f"{name}: no ignored targets"
            assert ((y == ref.IGNORED_TARGET).all(dim=1)).any(), f"{name}: no row without a target"

        if spec["grad_clip"] > 0:
            # Clipping must engage, and must change the result by more than float noise, or the
            # case would not test it.
            assert any(g > spec["grad_clip"] for _, _, g in log), f"{name}: grad_clip never engaged"
            unclipped = ref.load_checkpoint(d)
            reference_train(unclipped, train_args[:-2] + (0.0, train_args[-1]), pad_id)
            diff = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), unclipped.parameters()))
            assert diff > 1e-4, f"{name}: clipping changed the final weights by only {diff:.2e}"

        if spec["weight_decay"] > 0 and train_args[-1] == "matrices":
            # Every norm weight and bias must end elsewhere when decayed too, or the case would
            # not test which parameters the decay skips
            decayed_all = ref.load_checkpoint(d)
            reference_train(decayed_all, train_args[:-1] + ("all",), pad_id)
            for (pname, p), q in zip(model.named_parameters(), decayed_all.parameters()):
                diff = float((p - q).abs().max())
                if p.dim() < 2:
                    assert diff > 1e-4, f"{name}: decaying {pname} too changed it by only {diff:.2e}"

        check_scales_matter(name, d, tokens, train_args, log, pad_id)

    if precision != "fp32":
        # The fp32 reference from the same checkpoint and data, under fp32.<key>.
        fp32, _, _, _ = run_reference(d, tokens, train_args, pad_id)
        fp32 = {k: v for k, v in fp32.items() if k.startswith(FP32_KEYS)}
        # the emulation must be on: bf16 results differ from fp32 ones, and the logits are stored
        # (bf16-pure: the parameters too) as bf16 values
        assert not torch.equal(fx["logits"], fp32["logits"]), f"{name}: bf16 logits equal the fp32 ones"
        assert ref.is_bf16_representable(fx["logits"]), f"{name}: logits are not bf16 values"
        if precision == "bf16-pure":
            assert all(ref.is_bf16_representable(v) for k, v in fx.items() if k.startswith(("final.", "grad."))), \
                f"{name}: bf16-pure parameters or gradients are not bf16 values"
        fx.update({"fp32." + k: v for k, v in fp32.items()})

    ref.safetensors_save(os.path.join(d, "fixture.safetensors"), fx, {k: str(v) for k, v in hp.items()})

    secs = time.perf_counter() - t0
    if cfg.post_ln_layers is not None:  # Mix-LN form
        placement = f"post_ln_layers={cfg.post_ln_layers}"
    else:
        placement = f"norm_layers={','.join(cfg.norm_layers)}"
    if cfg.norm_type != "rmsnorm":
        placement += f" norm_type={cfg.norm_type}"
    if precision != "fp32":
        placement += f" precision={precision}"
    print(f"{name:9s} {placement} loss={float(loss):.6f} "
          f"train_loss[0]={log[0][0]:.6f} train_loss[-1]={log[-1][0]:.6f} "
          f"grad_norm[0]={log[0][2]:.4f} {secs:.2f}s")
    if precision != "fp32":
        print_bf16_vs_fp32(fx, {k[len("fp32."):]: v for k, v in fx.items() if k.startswith("fp32.")})

    if fp64_drift and precision == "fp32":  # (a bf16 case compares with fp32 above instead)
        m64 = ref.load_checkpoint(d).double()
        log64 = reference_train(m64, train_args, pad_id)
        dl = max(abs(a[0] - b[0]) for a, b in zip(log, log64))
        dw = max(float((p.double() - q).abs().max()) for p, q in zip(model.parameters(), m64.parameters()))
        dn = max(abs(a[2] - b[2]) / b[2] for a, b in zip(log, log64))
        print(f"{'':9s} fp32 vs fp64 after {STEPS} steps: max |train_loss diff| {dl:.2e}, max |weight diff| {dw:.2e}, "
              f"max relative step grad norm diff {dn:.2e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    p.add_argument("--fp64-drift", action="store_true")
    a = p.parse_args()
    t0 = time.perf_counter()
    names = a.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown case(s) {','.join(unknown)}; known: {','.join(CASES)}")
    for name in names:
        make_case(a.out, name, CASES[name], a.fp64_drift)
    print(f"fixtures written to {a.out} in {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
