"""
mixln PyTorch reference: the independent implementation the C++ engine is tested against.

It is written from the model facts in MIXLN.md, not from the C++ code, so that a
misunderstanding on one side shows up as a test failure instead of being copied.
Everything is plain fp32 PyTorch, readable top to bottom:

  file formats   safetensors (tiny reader/writer), llm.c token shards, config.json
  model          LLaMA with a norm placement per layer (`norm_layers`): pre, post, peri (Sandwich),
                 deepnorm, lns (LayerNorm Scaling), hybrid (HybridNorm), preqkv (pre with
                 HybridNorm's q, k, v norms: HybridNorm*'s first layer); Mix-LN is
                 [post]*floor(alpha*L) + [pre]*rest.
                 Norms are RMSNorm or LayerNorm (`norm_type`); equations in DecoderLayer
  precision      fp32 (default) or an emulation of the engine's --precision bf16 / bf16-pure:
                 fp32 tensors rounded to bf16 values wherever the engine stores bf16 (store,
                 read_weight; see "Precision" below)
  training       AdamW + GaLore's warmup/cosine schedule (or linear, constant, wsd) + optional gradient clipping
  analysis       angular distance between layer inputs, loss with one layer dropped
  CLI            init / eval / analyze / train / bench  (run with --help); init and bench take
                 --alpha A or --norm-layers post,pre,..., --norm-type, --scaled-init; train and
                 eval take --precision fp32|bf16|bf16-pure

Parameter names are exactly the Hugging Face LLaMA names (Gemma-2's for the four norms of a peri
layer, OLMo-2's `self_attn.q_norm` / `k_norm` (and `v_norm`) for the QKV norms of a hybrid or preqkv layer;
`<norm>.bias` beside each weight with LayerNorm), with Linear weights stored
(out_features, in_features), so a checkpoint written here is read by the C++ engine and back.
config.json always holds `norm_layers` and `norm_type`, and `post_ln_layers` / `mixln_alpha`
where the list has the Mix-LN form.

Runs on the Debian Python (torch 1.13): no torch 2.x APIs.
"""

import argparse
import contextlib
import json
import math
import os
import struct
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# safetensors: 8-byte LE u64 header length N, N bytes of JSON (space padded to a
# multiple of 8), then the raw little-endian tensor data; offsets are relative to
# the first byte after the header.

# safetensors dtype name -> numpy dtype (explicitly little-endian)
_ST_NP = {"F32": "<f4", "I32": "<i4", "F16": "<f2", "I64": "<i8", "F64": "<f8"}
_TORCH_ST = {torch.float32: "F32", torch.int32: "I32"}  # what we write


def safetensors_save(path, tensors, metadata=None):
    """Write a dict name -> tensor (float32 or int32) to `path`, atomically."""
    header = {}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in _TORCH_ST:
            raise TypeError(f"safetensors_save: {name} has dtype {t.dtype}; cast to float32 or int32")
        st = _TORCH_ST[t.dtype]
        data = t.numpy().astype(_ST_NP[st], copy=False).tobytes()
        header[name] = {"dtype": st, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"safetensors metadata must be str -> str, got {k!r}: {v!r}")
        header["__metadata__"] = dict(metadata)
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)  # keeps the data 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)  # a reader never sees a half-written file


def safetensors_load(path):
    """Read a safetensors file -> (dict name -> tensor, metadata dict or {}).
    F32/I32/F16/F64/I64 come back in their own dtype; BF16 is widened to float32."""
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", buf[:8])
    if 8 + n > len(buf):
        raise ValueError(f"{path}: header length {n} runs past the end of the file")
    header = json.loads(buf[8:8 + n].decode("utf-8"))
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(buf)[8 + n:]
    tensors = {}
    for name, info in header.items():
        dtype, shape = info["dtype"], info["shape"]
        begin, end = info["data_offsets"]
        if not (0 <= begin <= end <= len(data)):
            raise ValueError(f"{path}: {name} data_offsets {begin},{end} out of range")
        count = int(np.prod(shape)) if shape else 1
        if dtype == "BF16":
            # bf16 is the top half of an f32: widen by shifting into the high 16 bits
            raw = np.frombuffer(data[begin:end], dtype="<u2")
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        elif dtype in _ST_NP:
            arr = np.frombuffer(data[begin:end], dtype=_ST_NP[dtype])
        else:
            raise ValueError(f"{path}: {name} has unsupported dtype {dtype}")
        if arr.size != count:
            raise ValueError(f"{path}: {name} has {arr.size} values, shape {shape} needs {count}")
        tensors[name] = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True).reshape(shape))
    return tensors, metadata


# -----------------------------------------------------------------------------
# llm.c token shards: 256 LE int32 header (magic, version, token count, 0...), then tokens.

SHARD_MAGIC_U16, SHARD_VERSION_U16 = 20240520, 1
SHARD_MAGIC_U32, SHARD_VERSION_U32 = 20240801, 7


def shard_save(path, tokens, uint32=False):
    tokens = np.asarray(tokens)
    dtype = "<u4" if uint32 else "<u2"
    if tokens.size and (tokens.min() < 0 or tokens.max() >= (2**32 if uint32 else 2**16)):
        raise ValueError(f"shard_save: token ids out of range for {'uint32' if uint32 else 'uint16'}")
    header = np.zeros(256, dtype="<i4")
    header[0], header[1] = (SHARD_MAGIC_U32, SHARD_VERSION_U32) if uint32 else (SHARD_MAGIC_U16, SHARD_VERSION_U16)
    header[2] = tokens.size
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype).tobytes())
    os.replace(tmp, path)


def shard_load(path):
    """-> np.ndarray of token ids (uint16 or uint32, as stored)."""
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(256 * 4), dtype="<i4")
        if header.size != 256:
            raise ValueError(f"{path}: too short for a shard header")
        magic, version, n = int(header[0]), int(header[1]), int(header[2])
        if (magic, version) == (SHARD_MAGIC_U16, SHARD_VERSION_U16):
            dtype = "<u2"
        elif (magic, version) == (SHARD_MAGIC_U32, SHARD_VERSION_U32):
            dtype = "<u4"
        else:
            raise ValueError(f"{path}: bad shard magic/version {magic}/{version}")
        tokens = np.frombuffer(f.read(), dtype=dtype)
    if tokens.size != n:
        raise ValueError(f"{path}: header says {n} tokens, file holds {tokens.size}")
    return tokens.astype(tokens.dtype.newbyteorder("="))


# -----------------------------------------------------------------------------
# Config
#
# Where each layer's norms sit is a list `norm_layers`, one kind per layer (MIXLN.md, "Norm
# placement" and "Related placements"); the equations are in DecoderLayer. Mix-LN is the list
# [post]*floor(alpha*L) + [pre]*(L - that), for which `post_ln_layers` / `mixln_alpha` remain the
# shorthand. `norm_type` says what every norm (the layers' and the final one) is.

NORM_KINDS = ("pre", "post", "peri", "deepnorm", "lns", "hybrid", "preqkv")
NORM_TYPES = ("rmsnorm", "layernorm")


def post_ln_layers_for(alpha, L):
    # floor(alpha * L), with 1e-6 added because alpha * L in floating point can land just
    # below an integer: 0.29 * 100 = 28.999999999999996 must still give 29 Post-LN layers.
    return int(math.floor(alpha * L + 1e-6))


def norm_layers_for_alpha(alpha, L):
    """The Mix-LN list for alpha: the first floor(alpha*L) layers post, the rest pre."""
    k = post_ln_layers_for(alpha, L)
    if not 0 <= k <= L:
        raise ValueError(f"alpha {alpha} gives {k} Post-LN layers, not in 0..{L}")
    return ["post"] * k + ["pre"] * (L - k)


def check_norm_layers(norm_layers, L):
    """Validate a per-layer list of norm kinds for L layers -> the list (a new list of str).
    Raises ValueError naming the problem: not a list, wrong length, or an unknown kind."""
    if isinstance(norm_layers, str) or not isinstance(norm_layers, (list, tuple)):
        raise ValueError(f"norm_layers must be a list of kinds ({', '.join(NORM_KINDS)}), got {norm_layers!r}")
    if len(norm_layers) != L:
        raise ValueError(f"norm_layers has {len(norm_layers)} entries, but the model has {L} layers "
                         f"(num_hidden_layers)")
    for l, kind in enumerate(norm_layers):
        if kind not in NORM_KINDS:
            raise ValueError(f"norm_layers[{l}] is {kind!r}, not a known kind ({', '.join(NORM_KINDS)})")
    return list(norm_layers)


