"""A tiny decoder-only selective-attention language model in NumPy: forward and backward by hand.

Token and learned positional embeddings, pre-LayerNorm blocks

    x = x + attn(ln1(x))          attn: QKV projection, multi-head selective attention, output proj
    x = x + mlp(ln2(x))           mlp:  linear, GELU (tanh approximation), linear

a final LayerNorm and an output head tied to the token embedding (``logits = lnf(x) @ wte.T``).
The loss is the cross-entropy over a target mask plus ``cfg.eps`` times the paper's memory loss
(arXiv 2410.02703, § 8 of ``docs/selective-attention.md``).

Layer style (CS231n): every layer is a pair ``*_forward(...) -> (out, cache)`` and
``*_backward(dout, cache) -> grads``; ``forward``/``backward`` at the bottom chain them. Shapes:
B batch, N tokens, d = d_model, H heads, hd = d / H, V vocabulary. Token id 0 is PAD.
The code is dtype-generic: float32 for training (the default of ``init_params``), float64 for
finite-difference checks. Every Python scalar stays a Python float so float32 stays float32.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from selattn_reference.attention import DEFAULT_SOFT_STRENGTH
from selattn_reference.attention import memory_loss, memory_loss_backward
from selattn_reference.validation import check_budgets
from .backends import NumpyAttention

PAD = 0                 # token id of padding: not counted in the memory loss' normalisation
LAYERNORM_EPS = 1e-5    # added to the variance in every LayerNorm
GELU_C = math.sqrt(2.0 / math.pi)  # tanh-approximation constant (a Python float: keeps float32)

Params = Dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------------
# Configuration and parameters


def _check_int(name: str, value, smallest: int, largest: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < smallest:
        raise ValueError(f"{name} must be >= {smallest}, got {value}")
    if largest is not None and value > largest:
        raise ValueError(f"{name} must be <= {largest}, got {value}")
    return int(value)


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


# Upper bounds of the size settings, far beyond a tiny LM, so that a config from an untrusted
# file cannot make param_shapes (a dict per layer) or any allocation explode before the weights
# are checked against it (docs/reliability.md, untrusted checkpoints).
CONFIG_LIMITS = {"vocab_size": 1 << 24, "context": 1 << 24, "n_layers": 1024, "n_heads": 1024,
                 "d_model": 1 << 16, "mlp_ratio": 64}


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of the tiny LM. Every field is validated on construction."""

    vocab_size: int
    context: int              # max sequence length (learned positional embeddings)
    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 64
    mlp_ratio: int = 4
    selective: bool = True    # False: standard causal attention (the baseline)
    selector_head: int = 0
    eps: float = 0.1          # weight of the memory loss
    tau: float = 1.0          # memory-loss tau (selattn_reference.memory_loss)

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__ (ints stay ints, reals become floats)
        for name, smallest in (("vocab_size", 2), ("context", 1), ("n_layers", 1),
                               ("n_heads", 1), ("d_model", 1), ("mlp_ratio", 1)):
            value = _check_int(name, getattr(self, name), smallest, CONFIG_LIMITS[name])
            object.__setattr__(self, name, value)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads "
                             f"({self.n_heads})")
        if not isinstance(self.selective, (bool, np.bool_)):
            raise TypeError(f"selective must be a bool, got {type(self.selective).__name__}")
        object.__setattr__(self, "selective", bool(self.selective))
        head = _check_int("selector_head", self.selector_head, 0)
        if head >= self.n_heads:
            raise ValueError(f"selector_head {head} is out of range for n_heads = "
                             f"{self.n_heads}")
        object.__setattr__(self, "selector_head", head)
        eps = _check_real("eps", self.eps)
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        object.__setattr__(self, "eps", eps)
        tau = _check_real("tau", self.tau)
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        object.__setattr__(self, "tau", tau)

    @property
    def head_dim(self) -> int:
        """hd = d_model / n_heads."""
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "ModelConfig":
        """Build from ``to_dict()`` output; unknown keys or bad values: ValueError, TypeError."""
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        missing = sorted({"vocab_size", "context"} - set(d))
        if missing:
            raise ValueError(f"missing ModelConfig fields: {missing}")
        return cls(**d)


