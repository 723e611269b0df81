"""
mixln PyTorch reference: the independent implementation the C++ engine is tested against.

It is written from the model facts in MIXLN.md, not from the C++ code, so that a
misunderstanding on one side shows up as a test failure instead of being copied.
Everything is plain fp32 PyTorch, readable top to bottom:

  file formats   safetensors (tiny reader/writer), llm.c token shards, config.json
  model          LLaMA with Mix-LN: the first `post_ln_layers` layers are Post-LN, the rest Pre-LN
  training       AdamW + GaLore's warmup/cosine schedule + optional gradient clipping
  analysis       angular distance between layer inputs, loss with one layer dropped
  CLI            init / eval / analyze / train / bench  (run with --help)

Parameter names are exactly the Hugging Face LLaMA names, with Linear weights stored
(out_features, in_features), so a checkpoint written here is read by the C++ engine and back.

Runs on the Debian Python (torch 1.13): no torch 2.x APIs.
"""

import argparse
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


def post_ln_layers_for(alpha, L):
    # floor(alpha * L), with 1e-6 added because alpha * L in floating point can land just
    # below an integer: 0.29 * 100 = 28.999999999999996 must still give 29 Post-LN layers.
    return int(math.floor(alpha * L + 1e-6))


@dataclass
class Config:
    vocab_size: int               # V
    hidden_size: int              # C
    num_hidden_layers: int        # L
    num_attention_heads: int      # NH
    intermediate_size: int        # F
    max_position_embeddings: int  # T (longest sequence the model is used with)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    post_ln_layers: int = 0       # layers 0..post_ln_layers-1 are Post-LN, the rest Pre-LN
    mixln_alpha: float = 0.0      # the alpha post_ln_layers came from (kept for the record)

    @staticmethod
    def make(V, C, L, NH, F, T, alpha):
        return Config(vocab_size=V, hidden_size=C, num_hidden_layers=L, num_attention_heads=NH,
                      intermediate_size=F, max_position_embeddings=T,
                      post_ln_layers=post_ln_layers_for(alpha, L), mixln_alpha=float(alpha))

    def check(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by heads {self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("head_dim must be even for RoPE")
        if not 0 <= self.post_ln_layers <= self.num_hidden_layers:
            raise ValueError(f"post_ln_layers {self.post_ln_layers} not in 0..{self.num_hidden_layers}")


def config_to_json(cfg):
    return {
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
        "post_ln_layers": cfg.post_ln_layers,
        "mixln_alpha": cfg.mixln_alpha,
    }


def config_from_json(d):
    """Build a Config from a config.json dict; extra keys are ignored, unsupported values rejected."""
    for key, want in (("hidden_act", "silu"), ("tie_word_embeddings", False),
                      ("attention_bias", False), ("mlp_bias", False)):
        if key in d and d[key] != want:
            raise ValueError(f"config.json: {key}={d[key]!r} is not supported (need {want!r})")
    NH = int(d["num_attention_heads"])
    if int(d.get("num_key_value_heads", NH)) != NH:
        raise ValueError("config.json: num_key_value_heads != num_attention_heads (GQA not supported)")
    L = int(d["num_hidden_layers"])
    alpha = float(d.get("mixln_alpha", 0.0))
    cfg = Config(vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]), num_hidden_layers=L,
                 num_attention_heads=NH, intermediate_size=int(d["intermediate_size"]),
                 max_position_embeddings=int(d["max_position_embeddings"]),
                 rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(d.get("rope_theta", 10000.0)),
                 post_ln_layers=int(d["post_ln_layers"]) if "post_ln_layers" in d else post_ln_layers_for(alpha, L),
                 mixln_alpha=alpha)
    cfg.check()
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
# Model


class RMSNorm(nn.Module):
    def __init__(self, C, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))
        self.eps = eps

    def forward(self, x):  # x (..., C)
        # The model is fp32 throughout, so the mean of squares is fp32 here (float64 only when the
        # whole model is .double(), as in the gradcheck test).
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


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