def check_norm_type(norm_type):
    if norm_type not in NORM_TYPES:
        raise ValueError(f"norm_type {norm_type!r} is not known ({', '.join(NORM_TYPES)})")
    return norm_type


def parse_norm_layers(text, L=None):
    """"post,post,pre,pre" (as a CLI takes it) -> ["post", "post", "pre", "pre"]; spaces around a
    kind are ignored. Unknown kinds are refused; so is a wrong length when L is given."""
    kinds = [k.strip() for k in text.split(",")]
    return check_norm_layers(kinds, len(kinds) if L is None else L)


def mixln_post_count(norm_layers):
    """k if the list has the Mix-LN form (k posts, then only pres; k = 0 and k = L included),
    else None."""
    k = 0
    while k < len(norm_layers) and norm_layers[k] == "post":
        k += 1
    return k if all(kind == "pre" for kind in norm_layers[k:]) else None


@dataclass
class Config:
    vocab_size: int               # V
    hidden_size: int              # C
    num_hidden_layers: int        # L
    num_attention_heads: int      # NH
    intermediate_size: int        # F
    max_position_embeddings: int  # T (longest sequence the model is used with)
    rms_norm_eps: float = 1e-6    # eps of every norm, RMSNorm and LayerNorm alike
    rope_theta: float = 10000.0
    # Norm placement. norm_layers (one of NORM_KINDS per layer) is what the model runs. Given only
    # post_ln_layers (or neither), it is the Mix-LN list with that many Post-LN layers.
    # After construction post_ln_layers / mixln_alpha describe the list: for a list of the Mix-LN
    # form, k and the alpha it came from (the given one when floor(alpha*L) == k, else k/L);
    # for any other list both are None. Treat a Config as read-only once made.
    post_ln_layers: int = None    # layers 0..post_ln_layers-1 are Post-LN, the rest Pre-LN
    mixln_alpha: float = None     # the alpha post_ln_layers came from (kept for the record)
    norm_layers: list = None      # e.g. ["post", "pre", "pre", "pre"]
    norm_type: str = "rmsnorm"    # "rmsnorm" (weight only) or "layernorm" (weight and bias)

    def __post_init__(self):
        L = self.num_hidden_layers
        check_norm_type(self.norm_type)
        if self.norm_layers is None:
            k = 0 if self.post_ln_layers is None else self.post_ln_layers
            if not 0 <= k <= L:
                raise ValueError(f"post_ln_layers {k} not in 0..{L}")
            self.norm_layers = ["post"] * k + ["pre"] * (L - k)
        else:
            self.norm_layers = check_norm_layers(self.norm_layers, L)
            k = mixln_post_count(self.norm_layers)
            if self.post_ln_layers is not None and k is not None and k != self.post_ln_layers:
                raise ValueError(f"post_ln_layers {self.post_ln_layers} disagrees with norm_layers "
                                 f"{self.norm_layers} ({k} Post-LN layers)")
        k = mixln_post_count(self.norm_layers)
        if k is None:  # not Mix-LN: no alpha describes it
            self.post_ln_layers, self.mixln_alpha = None, None
        else:
            self.post_ln_layers = k
            alpha = self.mixln_alpha
            if alpha is None or post_ln_layers_for(float(alpha), L) != k:
                alpha = k / L if L else 0.0
            self.mixln_alpha = float(alpha)

    @staticmethod
    def make(V, C, L, NH, F, T, alpha=None, norm_layers=None, norm_type="rmsnorm"):
        """From sizes and either alpha (Mix-LN) or norm_layers (which wins when both are given)."""
        if norm_layers is None:
            if alpha is None:
                raise ValueError("Config.make: give alpha or norm_layers")
            norm_layers = norm_layers_for_alpha(alpha, L)
        return Config(vocab_size=V, hidden_size=C, num_hidden_layers=L, num_attention_heads=NH,
                      intermediate_size=F, max_position_embeddings=T,
                      mixln_alpha=None if alpha is None else float(alpha),
                      norm_layers=list(norm_layers), norm_type=norm_type)

    def check(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by heads {self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("head_dim must be even for RoPE")
        check_norm_layers(self.norm_layers, self.num_hidden_layers)
        check_norm_type(self.norm_type)
        if self.post_ln_layers is not None and not 0 <= self.post_ln_layers <= self.num_hidden_layers:
            raise ValueError(f"post_ln_layers {self.post_ln_layers} not in 0..{self.num_hidden_layers}")


def config_to_json(cfg):
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,  # no GQA
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    # the Mix-LN shorthand only where the list has that form
    k = mixln_post_count(cfg.norm_layers)
    if k is not None:
        alpha = cfg.mixln_alpha
        if alpha is None or post_ln_layers_for(alpha, cfg.num_hidden_layers) != k:
            alpha = k / cfg.num_hidden_layers if cfg.num_hidden_layers else 0.0
        d["post_ln_layers"] = k
        d["mixln_alpha"] = alpha
    d["norm_type"] = cfg.norm_type
    d["norm_layers"] = list(cfg.norm_layers)
    return d


def config_from_json(d):
    """Build a Config from a config.json dict; extra keys are ignored, unsupported values rejected.
    Placement: norm_layers if present (its length must be L and every kind known; a post_ln_layers
    beside it must agree when the list has the Mix-LN form); else post_ln_layers; else
    floor(mixln_alpha * L) (0 without either key: a stock LLaMA is pure Pre-LN)."""
    for key, want in (("hidden_act", "silu"), ("tie_word_embeddings", False),
                      ("attention_bias", False), ("mlp_bias", False)):
        if key in d and d[key] != want:
            raise ValueError(f"config.json: {key}={d[key]!r} is not supported (need {want!r})")
    NH = int(d["num_attention_heads"])
    if int(d.get("num_key_value_heads", NH)) != NH:
        raise ValueError("config.json: num_key_value_heads != num_attention_heads (GQA not supported)")
    L = int(d["num_hidden_layers"])
    alpha = float(d.get("mixln_alpha", 0.0))
    try:
        norm_type = check_norm_type(d.get("norm_type", "rmsnorm"))
        if "norm_layers" in d:
            norm_layers = check_norm_layers(d["norm_layers"], L)
            k = mixln_post_count(norm_layers)
            if "post_ln_layers" in d and k is not None and int(d["post_ln_layers"]) != k:
                raise ValueError(f"post_ln_layers {d['post_ln_layers']} disagrees with norm_layers "
                                 f"{norm_layers} ({k} Post-LN layers)")
            post_ln_layers = None
        else:
            norm_layers = None
            post_ln_layers = int(d["post_ln_layers"]) if "post_ln_layers" in d else post_ln_layers_for(alpha, L)
        cfg = Config(vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]), num_hidden_layers=L,
                     num_attention_heads=NH, intermediate_size=int(d["intermediate_size"]),
                     max_position_embeddings=int(d["max_position_embeddings"]),
                     rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(d.get("rope_theta", 10000.0)),
                     post_ln_layers=post_ln_layers, mixln_alpha=alpha,
                     norm_layers=norm_layers, norm_type=norm_type)
        cfg.check()
    except ValueError as e:
        raise ValueError(f"config.json: {e}") from None
    return cfg