def param_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """The name and shape of every parameter (the contract's names, in a fixed order)."""
    d, r, V = cfg.d_model, cfg.mlp_ratio, cfg.vocab_size
    shapes = {"wte": (V, d), "wpe": (cfg.context, d)}
    for l in range(cfg.n_layers):
        shapes.update({
            f"h{l}.ln1.g": (d,), f"h{l}.ln1.b": (d,),
            f"h{l}.attn.wqkv": (d, 3 * d), f"h{l}.attn.bqkv": (3 * d,),
            f"h{l}.attn.wo": (d, d), f"h{l}.attn.bo": (d,),
            f"h{l}.ln2.g": (d,), f"h{l}.ln2.b": (d,),
            f"h{l}.mlp.w1": (d, r * d), f"h{l}.mlp.b1": (r * d,),
            f"h{l}.mlp.w2": (r * d, d), f"h{l}.mlp.b2": (d,),
        })
    shapes.update({"lnf.g": (d,), "lnf.b": (d,)})
    return shapes


def init_params(cfg: ModelConfig, seed: int = 0, dtype=np.float32) -> Params:
    """GPT-2 style initialisation: weights N(0, 0.02), the projections that feed the residual
    stream (attn.wo, mlp.w2) scaled down by sqrt(2 n_layers) so the stream's variance does not
    grow with depth; biases 0; LayerNorm gains 1.

    Parameters
    ----------
    cfg : ModelConfig
    seed : int, seed of ``np.random.default_rng``
    dtype : float dtype of every parameter (float32 for training, float64 for checking)

    Returns
    -------
    params : dict name -> array, the shapes of ``param_shapes(cfg)``
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    rng = np.random.default_rng(seed)
    std, residual_std = 0.02, 0.02 / math.sqrt(2 * cfg.n_layers)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith((".attn.wo", ".mlp.w2")):
            value = residual_std * rng.standard_normal(shape)
        elif len(shape) == 2:                              # wte, wpe, wqkv, w1
            value = std * rng.standard_normal(shape)
        elif name.endswith(".g"):
            value = np.ones(shape)
        else:                                              # biases and LayerNorm shifts
            value = np.zeros(shape)
        params[name] = value.astype(dtype)
    return params


def num_params(params: Params) -> int:
    """Total number of scalars in ``params``."""
    return int(sum(p.size for p in params.values()))


def check_params(params: Params, cfg: ModelConfig) -> np.dtype:
    """Check names, shapes and dtype of ``params`` against ``cfg``; return their common dtype."""
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
    expected = param_shapes(cfg)
    missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(f"params do not match the config: missing {missing}, extra {extra}")
    dtype = None
    for name, shape in expected.items():
        p = params[name]
        if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
            raise TypeError(f"params[{name!r}] must be a floating ndarray")
        if p.shape != shape:
            raise ValueError(f"params[{name!r}] has shape {p.shape}, expected {shape}")
        if dtype is None:
            dtype = p.dtype
        elif p.dtype != dtype:
            raise TypeError(f"params[{name!r}] is {p.dtype} but others are {dtype}")
    return dtype


# ----------------------------------------------------------------------------------------------
# Embedding (token + learned position)


def check_tokens(tokens, cfg: ModelConfig, start: int = 0, name: str = "tokens") -> np.ndarray:
    """(B, N) int array with ids in [0, vocab) and start + N <= context."""
    tokens = np.asarray(tokens)
    if tokens.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {tokens.dtype}")
    if tokens.ndim != 2 or min(tokens.shape) < 1:
        raise ValueError(f"{name} must have shape (B, N) with B, N >= 1, got {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(f"{name} must be in [0, {cfg.vocab_size}), got values in "
                         f"[{tokens.min()}, {tokens.max()}]")
    start = _check_int("start", start, 0)
    if start + tokens.shape[1] > cfg.context:
        raise ValueError(f"positions {start}..{start + tokens.shape[1] - 1} do not fit the "
                         f"context of {cfg.context}")
    return tokens


def embed(params: Params, tokens: np.ndarray, start: int = 0) -> np.ndarray:
    """x = wte[tokens] + wpe[start:start + N].

    Parameters
    ----------
    params : dict with "wte" (V, d) and "wpe" (context, d)
    tokens : (B, N) int
    start : int, position of tokens[:, 0] (for token-by-token decoding)

    Returns
    -------
    x : (B, N, d)
    """
    tokens = np.asarray(tokens)
    N = tokens.shape[1]
    if start + N > params["wpe"].shape[0]:
        raise ValueError(f"positions {start}..{start + N - 1} exceed the context of "
                         f"{params['wpe'].shape[0]}")
    return params["wte"][tokens] + params["wpe"][start:start + N]          # (B, N, d)


def embed_backward(dx: np.ndarray, tokens: np.ndarray, vocab_size: int, context: int,
                   start: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Gradients of ``embed``: (dwte (V, d), dwpe (context, d))."""
    B, N, d = dx.shape
    dwte = np.zeros((vocab_size, d), dtype=dx.dtype)                       # (V, d)
    np.add.at(dwte, tokens.reshape(-1), dx.reshape(B * N, d))              # scatter-add rows
    dwpe = np.zeros((context, d), dtype=dx.dtype)                          # (context, d)
    dwpe[start:start + N] = dx.sum(axis=0)
    return dwte, dwpe