class Attention(nn.Module):
    # dev/bench_gpu.py sets this to use PyTorch's own fused causal attention (torch >= 2.0);
    # the tests always use the explicit version below
    fused = False

    def __init__(self, cfg):
        super().__init__()
        C = cfg.hidden_size
        self.NH = cfg.num_attention_heads
        self.hs = C // self.NH
        self.theta = cfg.rope_theta
        self.q_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)

    def forward(self, x):  # x (B, T, C)
        B, T, C = x.shape
        NH, hs = self.NH, self.hs
        q = self.q_proj(x).view(B, T, NH, hs).transpose(1, 2)  # (B, NH, T, hs)
        k = self.k_proj(x).view(B, T, NH, hs).transpose(1, 2)  # (B, NH, T, hs)
        v = self.v_proj(x).view(B, T, NH, hs).transpose(1, 2)  # (B, NH, T, hs)
        cos, sin = rope_cos_sin(T, hs, self.theta)             # (T, hs), broadcast over B, NH
        cos, sin = cos.to(x.device, x.dtype), sin.to(x.device, x.dtype)  # no-op on the CPU in fp32
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if Attention.fused:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, NH, T, hs)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)        # (B, NH, T, T)
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # t sees 0..t only
            att = att.masked_fill(future, float("-inf"))
            att = F.softmax(att, dim=-1)                           # fp32 (the model's dtype)
            y = att @ v                                            # (B, NH, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)       # heads side by side again
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, Fh = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(C, Fh, bias=False)  # weight (F, C)
        self.up_proj = nn.Linear(C, Fh, bias=False)    # weight (F, C)
        self.down_proj = nn.Linear(Fh, C, bias=False)  # weight (C, F)

    def forward(self, x):  # x (B, T, C)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One layer with two RMSNorms; where they sit (and what they are called) depends on post_ln.
    Post-LN:  h = N1(x + Attn(x));   y = N2(h + MLP(h))
    Pre-LN:   h = x + Attn(N1(x));   y = h + MLP(N2(h))"""

    def __init__(self, cfg, post_ln):
        super().__init__()
        self.post_ln = post_ln
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        C, eps = cfg.hidden_size, cfg.rms_norm_eps
        if post_ln:
            self.post_attention_layernorm = RMSNorm(C, eps)    # N1, after the attention residual add
            self.post_feedforward_layernorm = RMSNorm(C, eps)  # N2, after the MLP residual add
        else:
            self.input_layernorm = RMSNorm(C, eps)             # N1, before attention
            self.post_attention_layernorm = RMSNorm(C, eps)    # N2, before the MLP

    def forward(self, x):  # x (B, T, C) -> (B, T, C)
        if self.post_ln:
            h = self.post_attention_layernorm(x + self.self_attn(x))
            return self.post_feedforward_layernorm(h + self.mlp(h))
        h = x + self.self_attn(self.input_layernorm(x))
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # (V, C)
        self.layers = nn.ModuleList(DecoderLayer(cfg, post_ln=l < cfg.post_ln_layers)
                                    for l in range(cfg.num_hidden_layers))
        # The final norm is applied in every mode, so a pure Post-LN model normalises twice in a
        # row at the end: that is what the paper's code does.
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

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
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # (V, C), untied

    def forward(self, inputs, targets=None):
        """inputs (B, T) int64 -> logits (B, T, V) and, given targets (B, T), the mean token
        cross-entropy (else None)."""
        T = inputs.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} > max_position_embeddings {self.config.max_position_embeddings}")
        logits = self.lm_head(self.model(inputs))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss


def is_norm_weight(name):
    return name.endswith("layernorm.weight") or name == "model.norm.weight"


def init_weights(model, seed, embed_std=0.02):
    """Linear weights normal(0, 0.02), embedding normal(0, embed_std), norm weights 1.
    Parameters are drawn in named_parameters() order (module registration order, which is fixed).
    Returns the generator so a caller can keep drawing from the same stream."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_norm_weight(name):
                p.fill_(1.0)
            elif name == "model.embed_tokens.weight":
                p.normal_(0.0, embed_std, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return gen


def save_checkpoint(model, dir):
    """Write dir/config.json and dir/model.safetensors (fp32, Hugging Face names)."""
    os.makedirs(dir, exist_ok=True)
    config_save(model.config, os.path.join(dir, "config.json"))
    tensors = {name: p.detach().float() for name, p in model.state_dict().items()}
    safetensors_save(os.path.join(dir, "model.safetensors"), tensors, {"format": "pt"})


def load_checkpoint(dir):
    """Read dir/config.json + dir/model.safetensors -> model (fp32). Every tensor must be present
    with the right shape, and no unexpected tensor may be there (e.g. a norm name of the other
    placement would mean the checkpoint and post_ln_layers disagree)."""
    cfg = config_load(os.path.join(dir, "config.json"))
    model = MixLNForCausalLM(cfg)
    path = os.path.join(dir, "model.safetensors")
    tensors, _ = safetensors_load(path)
    want = model.state_dict()
    missing = [n for n in want if n not in tensors]
    unexpected = [n for n in tensors if n not in want]
    if missing or unexpected:
        raise ValueError(f"{path}: does not match config.json (post_ln_layers={cfg.post_ln_layers}); "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, p in want.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(f"{path}: {name} has shape {list(tensors[name].shape)}, expected {list(p.shape)}")
    model.load_state_dict({n: t.float() for n, t in tensors.items()})
    return model


# -----------------------------------------------------------------------------
# Data and training


def num_batches(n, B, T):
    """Whole batches in a shard of n tokens (each needs B*T inputs + 1 token for the last target)."""
    return (n - 1) // (B * T)


def batch(tokens, k, B, T):
    """Batch k of a shard -> inputs (B, T), targets (B, T), int64; targets are inputs shifted by one."""
    buf = np.asarray(tokens[k * B * T: k * B * T + B * T + 1]).astype(np.int64)
    if buf.size != B * T + 1:
        raise ValueError(f"batch {k} needs {B * T + 1} tokens, shard has only {buf.size} left")
    buf = torch.from_numpy(buf)
    return buf[:-1].view(B, T), buf[1:].view(B, T)


def lr_lambda(step, warmup, total, min_lr_ratio):
    """GaLore's schedule as a factor of lr_max: linear warmup from 0, then cosine to min_lr_ratio.
    Step 0 with warmup > 0 gives 0 (lr 0 on the first step): intended, it is what GaLore does."""
    s = step
    if s < warmup:
        return s / max(1, warmup)
    p = (s - warmup) / max(1, total - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def grad_norm_of(params):
    """Total L2 norm of all gradients, accumulated in float64 (the accurate side), as a float."""
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float(p.grad.detach().double().pow(2).sum())
    return math.sqrt(total)


def make_optimizer(params, lr, weight_decay):
    # AdamW as torch 1.13 implements it, applied to every parameter (norms and embedding included):
    #   p *= 1 - lr*wd;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
    #   p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)      with t = 1, 2, ...
    # (t counts every step, including step 0 with lr 0.)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


def train_step(model, opt, params, x, y, lr, grad_clip):
    """One step: forward, backward, norm, clip, AdamW update with learning rate lr.
    -> (loss before the update, grad norm before clipping)."""
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


def train(model, tokens, B, T, steps, lr, warmup, min_lr_ratio, weight_decay, grad_clip):
    """Train in place for `steps` steps walking batches 0, 1, ... of `tokens` (wrapping to 0).
    -> list of (train_loss, lr, grad_norm) per step."""
    model.train()
    params = [p for _, p in model.named_parameters()]
    opt = make_optimizer(params, lr, weight_decay)
    nb = num_batches(len(tokens), B, T)
    if nb < 1:
        raise ValueError(f"shard of {len(tokens)} tokens holds no whole batch of {B}x{T}")
    log = []
    for s in range(steps):
        lr_s = lr * lr_lambda(s, warmup, steps, min_lr_ratio)
        x, y = batch(tokens, s % nb, B, T)
        loss, gnorm = train_step(model, opt, params, x, y, lr_s, grad_clip)
        log.append((loss, lr_s, gnorm))
    return log


@torch.no_grad()
def evaluate(model, tokens, B, T, batches=None):
    """Mean loss over whole batches 0..nb-1 (or the first `batches`) -> (loss, target tokens)."""
    model.eval()
    nb = num_batches(len(tokens), B, T)
    if batches is not None:
        nb = min(nb, batches)
    if nb < 1:
        raise ValueError(f"shard of {len(tokens)} tokens holds no whole batch of {B}x{T}")
    total = 0.0
    for k in range(nb):
        x, y = batch(tokens, k, B, T)
        _, loss = model(x, y)
        total += float(loss)  # batches are equal size, so the mean of means is the token mean
    return total / nb, nb * B * T


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


def _token_loss(logits, targets):  # mean token cross-entropy, as MixLNForCausalLM.forward computes it
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def analyze(model, tokens, B, T, max_batches=0):
    """Angular distances between layer inputs and the loss with each layer dropped, over whole
    windows 0..nb-1 of `tokens` (or the first max_batches; 0 means all) ->
      {"val_loss": full-model mean token loss, "tokens": target tokens,
       "angular_distance": rows l = 0..L-1, row l holding n = 1..L-l (a ragged triangle):
           mean over every sequence of arccos(cos_sim(h_l, h_{l+n})) / pi at its last token,
       "layer_drop": [{"layer": l, "val_loss": mean token loss with layer l skipped}, ...]}"""
    if max_batches < 0:
        raise ValueError(f"max_batches must be >= 0 (0 means all), got {max_batches}")
    model.eval()
    L = model.config.num_hidden_layers
    nb = num_batches(len(tokens), B, T)
    if max_batches:
        nb = min(nb, max_batches)
    if nb < 1:
        raise ValueError(f"shard of {len(tokens)} tokens holds no whole batch of {B}x{T}")
    # sums over windows in float64; windows are equal size, so the mean of window means is the token mean
    full = 0.0
    dropped = [0.0] * L
    dist = [np.zeros(L - l) for l in range(L)]  # dist[l][n-1]: sum over sequences
    for k in range(nb):
        x, y = batch(tokens, k, B, T)
        hs = layer_states(model, x)              # L+1 tensors (B, T, C)
        last = [h[:, -1, :] for h in hs]         # (B, C): the last token of each sequence
        for l in range(L):
            for n in range(1, L - l + 1):
                dist[l][n - 1] += float(angular_distance(last[l], last[l + n]).sum())
        full += float(_token_loss(logits_from(model, hs[L], L), y))
        for l in range(L):
            dropped[l] += float(_token_loss(logits_from(model, hs[l], l + 1), y))
    return {"val_loss": full / nb, "tokens": nb * B * T,
            "angular_distance": [[float(s) / (nb * B) for s in row] for row in dist],
            "layer_drop": [{"layer": l, "val_loss": dropped[l] / nb} for l in range(L)]}


# -----------------------------------------------------------------------------
# CLI


def cmd_init(a):
    cfg = Config.make(a.vocab, a.dim, a.layers, a.heads, a.ffn, a.seq_len, a.alpha)
    model = MixLNForCausalLM(cfg)
    init_weights(model, a.seed, a.embed_std)
    save_checkpoint(model, a.out)
    nparams = sum(p.numel() for p in model.parameters())
    print(json.dumps({"out": a.out, "params": nparams, "post_ln_layers": cfg.post_ln_layers}))


def cmd_eval(a):
    model = load_checkpoint(a.ckpt)
    loss, n = evaluate(model, shard_load(a.data), a.batch, a.seq_len, a.batches)
    print(json.dumps({"val_loss": loss, "tokens": n}))


def cmd_analyze(a):
    model = load_checkpoint(a.ckpt)
    result = analyze(model, shard_load(a.data), a.batch, a.seq_len, a.batches)
    line = json.dumps(result)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(line + "\n")
        os.replace(tmp, a.out)
    print(line)


def cmd_train(a):
    model = load_checkpoint(a.ckpt)
    log = train(model, shard_load(a.data), a.batch, a.seq_len, a.steps, a.lr, a.warmup,
                a.min_lr_ratio, a.weight_decay, a.grad_clip)
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
    cfg = Config.make(a.vocab, a.dim, a.layers, a.heads, a.ffn, a.seq_len, a.alpha)
    model = MixLNForCausalLM(cfg)
    init_weights(model, 0)
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
        q.add_argument("--alpha", type=float, required=True, help="Post-LN fraction: floor(alpha*L) Post-LN layers")

    q = sub.add_parser("init", help="write a freshly initialised checkpoint")
    q.add_argument("--out", required=True)
    model_args(q)
    q.add_argument("--seed", type=int, required=True)
    q.add_argument("--embed-std", type=float, default=0.02)
    q.set_defaults(fn=cmd_init)

    q = sub.add_parser("eval", help="mean loss over whole batches of a shard")
    checkpoint_data_args(q)
    q.add_argument("--batches", type=int, default=None)
    q.set_defaults(fn=cmd_eval)

    q = sub.add_parser("analyze", help="angular distances between layer inputs and the loss with each layer "
                                       "dropped, as JSON (the last stdout line, and --out FILE if given)")
    checkpoint_data_args(q)
    q.add_argument("--batches", type=int, default=0, help="only the first K windows (default 0: all)")
    q.add_argument("--out", default=None, help="also write the JSON to this file")
    q.set_defaults(fn=cmd_analyze)

    q = sub.add_parser("train", help="train from a checkpoint, write the result and log.jsonl to --out")
    checkpoint_data_args(q)
    q.add_argument("--steps", type=int, required=True)
    q.add_argument("--lr", type=float, required=True)
    q.add_argument("--warmup", type=int, default=0)
    q.add_argument("--min-lr-ratio", type=float, default=0.1)
    q.add_argument("--weight-decay", type=float, default=0.0)
    q.add_argument("--grad-clip", type=float, default=0.0)
    q.add_argument("--out", required=True)
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