def config_save(cfg, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config_to_json(cfg), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def config_load(path):
    with open(path) as f:
        return config_from_json(json.load(f))


# -----------------------------------------------------------------------------
# Precision: the engine's bf16 storage, emulated in fp32
#
# The engine's --precision bf16 keeps fp32 master weights and fp32 AdamW moments, but before each
# forward its kernels read a bf16 copy of EVERY parameter (norm weights and biases included), and
# every activation and every activation gradient is stored in bf16. A kernel computes in fp32 from
# its bf16 inputs and rounds once per value it stores. Weight gradients are fp32.
# --precision bf16-pure: the parameters themselves, their gradients and both AdamW moments are
# bf16 as well.
#
# The emulation never computes in bf16 (PyTorch's CPU bf16 matmul is inaccurate, ~7% relative
# error at K = 4096): every tensor stays float32 and is ROUNDED to a bf16 value (to nearest, ties
# to even, as the engine) at the points where the engine stores bf16. Two functions mark them:
#
#   store(x)        an activation the engine stores: forward rounds x; backward rounds the
#                   gradient flowing back into x (the engine stores that gradient in bf16 too;
#                   autograd has summed every use of x before it reaches this point).
#   read_weight(p)  the value of parameter p a kernel reads: p rounded. Its gradient passes through
#                   unrounded in bf16 (fp32 weight gradients) and is rounded in bf16-pure.
#
# Linear, the norms (RMSNorm, LayerNorm) and Embedding read their parameters through read_weight
# and store their output; every other storage point (RoPE outputs, the attention output before
# o_proj, SwiGLU, each residual sum, LayerNorm Scaling's product) is a store(...) call in
# Attention.forward, MLP.forward and DecoderLayer.forward. Softmax, cross-entropy and the norm
# statistics are computed in fp32 from the stored inputs and not rounded.
# In fp32 both functions return their argument itself, so the fp32 model is bit for bit what it
# is without them. The optimizer side (fp32 masters in bf16, an explicit bf16 AdamW step in
# bf16-pure) is in make_optimizer and train.

PRECISIONS = ("fp32", "bf16", "bf16-pure")
_precision = "fp32"  # what store / read_weight / make_optimizer / train do now; see using_precision


def check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not known ({', '.join(PRECISIONS)})")
    return precision


def get_precision():
    return _precision


def set_precision(precision):
    """Make `precision` (one of PRECISIONS) the mode of everything run from now on."""
    global _precision
    _precision = check_precision(precision)


@contextlib.contextmanager
def using_precision(precision):
    """with using_precision("bf16"): ... runs the block in that mode, then restores the previous one.
    The mode is read when a forward runs; its backward rounds as that forward decided."""
    previous = _precision
    set_precision(precision)
    try:
        yield
    finally:
        set_precision(previous)


def round_bf16(x):
    """x rounded to the nearest bf16 value (ties to even), in x's own dtype."""
    return x.to(torch.bfloat16).to(x.dtype)


def is_bf16_representable(x):
    """Whether every value of x is a bf16 value (rounding leaves it as it is)."""
    return torch.equal(round_bf16(x), x)


class _RoundValueAndGrad(torch.autograd.Function):
    """Forward: round to bf16. Backward: round the incoming gradient to bf16."""

    @staticmethod
    def forward(ctx, x):
        return round_bf16(x)

    @staticmethod
    def backward(ctx, grad):
        return round_bf16(grad)


class _RoundValue(torch.autograd.Function):
    """Forward: round to bf16. Backward: the gradient unchanged (straight through)."""

    @staticmethod
    def forward(ctx, x):
        return round_bf16(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def store(x):
    """x as the engine stores it: rounded to bf16, with its gradient rounded on the way back
    (bf16 and bf16-pure); x itself in fp32."""
    return x if _precision == "fp32" else _RoundValueAndGrad.apply(x)


def read_weight(p):
    """Parameter p as a kernel reads it: p itself in fp32; its bf16 copy in bf16 (the gradient
    reaches p in fp32); in bf16-pure p already holds bf16 values and its gradient is stored in bf16."""
    if _precision == "fp32":
        return p
    if _precision == "bf16":
        return _RoundValue.apply(p)
    return _RoundValueAndGrad.apply(p)


# -----------------------------------------------------------------------------
# Model


class RMSNorm(nn.Module):
    """rms(x) = weight * x / sqrt(mean(x^2) + eps), over the last dimension; no bias.
    Output stored (store); the weight read through read_weight."""

    def __init__(self, C, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))
        self.eps = eps

    def forward(self, x):  # x (..., C)
        # The model is fp32 throughout, so the mean of squares is fp32 here (float64 only when the
        # whole model is .double(), as in the gradcheck test).
        return store(read_weight(self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)))


class LayerNorm(nn.Module):
    """ln(x) = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, over the last dimension, with the
    biased variance (mean of squared deviations). Weight starts at 1, bias at 0.
    Output stored (store); weight and bias read through read_weight."""

    def __init__(self, C, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))
        self.bias = nn.Parameter(torch.zeros(C))
        self.eps = eps

    def forward(self, x):  # x (..., C)
        xc = x - x.mean(-1, keepdim=True)                      # centred
        var = xc.pow(2).mean(-1, keepdim=True)                 # biased variance
        return store(xc * torch.rsqrt(var + self.eps) * read_weight(self.weight) + read_weight(self.bias))


def make_norm(cfg):
    """One norm of the kind cfg.norm_type says, over hidden_size, with eps = rms_norm_eps."""
    cls = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}[check_norm_type(cfg.norm_type)]
    return cls(cfg.hidden_size, cfg.rms_norm_eps)