# ----------------------------------------------------------------------------------------------
# LayerNorm, linear, GELU


def layernorm_forward(x: np.ndarray, g: np.ndarray, b: np.ndarray):
    """y = (x - mean) / sqrt(var + 1e-5) * g + b over the last axis.

    x (..., d), g (d,), b (d,) -> y (..., d), cache
    """
    mean = x.mean(axis=-1, keepdims=True)                                  # (..., 1)
    xc = x - mean                                                          # (..., d)
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + LAYERNORM_EPS)  # (..., 1)
    xhat = xc * rstd                                                       # (..., d)
    return xhat * g + b, (xhat, rstd, g)


def layernorm_backward(dy: np.ndarray, cache):
    """Gradients of ``layernorm_forward``: (dx (..., d), dg (d,), db (d,))."""
    xhat, rstd, g = cache
    lead = tuple(range(dy.ndim - 1))
    dg = (dy * xhat).sum(axis=lead)                                        # (d,)
    db = dy.sum(axis=lead)                                                 # (d,)
    dxhat = dy * g                                                         # (..., d)
    # xhat = (x - mean) * rstd: remove the components along 1 and along xhat (the two
    # directions the normalisation projects out), then rescale
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))     # (..., d)
    return dx, dg, db


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray):
    """y = x @ w + b.  x (..., n_in), w (n_in, n_out), b (n_out,) -> y (..., n_out), cache"""
    y = x @ w
    y += b                                                   # in place: one pass less
    return y, (x, w)


def linear_backward(dy: np.ndarray, cache):
    """Gradients of ``linear_forward``: (dx (..., n_in), dw (n_in, n_out), db (n_out,))."""
    x, w = cache
    n_in, n_out = w.shape
    dx = dy @ w.T                                                          # (..., n_in)
    dw = x.reshape(-1, n_in).T @ dy.reshape(-1, n_out)                     # (n_in, n_out)
    db = dy.reshape(-1, n_out).sum(axis=0)                                 # (n_out,)
    return dx, dw, db


def gelu_forward(a: np.ndarray):
    """GELU, tanh approximation: 0.5 a (1 + tanh(c (a + 0.044715 a^3))), c = sqrt(2/pi)."""
    a2 = a * a
    t = np.tanh(GELU_C * a * (1.0 + 0.044715 * a2))        # the same argument, fewer passes
    y = 1.0 + t
    y *= 0.5 * a
    return y, (a, a2, t)