class Linear(nn.Linear):
    """nn.Linear without bias (weight (out, in)): y = x @ W^T, the weight read through read_weight
    and the output stored (store)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return store(F.linear(x, read_weight(self.weight)))


class Embedding(nn.Embedding):
    """nn.Embedding (weight (V, C)): rows of the table as read_weight gives it, stored (store):
    the rows are bf16 values already, but the gradient flowing back into them is rounded."""

    def forward(self, inputs):
        return store(F.embedding(inputs, read_weight(self.weight)))


def rope_cos_sin(T, hs, theta):
    """-> cos, sin, each (T, hs) float32, for positions 0..T-1.
    Computed in float64 and cast to float32 at the end, as the C++ engine does. (Hugging Face
    computes them in fp32, which differs by ~1e-5 at large positions: t * inv_freq loses bits.)"""
    inv_freq = 1.0 / (theta ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs))  # (hs/2,)
    t = torch.arange(T, dtype=torch.float64)                                          # (T,)
    angle = torch.outer(t, inv_freq)                                                  # (T, hs/2)
    emb = torch.cat([angle, angle], dim=-1)                                           # (T, hs)
    return emb.cos().float(), emb.sin().float()


def rotate_half(x):  # x (..., hs) -> (-x2, x1), the Hugging Face pairing (i with i + hs/2)
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class _TensorCoreAttention(torch.autograd.Function):
    """The engine's bf16 attention on tensor cores (layers/attention.cuh, fused attention in bf16
    with a head size that is a multiple of 16), emulated in fp32. It rounds two things the
    explicit softmax attention keeps in fp32, because a tensor-core product takes bf16 operands:
    the probabilities P before P v (forward) and P^T dy (backward), and the score gradients dS
    before dS^T q and dS k. The forward walks the keys in tiles of 64 with an online softmax, as
    the kernel does, since P is rounded relative to the running maximum m of the tiles seen so far.
    q, k, v (B, NH, T, hs) hold bf16 values; returns y before its store() rounding.
    Like the kernel, the softmax works in base 2: scores times scale * log2(e), exp(x - m) as
    2^(x - m) with results below 2^-126 flushed to 0 (the GPU's ex2.approx.ftz), and lse back in
    natural-log units, (m + log2(sum)) * ln(2)."""

    TILE = 64
    LOG2E = float(np.float32(1.44269504088896341))  # the kernel's float constants
    LN2 = float(np.float32(0.693147180559945309))

    @staticmethod
    def exp2(x):  # attention_exp2_cpu
        return torch.where(x < -126, torch.zeros_like(x), torch.exp2(x))

    @staticmethod
    def forward(ctx, q, k, v):
        T, hs = q.shape[-2], q.shape[-1]
        scale = float(np.float32(1.0) / np.sqrt(np.float32(hs)))       # 1/sqrtf(hs), as the kernel
        scale_log2 = float(np.float32(scale) * np.float32(_TensorCoreAttention.LOG2E))  # in float, as the kernel
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = ((q @ k.transpose(-2, -1)) * scale_log2).masked_fill(future, float("-inf"))  # (B, NH, T, T), base 2
        row_max = torch.full(q.shape[:-1] + (1,), float("-inf"), dtype=q.dtype, device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros_like(q)
        for k0 in range(0, T, _TensorCoreAttention.TILE):
            tile = scores[..., k0:k0 + _TensorCoreAttention.TILE]                # (B, NH, T, <=64)
            new_max = torch.maximum(row_max, tile.amax(dim=-1, keepdim=True))   # finite: key 0 is never masked
            correction = _TensorCoreAttention.exp2(row_max - new_max)           # 0 on the first tile
            p = round_bf16(_TensorCoreAttention.exp2(tile - new_max))           # P in bf16; 0 where masked
            row_sum = row_sum * correction + p.sum(dim=-1, keepdim=True)
            acc = acc * correction + p @ v[..., k0:k0 + _TensorCoreAttention.TILE, :]
            row_max = new_max
        y = acc * (1.0 / row_sum)
        lse = (row_max + torch.log2(row_sum)) * _TensorCoreAttention.LN2       # (B, NH, T, 1), natural log
        ctx.save_for_backward(q, k, v, round_bf16(y), lse)                      # y as stored: D is taken from it
        ctx.scale, ctx.scale_log2 = scale, scale_log2
        return y

    @staticmethod
    def backward(ctx, dy):  # dy: the stored (bf16) gradient of y
        q, k, v, y_stored, lse = ctx.saved_tensors
        T = q.shape[-2]
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = ((q @ k.transpose(-2, -1)) * ctx.scale_log2).masked_fill(future, float("-inf"))
        p = _TensorCoreAttention.exp2(scores - lse * _TensorCoreAttention.LOG2E)  # (B, NH, T, T), 0 where masked
        dp = dy @ v.transpose(-2, -1)
        d = (dy * y_stored).sum(dim=-1, keepdim=True)            # D = rowsum(dy * y as stored)
        ds = round_bf16(p * (dp - d))                            # dS in bf16
        p = round_bf16(p)                                        # P in bf16
        dq = (ds @ k) * ctx.scale
        dk = (ds.transpose(-2, -1) @ q) * ctx.scale
        dv = p.transpose(-2, -1) @ dy
        return dq, dk, dv


class Attention(nn.Module):
    # dev/bench_gpu.py sets this to use PyTorch's own fused causal attention (torch >= 2.0);
    # the tests always use the explicit version below
    fused = False
    # dev/make_fixtures.py sets this for a case that emulates the engine's tensor-core attention
    # (bf16 only; see _TensorCoreAttention)
    tensor_core = False

    def __init__(self, cfg, qkv_norm=False):
        """qkv_norm: HybridNorm's QKV-Norm, a norm of its own (cfg.norm_type, over all C
        channels, before the heads are split and before RoPE) on each of q, k and v."""
        super().__init__()
        C = cfg.hidden_size
        self.NH = cfg.num_attention_heads
        self.hs = C // self.NH
        self.theta = cfg.rope_theta
        self.q_proj = Linear(C, C)
        self.k_proj = Linear(C, C)
        self.v_proj = Linear(C, C)
        self.o_proj = Linear(C, C)
        self.qkv_norm = qkv_norm
        if qkv_norm:
            self.q_norm = make_norm(cfg)
            self.k_norm = make_norm(cfg)
            self.v_norm = make_norm(cfg)

    def forward(self, x):  # x (B, T, C)
        B, T, C = x.shape
        NH, hs = self.NH, self.hs
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, C) each
        if self.qkv_norm:
            q, k, v = self.q_norm(q), self.k_norm(k), self.v_norm(v)
        q = q.view(B, T, NH, hs).transpose(1, 2)               # (B, NH, T, hs)
        k = k.view(B, T, NH, hs).transpose(1, 2)               # (B, NH, T, hs)
        v = v.view(B, T, NH, hs).transpose(1, 2)               # (B, NH, T, hs)
        cos, sin = rope_cos_sin(T, hs, self.theta)             # (T, hs), broadcast over B, NH
        cos, sin = cos.to(x.device, x.dtype), sin.to(x.device, x.dtype)  # no-op on the CPU in fp32
        q = store(q * cos + rotate_half(q) * sin)              # RoPE, stored
        k = store(k * cos + rotate_half(k) * sin)
        if Attention.fused:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, NH, T, hs)
        elif Attention.tensor_core and _precision != "fp32":
            y = _TensorCoreAttention.apply(q, k, v)                # (B, NH, T, hs)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)        # (B, NH, T, T)
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # t sees 0..t only
            att = att.masked_fill(future, float("-inf"))
            att = F.softmax(att, dim=-1)                           # fp32 (the model's dtype)
            y = att @ v                                            # (B, NH, T, hs)
        y = store(y)                                           # the attention output, stored
        y = y.transpose(1, 2).contiguous().view(B, T, C)       # heads side by side again
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, Fh = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(C, Fh)  # weight (F, C)
        self.up_proj = Linear(C, Fh)    # weight (F, C)
        self.down_proj = Linear(Fh, C)  # weight (C, F)

    def forward(self, x):  # x (B, T, C)
        return self.down_proj(store(F.silu(self.gate_proj(x)) * self.up_proj(x)))  # SwiGLU stored


def deepnorm_alpha(L):
    """DeepNorm's residual weight for a decoder-only model of L layers: a = (2L)^(1/4)."""
    return (2.0 * L) ** 0.25


def deepnorm_beta(L):
    """DeepNorm's init gain for v, o and the MLP projections: b = (8L)^(-1/4)."""
    return (8.0 * L) ** -0.25


def lns_scale(l):
    """LayerNorm Scaling's factor on each norm output of layer l (0-based): 1/sqrt(l + 1)."""
    return 1.0 / math.sqrt(l + 1)


class DecoderLayer(nn.Module):
    """One decoder layer; `kind` (one of NORM_KINDS) says where its norms sit and what they are
    called. N(...) is a norm of cfg.norm_type, l the layer index (0-based), L the layer count:

      pre:       h = x + Attn(N1(x))            y = h + MLP(N2(h))
                 N1 input_layernorm, N2 post_attention_layernorm
      post:      h = N1(x + Attn(x))            y = N2(h + MLP(h))
                 N1 post_attention_layernorm, N2 post_feedforward_layernorm
      peri:      h = x + N1o(Attn(N1(x)))       y = h + N2o(MLP(N2(h)))        (Sandwich / Peri-LN)
                 N1 input_layernorm, N1o post_attention_layernorm,
                 N2 pre_feedforward_layernorm, N2o post_feedforward_layernorm  (Gemma-2 names)
      deepnorm:  h = N1(a*x + Attn(x))          y = N2(a*h + MLP(h))           a = (2L)^(1/4)
                 names as post
      lns:       h = x + Attn(s*N1(x))          y = h + MLP(s*N2(h))           s = 1/sqrt(l+1)
                 names as pre  (LayerNorm Scaling)
      hybrid:    h = x + Attn_qkvnorm(x)        y = N2(h + MLP(h))             (HybridNorm)
                 Attn_qkvnorm: q, k and v each normalised (Nq, Nk, Nv over C channels) before
                 RoPE and the attention; no norm on the attention's input or after its add.
                 Nq/Nk/Nv self_attn.q_norm, k_norm, v_norm (OLMo-2's names), N2
                 post_feedforward_layernorm
      preqkv:    h = x + Attn_qkvnorm(N1(x))    y = h + MLP(N2(h))             (HybridNorm*'s first layer)
                 names as pre, and the QKV norms as hybrid's

    Norms are registered in the order N1, (N1o,) N2, (N2o,) after self_attn and mlp, so
    named_parameters() (and the order init draws in) is fixed per kind.

    Storage points (bf16 emulation, see "Precision"): every norm, Attn and MLP output is stored
    by its module; forward adds a store(...) on each residual sum (x + ..., a*x + ...) and on
    lns's s*N(...)."""

    def __init__(self, cfg, kind, layer_idx):
        super().__init__()
        if kind not in NORM_KINDS:
            raise ValueError(f"unknown norm kind {kind!r} ({', '.join(NORM_KINDS)})")
        self.kind = kind
        self.layer_idx = layer_idx
        self.post_ln = kind == "post"  # kept for callers that ask about Mix-LN's Post-LN layers
        # plain attributes, not parameters: make_fixtures.py sets them to 1 on a copy to check
        # that they change the numbers
        self.deepnorm_alpha = deepnorm_alpha(cfg.num_hidden_layers) if kind == "deepnorm" else 1.0
        self.lns_scale = lns_scale(layer_idx) if kind == "lns" else 1.0
        self.self_attn = Attention(cfg, qkv_norm=kind in ("hybrid", "preqkv"))
        self.mlp = MLP(cfg)
        if kind == "hybrid":
            self.post_feedforward_layernorm = make_norm(cfg)  # N2, after the MLP residual add
        elif kind in ("pre", "lns", "preqkv"):
            self.input_layernorm = make_norm(cfg)             # N1, before attention
            self.post_attention_layernorm = make_norm(cfg)    # N2, before the MLP
        elif kind in ("post", "deepnorm"):
            self.post_attention_layernorm = make_norm(cfg)    # N1, after the attention residual add
            self.post_feedforward_layernorm = make_norm(cfg)  # N2, after the MLP residual add
        else:  # peri
            self.input_layernorm = make_norm(cfg)             # N1, before attention
            self.post_attention_layernorm = make_norm(cfg)    # N1o, on the attention output
            self.pre_feedforward_layernorm = make_norm(cfg)   # N2, before the MLP
            self.post_feedforward_layernorm = make_norm(cfg)  # N2o, on the MLP output

    def forward(self, x):  # x (B, T, C) -> (B, T, C)
        kind = self.kind
        if kind in ("pre", "preqkv"):
            # h = x + Attn(N1(x));  y = h + MLP(N2(h))  (preqkv: Attn normalises q, k and v too)
            h = store(x + self.self_attn(self.input_layernorm(x)))
            return store(h + self.mlp(self.post_attention_layernorm(h)))
        if kind == "lns":
            # h = x + Attn(s*N1(x));  y = h + MLP(s*N2(h)),  s = 1/sqrt(l+1)
            s = self.lns_scale
            h = store(x + self.self_attn(store(s * self.input_layernorm(x))))
            return store(h + self.mlp(store(s * self.post_attention_layernorm(h))))
        if kind == "peri":
            # h = x + N1o(Attn(N1(x)));  y = h + N2o(MLP(N2(h)))
            h = store(x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x))))
            return store(h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))))
        if kind == "hybrid":
            # h = x + Attn_qkvnorm(x);  y = N2(h + MLP(h))
            h = store(x + self.self_attn(x))
            return self.post_feedforward_layernorm(store(h + self.mlp(h)))
        if kind == "post":
            # h = N1(x + Attn(x));  y = N2(h + MLP(h))
            h = self.post_attention_layernorm(store(x + self.self_attn(x)))
            return self.post_feedforward_layernorm(store(h + self.mlp(h)))
        # deepnorm: h = N1(a*x + Attn(x));  y = N2(a*h + MLP(h)),  a = (2L)^(1/4)
        a = self.deepnorm_alpha
        h = self.post_attention_layernorm(store(a * x + self.self_attn(x)))
        return self.post_feedforward_layernorm(store(a * h + self.mlp(h)))


class LlamaModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)  # (V, C)
        self.layers = nn.ModuleList(DecoderLayer(cfg, cfg.norm_layers[l], l)
                                    for l in range(cfg.num_hidden_layers))
        # The final norm is applied in every mode (never scaled), so a pure Post-LN model
        # normalises twice in a row at the end: that is what the paper's code does.
        self.norm = make_norm(cfg)

    def forward(self, inputs):  # inputs (B, T) int64 -> (B, T, C)
        x = self.embed_tokens(inputs)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class MixLNForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        cfg.check()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)  # (V, C), untied

    def forward(self, inputs, targets=None):
        """inputs (B, T) int64 -> logits (B, T, V) and, given targets (B, T), the mean token
        cross-entropy over the targets that are not IGNORED_TARGET (else None; computed in fp32
        from the logits as stored)."""
        T = inputs.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} > max_position_embeddings {self.config.max_position_embeddings}")
        logits = self.lm_head(self.model(inputs))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = _token_loss(logits, targets)
        return logits, loss


QKV_NORM_NAMES = ("q_norm", "k_norm", "v_norm")


def is_norm_weight(name):
    """A norm's weight (starts at 1): every layer norm's (the QKV norms too) and the
    final norm's."""
    parts = name.split(".")
    return name.endswith("layernorm.weight") or name == "model.norm.weight" or (
        parts[-1] == "weight" and parts[-2] in QKV_NORM_NAMES)


def is_norm_bias(name):
    """A norm's bias (starts at 0; LayerNorm only)."""
    parts = name.split(".")
    return name.endswith("layernorm.bias") or name == "model.norm.bias" or (
        parts[-1] == "bias" and parts[-2] in QKV_NORM_NAMES)


def is_norm_param(name):
    """Any parameter of a norm, weight or bias."""
    return is_norm_weight(name) or is_norm_bias(name)


def linear_init_std(cfg, name, shape, scaled_init=False):
    """The normal std a Linear weight `name` of `shape` (out, in) starts with:
      0.02 by default (and always for lm_head);
      deepnorm layers: DeepNet's xavier normal, gain * sqrt(2 / (fan_in + fan_out)), gain 1 for
        q_proj and k_proj, b = (8L)^(-1/4) for v_proj, o_proj, gate_proj, up_proj, down_proj;
      scaled_init: o_proj and down_proj of pre, lns, peri and preqkv layers 0.02 / sqrt(2L)."""
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return 0.02
    L = cfg.num_hidden_layers
    kind = cfg.norm_layers[int(parts[2])]
    proj = parts[-2]  # e.g. "q_proj" in model.layers.3.self_attn.q_proj.weight
    if kind == "deepnorm":
        fan_out, fan_in = shape
        gain = 1.0 if proj in ("q_proj", "k_proj") else deepnorm_beta(L)
        return gain * math.sqrt(2.0 / (fan_in + fan_out))
    if scaled_init and kind in ("pre", "lns", "peri", "preqkv") and proj in ("o_proj", "down_proj"):
        return 0.02 / math.sqrt(2.0 * L)
    return 0.02


def init_weights(model, seed, embed_std=0.02, scaled_init=False):
    """Linear weights normal(0, linear_init_std(...)) (0.02 unless a deepnorm layer or
    scaled_init says otherwise), embedding normal(0, embed_std), norm weights 1, norm biases 0.
    Parameters are drawn in named_parameters() order (module registration order, which is fixed)
    from one generator. Returns the generator so a caller can keep drawing from the same stream."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_norm_weight(name):
                p.fill_(1.0)
            elif is_norm_bias(name):
                p.zero_()
            elif name == "model.embed_tokens.weight":
                p.normal_(0.0, embed_std, generator=gen)
            else:
                p.normal_(0.0, linear_init_std(cfg, name, p.shape, scaled_init), generator=gen)
    return gen


def save_checkpoint(model, dir):
    """Write dir/config.json and dir/model.safetensors (fp32, Hugging Face names)."""
    os.makedirs(dir, exist_ok=True)
    config_save(model.config, os.path.join(dir, "config.json"))
    tensors = {name: p.detach().float() for name, p in model.state_dict().items()}
    safetensors_save(os.path.join(dir, "model.safetensors"), tensors, {"format": "pt"})


def load_checkpoint(dir):
    """Read dir/config.json + dir/model.safetensors -> model (fp32). Every tensor must be present
    with the right shape, and no unexpected tensor may be there (e.g. a norm name of another
    placement, or a LayerNorm bias, would mean the checkpoint and config.json disagree)."""
    cfg = config_load(os.path.join(dir, "config.json"))
    model = MixLNForCausalLM(cfg)
    path = os.path.join(dir, "model.safetensors")
    tensors, _ = safetensors_load(path)
    want = model.state_dict()
    missing = [n for n in want if n not in tensors]
    unexpected = [n for n in tensors if n not in want]
    if missing or unexpected:
        raise ValueError(f"{path}: does not match config.json (norm_layers={','.join(cfg.norm_layers)}, "
                         f"norm_type={cfg.norm_type}); "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, p in want.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(f"{path}: {name} has shape {list(tensors[name].shape)}, expected {list(p.shape)}")
    model.load_state_dict({n: t.float() for n, t in tensors.items()})
    return model


# -----------------------------------------------------------------------------
# Data and training


# The target of a position that is neither trained on nor scored (the engine's IGNORED_TARGET):
# padding, and a row's last position, when the data holds one document per row (pad_id below).
IGNORED_TARGET = -1


def num_batches(n, B, T, pad_id=None):
    """Whole batches in a shard of n tokens: in a stream each needs B*T inputs + 1 token for the
    last target; with one document per row (pad_id), B rows of T tokens."""
    return n // (B * T) if pad_id is not None else (n - 1) // (B * T)


def batch(tokens, k, B, T, pad_id=None):
    """Batch k of a shard -> inputs (B, T), targets (B, T), int64. In a stream, targets are the
    inputs shifted by one. With pad_id, the shard is one document per row of T tokens (padded with
    pad_id): batch k is rows k*B .. k*B+B-1, each row's targets its own tokens shifted by one,
    IGNORED_TARGET after its last position and wherever the token is padding."""
    if pad_id is not None:
        buf = np.asarray(tokens[k * B * T: (k + 1) * B * T]).astype(np.int64)
        if buf.size != B * T:
            raise ValueError(f"batch {k} needs {B * T} tokens, shard has only {buf.size} left")
        rows = torch.from_numpy(buf).view(B, T)
        targets = torch.full((B, T), IGNORED_TARGET, dtype=torch.int64)
        targets[:, :-1] = rows[:, 1:]
        targets[targets == pad_id] = IGNORED_TARGET
        return rows, targets
    buf = np.asarray(tokens[k * B * T: k * B * T + B * T + 1]).astype(np.int64)
    if buf.size != B * T + 1:
        raise ValueError(f"batch {k} needs {B * T + 1} tokens, shard has only {buf.size} left")
    buf = torch.from_numpy(buf)
    return buf[:-1].view(B, T), buf[1:].view(B, T)


MASK64 = (1 << 64) - 1
SPLITMIX64_STEP = 0x9E3779B97F4A7C15


def splitmix64_mix(z):
    """splitmix64's output function on a 64-bit integer."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def shuffled_order(n, seed, epoch):
    """The batch order of one epoch under train's --data-order shuffled: a Fisher-Yates shuffle of
    0..n-1 (position i-1, from the end, swaps with r mod i), r the successive splitmix64 draws from
    the state mix(mix(seed ^ 0xDA7A0DE5EED5) + epoch * STEP)."""
    order = list(range(n))
    state = splitmix64_mix((splitmix64_mix(seed ^ 0xDA7A0DE5EED5) + epoch * SPLITMIX64_STEP) & MASK64)
    for i in range(n, 1, -1):
        state = (state + SPLITMIX64_STEP) & MASK64
        j = splitmix64_mix(state) % i
        order[i - 1], order[j] = order[j], order[i - 1]
    return order