def gelu_backward(dy: np.ndarray, cache) -> np.ndarray:
    """Gradient of ``gelu_forward``."""
    a, a2, t = cache
    # d/da [0.5 a (1 + t)] = 0.5 (1 + t) + 0.5 a (1 - t^2) c (1 + 3 * 0.044715 a^2)
    slope = 1.0 - t * t
    slope *= (0.5 * GELU_C) * a * (1.0 + 3.0 * 0.044715 * a2)
    slope += 0.5 * (1.0 + t)
    slope *= dy
    return slope


# ----------------------------------------------------------------------------------------------
# MLP


def mlp_forward(h: np.ndarray, params: Params, l: int):
    """y = gelu(h @ w1 + b1) @ w2 + b2 for block ``l``.  h (B, N, d) -> y (B, N, d), cache"""
    a, fc1 = linear_forward(h, params[f"h{l}.mlp.w1"], params[f"h{l}.mlp.b1"])   # (B, N, r d)
    z, act = gelu_forward(a)                                                     # (B, N, r d)
    y, fc2 = linear_forward(z, params[f"h{l}.mlp.w2"], params[f"h{l}.mlp.b2"])   # (B, N, d)
    return y, (fc1, act, fc2, l)


def mlp_backward(dy: np.ndarray, cache):
    """Gradients of ``mlp_forward``: (dh (B, N, d), grads dict keyed by parameter name)."""
    fc1, act, fc2, l = cache
    dz, dw2, db2 = linear_backward(dy, fc2)
    da = gelu_backward(dz, act)
    dh, dw1, db1 = linear_backward(da, fc1)
    return dh, {f"h{l}.mlp.w1": dw1, f"h{l}.mlp.b1": db1,
                f"h{l}.mlp.w2": dw2, f"h{l}.mlp.b2": db2}


# ----------------------------------------------------------------------------------------------
# Attention: heads, backends, the attention sub-layer


def split_heads(qkv: np.ndarray, n_heads: int):
    """(B, N, 3d) with columns [q | k | v], heads contiguous in each -> q, k, v (B, H, N, hd)."""
    B, N, three_d = qkv.shape
    hd = three_d // (3 * n_heads)
    qkv = qkv.reshape(B, N, 3, n_heads, hd)                                # (B, N, 3, H, hd)
    qkv = qkv.transpose(2, 0, 3, 1, 4)                                     # (3, B, H, N, hd)
    return qkv[0], qkv[1], qkv[2]


def split_heads_backward(dq: np.ndarray, dk: np.ndarray, dv: np.ndarray) -> np.ndarray:
    """Gradient of ``split_heads``: dq, dk, dv (B, H, N, hd) -> dqkv (B, N, 3d)."""
    B, H, N, hd = dq.shape
    dqkv = np.stack([dq, dk, dv])                                          # (3, B, H, N, hd)
    dqkv = dqkv.transpose(1, 3, 0, 2, 4)                                   # (B, N, 3, H, hd)
    return dqkv.reshape(B, N, 3 * H * hd)                                  # (B, N, 3d)


def qkv_heads(h: np.ndarray, params: Params, l: int, cfg: ModelConfig):
    """Block ``l``'s QKV projection split into heads: h (B, N, d) -> q, k, v each (B, H, N, hd)."""
    qkv = h @ params[f"h{l}.attn.wqkv"] + params[f"h{l}.attn.bqkv"]       # (B, N, 3d)
    return split_heads(qkv, cfg.n_heads)


def merge_heads(o: np.ndarray) -> np.ndarray:
    """(B, H, N, hd) -> (B, N, d), heads side by side."""
    B, H, N, hd = o.shape
    return o.transpose(0, 2, 1, 3).reshape(B, N, H * hd)                   # (B, N, d)