def lr_lambda(step, warmup, total, min_lr_ratio, schedule="cosine", decay_steps=0):
    """The learning rate at `step` as a factor of lr_max: linear warmup from 0 over `warmup` steps,
    then by `schedule`:
      cosine    GaLore's (the paper's): cosine from 1 to min_lr_ratio at step `total`
      linear    a straight line from 1 to min_lr_ratio at step `total`
      constant  1
      wsd       1, then over the last `decay_steps` steps a straight line to min_lr_ratio at `total`
      wsd-sqrt  as wsd, the decay 1 - sqrt(p) of the way from 1 to min_lr_ratio (p from 0 to 1)
    Step 0 with warmup > 0 gives 0 (lr 0 on the first step): intended, it is what GaLore does."""
    s = step
    if s < warmup:
        return s / max(1, warmup)
    if schedule == "constant":
        return 1.0
    if schedule in ("wsd", "wsd-sqrt"):
        start = max(warmup, total - decay_steps)
        if s < start:
            return 1.0
        p = (s - start) / max(1, total - start)
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - (math.sqrt(p) if schedule == "wsd-sqrt" else p))
    p = (s - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - p)
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    raise ValueError(f"unknown schedule {schedule!r}")


def wsd_decay_steps(decay_frac, steps):
    """wsd's decay length as train computes it: the fraction parsed as a float32, times the steps,
    rounded half away from zero."""
    return math.floor(float(np.float32(decay_frac)) * steps + 0.5)


def grad_norm_of(params):
    """Total L2 norm of all gradients, accumulated in float64 (the accurate side), as a float."""
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float(p.grad.detach().double().pow(2).sum())
    return math.sqrt(total)


def adamw_math(p, m, v, g, lr, beta1, beta2, eps, weight_decay, t):
    """One AdamW step in fp32, in the arithmetic (and order) of torch 1.13's torch.optim.AdamW
    (make_optimizer) -> new tensors p'', m', v'; the inputs are not changed:
        p' = p * (1 - lr*wd);  m' = b1*m + (1-b1)*g;  v' = b2*v + (1-b2)*g^2
        p'' = p' - lr/(1-b1^t) * m' / (sqrt(v')/sqrt(1-b2^t) + eps)"""
    p = p.mul(1 - lr * weight_decay)
    m = m.mul(beta1).add(g, alpha=1 - beta1)
    v = v.mul(beta2).addcmul(g, g, value=1 - beta2)
    step_size = lr / (1 - beta1 ** t)
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** t)
    denom = (v.sqrt() / bias_correction2_sqrt).add(eps)
    return p.addcdiv(m, denom, value=-step_size), m, v


class BF16PureAdamW:
    """The engine's AdamW in bf16-pure: parameters, gradients and both moments hold bf16 values.
    Each step reads p, m, v, g (g: the bf16 gradient, times the clipping factor when clipping
    scaled it), computes adamw_math in fp32, and stores round(m'), round(v'), round(p'') (p''
    computed from the unrounded m', v'). Just enough of torch.optim's interface for train_step:
    params as a list of tensors or of groups ({"params": [...]}, optionally "weight_decay"), as
    torch.optim takes them; param_groups with "lr" and "weight_decay", zero_grad, step."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = [{"params": list(g["params"]), "lr": lr, "weight_decay": g.get("weight_decay", weight_decay)}
                             for g in groups]
        self.params = [p for g in self.param_groups for p in g["params"]]
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]  # bf16 values (0 is one)
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self):
        self.t += 1  # counts every step, as torch's AdamW and the engine do
        group_of = [g for g in self.param_groups for _ in g["params"]]
        for p, m, v, g in zip(self.params, self.m, self.v, group_of):
            if p.grad is None:
                continue
            p2, m2, v2 = adamw_math(p, m, v, p.grad, g["lr"], self.beta1, self.beta2, self.eps, g["weight_decay"], self.t)
            m.copy_(round_bf16(m2))
            v.copy_(round_bf16(v2))
            p.copy_(round_bf16(p2))


def make_optimizer(params, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8, weight_decay_on="matrices"):
    # AdamW as torch 1.13 implements it:
    #   p *= 1 - lr*wd;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
    #   p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)      with t = 1, 2, ...
    # (t counts every step, including step 0 with lr 0.) The weight decay applies to every
    # parameter with weight_decay_on="all" (torch.optim.AdamW over model.parameters(), as the
    # Mix-LN code builds it), or with "matrices" (./train's default) to the parameters of two
    # dimensions only, the embedding, the linear layers and the head: the norms' weights and
    # biases, one dimension each, get weight decay 0 (p *= 1 exactly).
    # fp32 and bf16 (fp32 master weights and moments): torch's own AdamW. bf16-pure: the same
    # arithmetic with everything rounded to bf16 as stored (BF16PureAdamW).
    if weight_decay_on not in ("matrices", "all"):
        raise ValueError(f"weight_decay_on must be matrices or all, got {weight_decay_on!r}")
    params = list(params)
    if weight_decay_on == "matrices":
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        params = [g for g in groups if g["params"]]
    if _precision == "bf16-pure":
        return BF16PureAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def train_step(model, opt, params, x, y, lr, grad_clip):
    """One step: forward, backward, norm, clip, AdamW update with learning rate lr.
    -> (loss before the update, grad norm before clipping). The gradients are as stored in the
    current precision (bf16-pure: bf16 values), the norm over them in float64."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    gnorm = grad_norm_of(params)
    if grad_clip > 0:
        # torch scales every grad by grad_clip / (norm + 1e-6) when that is < 1
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return float(loss), gnorm