def merge_heads_backward(dy: np.ndarray, n_heads: int) -> np.ndarray:
    """Gradient of ``merge_heads``: (B, N, d) -> (B, H, N, hd)."""
    B, N, d = dy.shape
    return dy.reshape(B, N, n_heads, d // n_heads).transpose(0, 2, 1, 3)  # (B, H, N, hd)


def attention_forward(h: np.ndarray, params: Params, l: int, cfg: ModelConfig, attention,
                      need_F: bool, budget: Optional[int] = None, soft: Optional[tuple] = None):
    """Block ``l``'s attention sub-layer: QKV projection, selective attention, output projection.

    h (B, N, d) -> y (B, N, d), F (B, N, N) or None, cache
    """
    qkv, proj_in = linear_forward(h, params[f"h{l}.attn.wqkv"], params[f"h{l}.attn.bqkv"])
    q, k, v = split_heads(qkv, cfg.n_heads)                                # (B, H, N, hd) each
    soft_kwargs = {} if soft is None else {"soft_budget": soft[0], "soft_strength": soft[1]}
    o, F, ctx = attention.forward(q, k, v, selective=cfg.selective,
                                  selector_head=cfg.selector_head, need_F=need_F, budget=budget,
                                  **soft_kwargs)
    y, proj_out = linear_forward(merge_heads(o), params[f"h{l}.attn.wo"],
                                 params[f"h{l}.attn.bo"])                  # (B, N, d)
    return y, F, (proj_in, ctx, proj_out, attention, cfg.n_heads, l)


def attention_backward(dy: np.ndarray, dF: Optional[np.ndarray], cache):
    """Gradients of ``attention_forward``: (dh (B, N, d), grads dict keyed by parameter name).
    ``dF`` (B, N, N) or None is the upstream gradient on F (from the memory loss)."""
    proj_in, ctx, proj_out, attention, n_heads, l = cache
    do, dwo, dbo = linear_backward(dy, proj_out)                           # (B, N, d)
    dq, dk, dv = attention.backward(merge_heads_backward(do, n_heads), dF, ctx)
    dh, dwqkv, dbqkv = linear_backward(split_heads_backward(dq, dk, dv), proj_in)
    return dh, {f"h{l}.attn.wqkv": dwqkv, f"h{l}.attn.bqkv": dbqkv,
                f"h{l}.attn.wo": dwo, f"h{l}.attn.bo": dbo}


# ----------------------------------------------------------------------------------------------
# One transformer block (pre-LayerNorm)


def block_forward(x: np.ndarray, params: Params, l: int, cfg: ModelConfig, attention,
                  need_F: bool, budget: Optional[int] = None, soft: Optional[tuple] = None):
    """x + attn(ln1(x)), then + mlp(ln2(.)).  x (B, N, d) -> x (B, N, d), F or None, cache
    ``soft``: None, or (soft_budget, soft_strength) of the rank penalty (training only)."""
    h, ln1 = layernorm_forward(x, params[f"h{l}.ln1.g"], params[f"h{l}.ln1.b"])
    a, F, attn = attention_forward(h, params, l, cfg, attention, need_F, budget, soft)
    x = x + a                                                              # (B, N, d)
    h, ln2 = layernorm_forward(x, params[f"h{l}.ln2.g"], params[f"h{l}.ln2.b"])
    m, mlp = mlp_forward(h, params, l)
    return x + m, F, (ln1, attn, ln2, mlp, l)


def block_backward(dx: np.ndarray, dF: Optional[np.ndarray], cache):
    """Gradients of ``block_forward``: (dx (B, N, d), grads dict keyed by parameter name)."""
    ln1, attn, ln2, mlp, l = cache
    dh, grads = mlp_backward(dx, mlp)
    dh, grads[f"h{l}.ln2.g"], grads[f"h{l}.ln2.b"] = layernorm_backward(dh, ln2)
    dx = dx + dh                                                           # residual
    dh, attn_grads = attention_backward(dx, dF, attn)
    grads.update(attn_grads)
    dh, grads[f"h{l}.ln1.g"], grads[f"h{l}.ln1.b"] = layernorm_backward(dh, ln1)
    return dx + dh, grads                                                  # residual


# ----------------------------------------------------------------------------------------------
# Output head (final LayerNorm, tied to the embedding) and the losses


def head_forward(x: np.ndarray, params: Params):
    """logits = lnf(x) @ wte.T.  x (B, N, d) -> logits (B, N, V), cache"""
    y, lnf = layernorm_forward(x, params["lnf.g"], params["lnf.b"])        # (B, N, d)
    return y @ params["wte"].T, (y, lnf, params["wte"])                    # (B, N, V)


def head_backward(dlogits: np.ndarray, cache):
    """Gradients of ``head_forward``: (dx (B, N, d), grads: "wte" (the head's share), "lnf.*")."""
    y, lnf, wte = cache
    V, d = wte.shape
    dwte = dlogits.reshape(-1, V).T @ y.reshape(-1, d)                     # (V, d)
    dx, dg, db = layernorm_backward(dlogits @ wte, lnf)                    # (B, N, d)
    return dx, {"wte": dwte, "lnf.g": dg, "lnf.b": db}


def head_logits(x: np.ndarray, params: Params) -> np.ndarray:
    """Final LayerNorm and the tied head: x (B, N, d) -> logits (B, N, V)."""
    return head_forward(x, params)[0]


def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray, weights: np.ndarray):
    """Weighted mean of -log softmax(logits)[target]: sum(w * nll) / sum(w).

    logits (B, N, V), targets (B, N) int, weights (B, N) >= 0 with a positive sum
    -> loss (0-d array of the logits' dtype), cache
    """
    z = logits - logits.max(axis=-1, keepdims=True)                        # (B, N, V) stable
    log_norm = np.log(np.exp(z).sum(axis=-1))                              # (B, N)
    target_z = np.take_along_axis(z, targets[..., None], axis=-1)[..., 0]  # (B, N)
    nll = log_norm - target_z                                              # (B, N)
    total_weight = weights.sum()
    loss = (weights * nll).sum() / total_weight
    return loss, (z, log_norm, targets, weights, total_weight)


def cross_entropy_backward(dloss: float, cache) -> np.ndarray:
    """Gradient of ``cross_entropy_forward``: dlogits (B, N, V) = (softmax - onehot) w / sum(w)."""
    z, log_norm, targets, weights, total_weight = cache
    dlogits = np.exp(z - log_norm[..., None])                              # (B, N, V) softmax
    np.put_along_axis(dlogits, targets[..., None],
                      np.take_along_axis(dlogits, targets[..., None], axis=-1) - 1.0, axis=-1)
    return dlogits * (weights * (dloss / total_weight))[..., None]


def memory_forward(Fs: Sequence[np.ndarray], tokens: np.ndarray, tau: float):
    """mem = sum_l sum_b memory_loss(F_l, tau)[b] / (n_layers * non_pad_tokens).

    Query rows of PAD tokens are treated as fully evicted (their F set to tau) so they never
    attain the max: appending padding changes neither the memory loss nor its gradient.

    Fs : per-layer (B, N, N) accumulated masks; tokens (B, N) int -> mem (0-d array), cache
    """
    pad_rows = (tokens == PAD)[:, :, None]                                 # (B, N, 1)
    non_pad = int((tokens != PAD).sum())
    if non_pad == 0:
        raise ValueError("tokens are all PAD (0): the memory loss has nothing to normalise by")
    norm = len(Fs) * non_pad
    Fs = [np.where(pad_rows, tau, F) for F in Fs]                          # (B, N, N) each
    mem = sum(memory_loss(F, tau).sum() for F in Fs) / norm
    return mem, (Fs, tau, norm)


def memory_forward_by_backend(attention, contexts: Sequence, tokens: np.ndarray, tau: float):
    """``memory_forward`` computed by an attention backend from each layer's context, for
    backends that can do it without F (B, N, N) (``selattn_lm.backends.CAttention``: the loss and
    its gradient as rows of F). The backend's ``memory_loss(ctx, tau, ignore_rows)`` returns the
    layer's mem (B,) with the rows ``ignore_rows`` (B, N) counted as fully evicted (as PAD rows
    are above) and a state for its ``memory_loss_backward(dmem (B,), state)``, whose result its
    ``backward`` takes as dF.

    contexts : per-layer backend contexts; tokens (B, N) int -> mem (0-d array), cache
    """
    pad_rows = tokens == PAD                                               # (B, N)
    non_pad = int((~pad_rows).sum())
    if non_pad == 0:
        raise ValueError("tokens are all PAD (0): the memory loss has nothing to normalise by")
    norm = len(contexts) * non_pad
    layers = [attention.memory_loss(ctx, tau, pad_rows) for ctx in contexts]   # (mem, state)
    mem = sum(float(np.sum(m, dtype=np.float64)) for m, _ in layers) / norm
    return np.asarray(mem), (None, tau, norm, attention, [state for _, state in layers])