def round_parameters_(model):
    """Round every parameter to bf16 in place (what loading a checkpoint into bf16 parameters does)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(round_bf16(p))


def train(model, tokens, B, T, steps, lr, warmup, min_lr_ratio, weight_decay, grad_clip,
          betas=(0.9, 0.999), eps=1e-8, schedule="cosine", decay_steps=0, shuffle_seed=None,
          weight_decay_on="matrices", pad_id=None):
    """Train in place for `steps` steps walking batches 0, 1, ... of `tokens` (wrapping to 0), or
    with shuffle_seed each pass in its shuffled_order, in the current precision (using_precision);
    pad_id: one document per row (batch). -> list of (train_loss, lr, grad_norm) per step.
    bf16-pure first rounds the parameters to bf16, as the engine's load does."""
    model.train()
    if _precision == "bf16-pure":
        round_parameters_(model)
    params = [p for _, p in model.named_parameters()]
    opt = make_optimizer(params, lr, weight_decay, betas, eps, weight_decay_on)
    nb = num_batches(len(tokens), B, T, pad_id)
    if nb < 1:
        raise ValueError(f"shard of {len(tokens)} tokens holds no whole batch of {B}x{T}")
    log = []
    for s in range(steps):
        lr_s = lr * lr_lambda(s, warmup, steps, min_lr_ratio, schedule, decay_steps)
        k = s % nb if shuffle_seed is None else shuffled_order(nb, shuffle_seed, s // nb)[s % nb]
        x, y = batch(tokens, k, B, T, pad_id)
        loss, gnorm = train_step(model, opt, params, x, y, lr_s, grad_clip)
        log.append((loss, lr_s, gnorm))
    return log


VAL_MEANS = ("tokens", "batches")


def _batch_weight(n_targets, val_mean):
    """A validation batch's weight in the mean loss: its targets ("tokens": each target counts
    alike), or 1 ("batches": the mean of the batches' means, as the paper's code reports it; a
    batch without targets counts for nothing)."""
    if val_mean not in VAL_MEANS:
        raise ValueError(f"val_mean must be one of {VAL_MEANS}, got {val_mean!r}")
    return n_targets if val_mean == "tokens" else (1 if n_targets > 0 else 0)


@torch.no_grad()
def evaluate(model, tokens, B, T, batches=None, pad_id=None, val_mean="tokens"):
    """Mean loss over whole batches 0..nb-1 (or the first `batches`) -> (loss, target tokens);
    pad_id: one document per row (batch), whose ignored targets count for nothing; val_mean: the
    mean over the targets, or of the batches' means (_batch_weight)."""
    model.eval()
    nb = num_batches(len(tokens), B, T, pad_id)
    if batches is not None:
        nb = min(nb, batches)
    if nb < 1:
        raise ValueError(f"shard of {len(tokens)} tokens holds no whole batch of {B}x{T}")
    total, weights, count = 0.0, 0, 0
    for k in range(nb):
        x, y = batch(tokens, k, B, T, pad_id)
        _, loss = model(x, y)
        n = int((y != IGNORED_TARGET).sum())
        w = _batch_weight(n, val_mean)
        total += float(loss) * w  # each batch's mean weighted by its targets, or by 1
        weights += w
        count += n
    return (total / weights if weights else 0.0), count


# -----------------------------------------------------------------------------
# Layer analysis: how much each layer does (MIXLN.md, "How the paper shows layer effectiveness").
# h_l is the input of decoder layer l: h_0 the token embeddings, h_L the last layer's output
# (the input of the final norm). Both measures reuse the model's own modules, called in the same
# order as LlamaModel.forward, so the full-model loss here is the loss evaluate() gives.


def layer_states(model, inputs):
    """inputs (B, T) int64 -> [h_0, ..., h_L], each (B, T, C)."""
    T = inputs.shape[1]
    if T > model.config.max_position_embeddings:
        raise ValueError(f"sequence length {T} > max_position_embeddings {model.config.max_position_embeddings}")
    hs = [model.model.embed_tokens(inputs)]
    for layer in model.model.layers:
        hs.append(layer(hs[-1]))
    return hs


def logits_from(model, h, first):
    """Run decoder layers first..L-1 on h (B, T, C), then the final norm and the LM head -> logits
    (B, T, V). logits_from(model, h_L, L) is the full model; logits_from(model, h_l, l + 1) is the
    model with layer l skipped (its input passed on unchanged as its output)."""
    for layer in model.model.layers[first:]:
        h = layer(h)
    return model.lm_head(model.model.norm(h))


def angular_distance(a, b):
    """a, b (N, C) -> (N,) float64: arccos(cos_sim(a_i, b_i)) / pi, in [0, 1].
    The cosine is taken in float64 and clamped to [-1, 1], since rounding can put it just outside.
    sqrt(|a|^2 |b|^2) rather than |a| |b|: for a == b it is exactly |a|^2, so the distance is
    exactly 0."""
    a, b = a.double(), b.double()
    cos = (a * b).sum(-1) / torch.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def _token_loss(logits, targets):
    """The mean token cross-entropy over the targets that are not IGNORED_TARGET (0, with no
    gradient, where every one is: nothing to learn from), as MixLNForCausalLM.forward computes it."""
    flat = targets.reshape(-1)
    if not bool((flat != IGNORED_TARGET).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), flat, ignore_index=IGNORED_TARGET)


@torch.no_grad()
def analyze(model, tokens, B, T, max_batches=0, pad_id=None, val_mean="tokens"):
    """Angular distances between layer inputs and the loss with each layer dropped, over whole
    windows 0..nb-1 of `tokens` (or the first max_batches; 0 means all) ->
      {"val_loss": full-model mean token loss, "tokens": target tokens,
       "angular_distance": rows l = 0..L-1, row l holding n = 1..L-l (a ragged triangle):
           mean over every sequence of arccos(cos_sim(h_l, h_{l+n})) / pi at its last token,
       "layer_drop": [{"layer": l, "val_loss": mean token loss with layer l skipped}, ...],
       "hidden_rms": l = 0..L: sqrt(mean of h_l^2 over every token and channel)}
    pad_id: one document per row (batch): a sequence's last token is its last that is not
    padding, the RMS is over the tokens that are not padding, and the losses over the targets.
    val_mean "batches": the losses are the means of the batches' means (_batch_weight)."""
    if max_batches < 0:
        raise ValueError(f"max_batches must be >= 0 (0 means all), got {max_batches}")
    model.eval()
    L = model.config.num_hidden_layers
    nb = num_batches(len(tokens), B, T, pad_id)
    if max_batches:
        nb = min(nb, max_batches)
    if nb < 1:
        raise ValueError(f"shard of {len(tokens)} tokens holds no whole batch of {B}x{T}")
    # sums over windows in float64: the losses weighted by each window's targets (the token mean),
    # or by 1 (the mean of the batch means)
    full, weights, count, positions = 0.0, 0, 0, 0
    dropped = [0.0] * L
    dist = [np.zeros(L - l) for l in range(L)]  # dist[l][n-1]: sum over sequences
    squares = [0.0] * (L + 1)                    # squares[l]: sum of h_l^2 over every element not padding
    for k in range(nb):
        x, y = batch(tokens, k, B, T, pad_id)
        real = torch.ones_like(x, dtype=torch.bool) if pad_id is None else x != pad_id   # (B, T)
        # each sequence's last token that is not padding: T-1 in a stream
        last_at = (T - 1 - real.flip(1).long().argmax(dim=1))
        hs = layer_states(model, x)              # L+1 tensors (B, T, C)
        last = [h[torch.arange(B), last_at, :] for h in hs]   # (B, C)
        for l in range(L):
            for n in range(1, L - l + 1):
                dist[l][n - 1] += float(angular_distance(last[l], last[l + n]).sum())
        for l in range(L + 1):
            squares[l] += float(hs[l].double()[real].square().sum())
        positions += int(real.sum())
        n_targets = int((y != IGNORED_TARGET).sum())
        w = _batch_weight(n_targets, val_mean)
        count += n_targets
        weights += w
        full += float(_token_loss(logits_from(model, hs[L], L), y)) * w
        for l in range(L):
            dropped[l] += float(_token_loss(logits_from(model, hs[l], l + 1), y)) * w
    count_or_1 = max(weights, 1)
    return {"val_loss": full / count_or_1, "tokens": count,
            "angular_distance": [[float(s) / (nb * B) for s in row] for row in dist],
            "layer_drop": [{"layer": l, "val_loss": dropped[l] / count_or_1} for l in range(L)],
            "hidden_rms": [math.sqrt(s / (max(positions, 1) * model.config.hidden_size)) for s in squares]}


# -----------------------------------------------------------------------------
# CLI


def config_from_args(a):
    """The Config of a subcommand that builds a model from sizes (model_args in main): the norm
    placement from --norm-layers if given, else from --alpha. Bad input ends with a message."""
    try:
        if a.norm_layers is None and a.alpha is None:
            raise ValueError("give --alpha or --norm-layers")
        norm_layers = None if a.norm_layers is None else parse_norm_layers(a.norm_layers, a.layers)
        return Config.make(a.vocab, a.dim, a.layers, a.heads, a.ffn, a.seq_len, a.alpha,
                           norm_layers=norm_layers, norm_type=a.norm_type)
    except ValueError as e:
        raise SystemExit(f"{a.cmd}: {e}")


def cmd_init(a):
    cfg = config_from_args(a)
    model = MixLNForCausalLM(cfg)
    init_weights(model, a.seed, a.embed_std, scaled_init=a.scaled_init)
    save_checkpoint(model, a.out)
    nparams = sum(p.numel() for p in model.parameters())
    print(json.dumps({"out": a.out, "params": nparams, "post_ln_layers": cfg.post_ln_layers,
                      "norm_layers": cfg.norm_layers, "norm_type": cfg.norm_type}))


def cmd_eval(a):
    model = load_checkpoint(a.ckpt)
    with using_precision(a.precision):
        loss, n = evaluate(model, shard_load(a.data), a.batch, a.seq_len, a.batches, a.pad_id, a.val_mean)
    print(json.dumps({"val_loss": loss, "tokens": n}))


def cmd_analyze(a):
    model = load_checkpoint(a.ckpt)
    result = analyze(model, shard_load(a.data), a.batch, a.seq_len, a.batches, a.pad_id, a.val_mean)
    line = json.dumps(result)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(line + "\n")
        os.replace(tmp, a.out)
    print(line)


def cmd_train(a):
    model = load_checkpoint(a.ckpt)
    with using_precision(a.precision):
        log = train(model, shard_load(a.data), a.batch, a.seq_len, a.steps, a.lr, a.warmup,
                    a.min_lr_ratio, a.weight_decay, a.grad_clip, (a.beta1, a.beta2), a.adam_eps,
                    a.lr_schedule, wsd_decay_steps(a.decay_frac, a.steps),
                    a.data_seed if a.data_order == "shuffled" else None, a.weight_decay_on, a.pad_id)
    save_checkpoint(model, a.out)
    lines = [json.dumps({"step": s, "train_loss": l, "lr": lr, "grad_norm": g}) for s, (l, lr, g) in enumerate(log)]
    with open(os.path.join(a.out, "log.jsonl"), "w") as f:
        f.write("".join(line + "\n" for line in lines))
    for line in lines:
        print(line)


def cmd_bench(a):
    if a.steps < 1:
        raise SystemExit("bench: --steps must be at least 1")
    torch.set_num_threads(a.threads)
    cfg = config_from_args(a)
    model = MixLNForCausalLM(cfg)
    init_weights(model, 0, scaled_init=a.scaled_init)
    model.train()
    params = [p for _, p in model.named_parameters()]
    opt = make_optimizer(params, 1e-4, 0.0)
    tokens = torch.randint(0, a.vocab, (a.batch * a.seq_len + 1,), generator=torch.Generator().manual_seed(0)).numpy()
    x, y = batch(tokens, 0, a.batch, a.seq_len)
    for _ in range(2):  # warm-up: allocator, first-touch of Adam state
        train_step(model, opt, params, x, y, 1e-4, 0.0)
    ms_steps = []  # each timed step on its own, so a caller can take the median (robust to noisy machines)
    for _ in range(a.steps):
        t0 = time.perf_counter()
        train_step(model, opt, params, x, y, 1e-4, 0.0)
        ms_steps.append((time.perf_counter() - t0) * 1e3)
    ms_mean = sum(ms_steps) / max(1, len(ms_steps))
    ms_median = float(np.median(ms_steps)) if ms_steps else 0.0
    # ms_per_step / tokens_per_second: the mean over the timed steps (as before); *_median: the median
    print(json.dumps({"ms_per_step": ms_mean, "tokens_per_second": a.batch * a.seq_len / (ms_mean / 1e3),
                      "ms_per_step_median": ms_median,
                      "tokens_per_second_median": a.batch * a.seq_len / (ms_median / 1e3),
                      "ms_steps": [round(m, 3) for m in ms_steps]}))


def checkpoint_data_args(q):
    """The arguments every subcommand that runs a checkpoint on a shard takes."""
    q.add_argument("--ckpt", required=True)
    q.add_argument("--data", required=True)
    q.add_argument("--batch", type=int, required=True)
    q.add_argument("--seq-len", type=int, required=True)


def pad_id_arg(q):
    q.add_argument("--pad-id", type=int, default=None,
                   help="the shard holds one document per row of --seq-len tokens, padded with this token "
                        "(train's --pad-id): no target after a row's end (default: a stream)")


def val_mean_arg(q):
    q.add_argument("--val-mean", choices=VAL_MEANS, default="tokens",
                   help="the loss: the mean over every target (default), or of the batches' means (train's "
                        "--val-mean)")


def precision_arg(q):
    q.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default), or emulate the engine's bf16 storage: bf16 (bf16 copies of the "
                        "weights, bf16 activations and activation gradients; fp32 master weights, weight "
                        "gradients and AdamW moments) or bf16-pure (those in bf16 too). The checkpoint "
                        "written stays fp32 (bf16-pure: holding bf16 values)")


def main(argv=None):
    p = argparse.ArgumentParser(description="mixln PyTorch reference")
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(q):
        q.add_argument("--vocab", type=int, required=True)
        q.add_argument("--dim", type=int, required=True)
        q.add_argument("--layers", type=int, required=True)
        q.add_argument("--heads", type=int, required=True)
        q.add_argument("--ffn", type=int, required=True)
        q.add_argument("--seq-len", type=int, required=True)
        q.add_argument("--alpha", type=float, default=None,
                       help="Mix-LN: floor(alpha*L) Post-LN layers, the rest Pre-LN (this or --norm-layers)")
        q.add_argument("--norm-layers", default=None, metavar="LIST",
                       help="norm placement per layer, comma-separated, one of " + ",".join(NORM_KINDS) +
                            " each (e.g. post,pre,pre,pre); overrides --alpha")
        q.add_argument("--norm-type", choices=NORM_TYPES, default="rmsnorm",
                       help="every norm, the final one included (default rmsnorm)")
        q.add_argument("--scaled-init", action="store_true",
                       help="o_proj and down_proj of pre, lns and peri layers start with std 0.02/sqrt(2L)")

    q = sub.add_parser("init", help="write a freshly initialised checkpoint")
    q.add_argument("--out", required=True)
    model_args(q)
    q.add_argument("--seed", type=int, required=True)
    q.add_argument("--embed-std", type=float, default=0.02)
    q.set_defaults(fn=cmd_init)

    q = sub.add_parser("eval", help="mean loss over whole batches of a shard")
    checkpoint_data_args(q)
    q.add_argument("--batches", type=int, default=None)
    pad_id_arg(q)
    val_mean_arg(q)
    precision_arg(q)
    q.set_defaults(fn=cmd_eval)

    q = sub.add_parser("analyze", help="angular distances between layer inputs and the loss with each layer "
                                       "dropped, as JSON (the last stdout line, and --out FILE if given)")
    checkpoint_data_args(q)
    q.add_argument("--batches", type=int, default=0, help="only the first K windows (default 0: all)")
    q.add_argument("--out", default=None, help="also write the JSON to this file")
    pad_id_arg(q)
    val_mean_arg(q)
    q.set_defaults(fn=cmd_analyze)

    q = sub.add_parser("train", help="train from a checkpoint, write the result and log.jsonl to --out")
    checkpoint_data_args(q)
    q.add_argument("--steps", type=int, required=True)
    q.add_argument("--lr", type=float, required=True)
    q.add_argument("--warmup", type=int, default=0)
    q.add_argument("--min-lr-ratio", type=float, default=0.1)
    q.add_argument("--lr-schedule", choices=["cosine", "linear", "constant", "wsd", "wsd-sqrt"], default="cosine")
    q.add_argument("--data-order", choices=["sequential", "shuffled"], default="sequential")
    q.add_argument("--data-seed", type=int, default=1, help="shuffled: the order's seed")
    q.add_argument("--decay-frac", type=float, default=0.2, help="wsd: the share of the steps spent decaying")
    q.add_argument("--weight-decay", type=float, default=0.0)
    q.add_argument("--weight-decay-on", choices=["matrices", "all"], default="matrices",
                   help="matrices: the 2-D parameters only, not the norms' weights and biases; all: every one")
    q.add_argument("--grad-clip", type=float, default=0.0)
    q.add_argument("--beta1", type=float, default=0.9, help="AdamW's first-moment decay (default 0.9)")
    q.add_argument("--beta2", type=float, default=0.999, help="AdamW's second-moment decay (default 0.999)")
    q.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW's epsilon (default 1e-8)")
    q.add_argument("--out", required=True)
    pad_id_arg(q)
    precision_arg(q)
    q.set_defaults(fn=cmd_train)

    q = sub.add_parser("bench", help="time full training steps on random tokens")
    model_args(q)
    q.add_argument("--batch", type=int, required=True)
    q.add_argument("--steps", type=int, default=10, help="timed steps, after 2 untimed warm-up steps")
    q.add_argument("--threads", type=int, default=1)
    q.set_defaults(fn=cmd_bench)

    a = p.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