def memory_backward(dmem: float, cache) -> list:
    """Gradient of ``memory_forward``: one dF (B, N, N) per layer (zero on PAD rows); of
    ``memory_forward_by_backend``: one gradient per layer in the backend's own form."""
    Fs, tau, norm = cache[:3]
    if Fs is None:                                  # the backend computed it (no F)
        attention, states = cache[3:]
        return [attention.memory_loss_backward(dmem / norm, state) for state in states]
    B = Fs[0].shape[0]
    dmem_b = np.full(B, dmem / norm, dtype=Fs[0].dtype)                    # (B,)
    # a PAD row holds F = tau exactly, where min(F, tau) is flat: its gradient is 0
    return [memory_loss_backward(dmem_b, F, tau) for F in Fs]


# ----------------------------------------------------------------------------------------------
# The model


@dataclass
class ModelCache:
    """What ``backward`` needs from ``forward``."""

    cfg: ModelConfig
    tokens: np.ndarray             # (B, N) int
    blocks: list                   # block_forward caches, one per layer
    head: tuple                    # head_forward cache
    ce: tuple                      # cross_entropy_forward cache
    mem: Optional[tuple]           # memory_forward(_by_backend) cache (None: memory loss off)
    Fs: Optional[List[np.ndarray]]  # per-layer F (B, N, N) when the memory loss reads F
    budgets: List[Optional[int]]

    @property
    def attention_contexts(self) -> list:
        """Each layer's attention backend context (the reference's ``Cache`` for NumpyAttention:
        its ``L`` holds the scaled logits, ``F`` the accumulated mask)."""
        return [block[1][1] for block in self.blocks]      # block: (ln1, attn, ...), attn[1]: ctx

    @property
    def memory_masks(self) -> Optional[List[np.ndarray]]:
        """The per-layer F the memory loss saw (PAD rows set to tau), or None when it is off or
        the backend computed it without F (``memory_forward_by_backend``)."""
        return None if self.mem is None else self.mem[0]


def _check_targets(targets, target_mask, tokens: np.ndarray, cfg: ModelConfig, dtype):
    targets = check_tokens(targets, cfg, name="targets")
    if targets.shape != tokens.shape:
        raise ValueError(f"targets must have the shape of tokens {tokens.shape}, got "
                         f"{targets.shape}")
    if target_mask is None:
        weights = np.ones(tokens.shape, dtype=dtype)                       # every position
    else:
        target_mask = np.asarray(target_mask)
        if target_mask.shape != tokens.shape:
            raise ValueError(f"target_mask must have the shape of tokens {tokens.shape}, got "
                             f"{target_mask.shape}")
        if target_mask.dtype.kind not in "biuf":
            raise TypeError(f"target_mask must be bool or numeric, got {target_mask.dtype}")
        weights = target_mask.astype(dtype)
        if not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("target_mask must be finite and >= 0")
    if not weights.sum() > 0:
        raise ValueError("target_mask selects no position: the cross-entropy is undefined")
    return targets, weights


def forward(params: Params, cfg: ModelConfig, tokens, targets=None, target_mask=None, *,
            attention=None, budgets=None, soft_budgets=None,
            soft_strength: float = DEFAULT_SOFT_STRENGTH):
    """The whole model: logits, and with targets the losses.

    Parameters
    ----------
    params : dict from ``init_params`` (or a checkpoint)
    cfg : ModelConfig
    tokens : (B, N) int, N <= cfg.context; id 0 is PAD
    targets : (B, N) int or None, next tokens (None: inference, no losses)
    target_mask : (B, N) bool or float weights, or None (every position): which targets count
    attention : backend with the ``NumpyAttention`` interface (default ``NumpyAttention()``)
    budgets : per-layer list of int/None, pruned-KV budgets (inference only: no backward)
    soft_budgets : per-layer list of int/None, or None: pruning-aware training, each layer's
        logits get the rank penalty of a buffer of that many slots (``rank_penalty``; needs an
        attention backend that implements it, such as ``NumpyAttention``)
    soft_strength : float >= 0, the rank penalty's slope

    Returns
    -------
    logits : (B, N, V)
    losses : {"ce", "mem", "total"} floats, total = ce + cfg.eps * mem; None without targets
    cache : ModelCache for ``backward``
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    dtype = check_params(params, cfg)
    tokens = check_tokens(tokens, cfg)
    budgets = check_budgets(budgets, cfg.n_layers)
    soft_budgets = check_budgets(soft_budgets, cfg.n_layers, "soft_budgets")
    attention = NumpyAttention() if attention is None else attention
    with_loss = targets is not None
    if with_loss:
        targets, weights = _check_targets(targets, target_mask, tokens, cfg, dtype)
    with_memory = with_loss and cfg.selective and cfg.eps != 0.0
    # A backend with its own memory_loss (the C kernels) computes it from its contexts without
    # F (B, N, N); every other backend hands F to memory_forward, the readable path.
    by_backend = with_memory and hasattr(attention, "memory_loss")
    need_F = with_memory and not by_backend

    x = embed(params, tokens)                                              # (B, N, d)
    blocks, Fs = [], []
    for l in range(cfg.n_layers):
        soft = None if soft_budgets[l] is None else (soft_budgets[l], soft_strength)
        x, F, block = block_forward(x, params, l, cfg, attention, need_F, budgets[l], soft)
        blocks.append(block)
        Fs.append(F)
    logits, head = head_forward(x, params)                                 # (B, N, V)

    losses, ce, mem = None, None, None
    if with_loss:
        ce_loss, ce = cross_entropy_forward(logits, targets, weights)
        mem_loss = 0.0
        if by_backend:
            contexts = [block[1][1] for block in blocks]   # block: (ln1, attn, ...), attn[1]
            mem_loss, mem = memory_forward_by_backend(attention, contexts, tokens, cfg.tau)
        elif need_F:
            mem_loss, mem = memory_forward(Fs, tokens, cfg.tau)
        losses = {"ce": float(ce_loss), "mem": float(mem_loss),
                  "total": float(ce_loss + cfg.eps * mem_loss)}
    cache = ModelCache(cfg=cfg, tokens=tokens, blocks=blocks, head=head, ce=ce, mem=mem,
                       Fs=Fs if need_F else None, budgets=budgets)
    return logits, losses, cache


def backward(cache: ModelCache) -> Params:
    """Gradients of ``losses["total"]`` with respect to every parameter (same keys as params)."""
    if not isinstance(cache, ModelCache):
        raise TypeError(f"cache must be the ModelCache from forward, got {type(cache).__name__}")
    if cache.ce is None:
        raise ValueError("forward was called without targets: there is no loss to differentiate")
    if any(b is not None for b in cache.budgets):
        raise ValueError(f"backward through budgets {cache.budgets} is not supported: budgets "
                         "are for inference; train with budgets=None")
    cfg = cache.cfg
    dlogits = cross_entropy_backward(1.0, cache.ce)                        # (B, N, V)
    dx, grads = head_backward(dlogits, cache.head)                         # (B, N, d)
    if cache.mem is not None:
        dFs = memory_backward(cfg.eps, cache.mem)       # per layer: (B, N, N) or the backend's
    else:
        dFs = [None] * cfg.n_layers
    for l in reversed(range(cfg.n_layers)):
        dx, block_grads = block_backward(dx, dFs[l], cache.blocks[l])
        grads.update(block_grads)
    dwte, grads["wpe"] = embed_backward(dx, cache.tokens, cfg.vocab_size, cfg.context)
    grads["wte"] = grads["wte"] + dwte                                     # tied: head + embedding
    return {name: grads[name] for name in param_shapes(cfg)}
