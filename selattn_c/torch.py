"""selattn_c.torch: selective attention for PyTorch, on the C kernels (CPU).

Optional: ``pip install '.[torch]'``. Nothing else in selattn_c imports this module but
``selattn_c.hf`` (Hugging Face transformers, itself optional).

- ``selective_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=True,
  scale=None, enable_gqa=False, *, selector_head=0, ...)``: a drop-in for
  ``torch.nn.functional.scaled_dot_product_attention`` (SDPA's names and order), differentiable,
  on the custom operator ``torch.ops.selattn.attention`` (``torch_ops``), so that
  ``torch.compile(fullgraph=True)`` traces it; with ``selective=False`` it computes what
  ``scaled_dot_product_attention(q, k, v, is_causal=True)`` computes.
- ``SelectiveAttention``: that function as an ``nn.Module`` (no parameters).
- ``SelectiveSelfAttention``: causal multi-head self-attention with qkv and output projections,
  x (B, N, d) -> (B, N, d), to put into a GPT block.
- ``TorchKVCache``: ``selattn_c.KVCache`` (the pruned KV cache) for torch tensors: ``prefill`` and
  ``step`` for token-by-token generation.
- ``accumulated_mask`` and ``memory_loss`` (``torch_math``): the mask F and the paper's memory
  loss in plain torch operations, differentiable by autograd (O(B N^2) memory: for the memory
  loss of small models).

What ``selective_attention`` takes, and what happens to other input (docs/torch.md):

- Shapes as SDPA's: query (*batch, H, N, D), key (*batch, H_kv, N, D), value (*batch, H_kv, N,
  Dv), any number (>= 1) of leading batch dimensions. H_kv < H (grouped-query attention) needs
  ``enable_gqa=True``, as in SDPA: query head h reads key/value head ``h // (H / H_kv)``, so the
  selector is query head ``selector_head`` with key head ``selector_head // (H / H_kv)``.
  Dv != D is computed by zero-padding the narrower of (q, k) and v to the wider width (exact).
  Self-attention only: key and value must have query's N (decode with ``TorchKVCache``).
- Refused, with a ``ValueError`` saying why: ``is_causal=False`` (selective attention is
  causal), an ``attn_mask`` (only None: the causal mask is implied), ``dropout_p > 0``.
- CPU tensors only: a CUDA (or any other device) tensor is a ``ValueError`` that names the
  argument and says to pass ``x.cpu()``.
- float32 runs the C kernels. float64 runs the paper's listing in torch float64 operations
  (``torch_math.listing_attention``; with a budget, ``selattn_reference.forward``), so that
  ``torch.autograd.gradcheck`` and ``gradgradcheck`` work. float16 and bfloat16 are refused with
  a ``TypeError`` saying to convert with ``x.float()``: not cast silently, because the result
  would be float32 accuracy in a float16 tensor.
- Any strides: a non-contiguous tensor is copied to a contiguous one first (one copy of that
  input); a contiguous float32 CPU tensor is handed to C without a copy.
- ``budget`` (pruned attention) is inference only: with a budget, an input that requires grad
  while grad mode is on is a ``ValueError`` (run under ``torch.no_grad()`` or detach).
- NaN or infinity in an input raise ``ValueError`` unless ``check_finite=False`` (float64
  inputs: checked in eager mode only; a compiled graph does not read its inputs' values).

Saved tensors: the operator's autograd saves q, k, v, the output and its row statistics for the
backward, so modifying them in place before ``backward`` is the usual autograd error, not a
wrong gradient. A second derivative of the float32 path is refused (``RuntimeError``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as TF
from torch import nn

from . import KVCache
from . import torch_ops
from .torch_math import accumulated_mask, listing_attention, memory_loss
from selattn_reference import attention as _reference
from selattn_reference.validation import check_budget, check_selector_head, resolve_scale

__all__ = [
    "SelectiveAttention",
    "SelectiveSelfAttention",
    "TorchKVCache",
    "accumulated_mask",
    "memory_loss",
    "selective_attention",
]


# ----------------------------------------------------------------------------------------------
# Tensors in, arrays for the kernels


def _check_tensor(x, name: str) -> None:
    """``x`` is a dense CPU tensor of a dtype the bridge computes in (float32, float64)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__} (for NumPy "
                        "arrays call selattn_c.forward)")
    if x.device.type != "cpu":
        raise ValueError(f"{name} is on device '{x.device}', but the selective-attention kernels "
                         f"run on the CPU only: pass {name}.cpu() (and move the result back "
                         "with .to(device))")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}: pass "
                        f"{name}.to_dense()")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 (the C kernels) or float64 (the listing in "
                        f"torch operations, for gradient checks), got {x.dtype}: pass "
                        f"{name}.float(); lower precisions are not cast silently")


def _kernel_tensor(x, name: str, ndim: int) -> torch.Tensor:
    """``x`` checked (a dense CPU float32 tensor of ``ndim`` dimensions) and made contiguous:
    ``x`` itself (detached) when it already is, else a contiguous copy."""
    _check_tensor(x, name)
    if x.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {x.dtype}: the kernels compute in float32 "
                        f"and do not cast silently; pass {name}.float()")
    if x.dim() != ndim:
        dims = "(B, H, N, D)" if ndim == 4 else "(B, H, D)"
        raise ValueError(f"{name} must have {ndim} dimensions {dims}, got shape "
                         f"{tuple(x.shape)}")
    x = x.detach()
    return x if x.is_contiguous() else x.contiguous()      # the kernels read C order


def _array(x: torch.Tensor, name: str) -> np.ndarray:
    """A NumPy view of the contiguous CPU float32 tensor ``x`` (no copy)."""
    try:
        return x.numpy()
    except (RuntimeError, TypeError) as exc:     # e.g. a fake tensor while torch.compile traces
        raise TypeError(f"{name}: cannot read the tensor's data as an array ({exc}); "
                        "TorchKVCache decodes real CPU tensors only (it is not traceable by "
                        "torch.compile); selective_attention is") from None


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in tensors)


# ----------------------------------------------------------------------------------------------
# The functional form


def _refuse_sdpa_options(attn_mask, dropout_p, is_causal) -> None:
    """SDPA's arguments that selective attention cannot honour: a clear ValueError each."""
    if attn_mask is not None:
        raise ValueError("attn_mask must be None: selective attention is causal attention with "
                         "the accumulated mask F subtracted, and takes no other mask (no padding "
                         "or custom masks; batch sequences of equal length)")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p={dropout_p!r}: attention dropout is not implemented by the "
                         "kernels; pass dropout_p=0.0 (and regularise elsewhere)")
    if is_causal is not True:
        raise ValueError(f"is_causal={is_causal!r}: selective attention is causal by definition "
                         "(F is built from earlier queries); pass is_causal=True")


def _check_shapes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  enable_gqa: bool) -> Tuple[int, int]:
    """Check SDPA-style shapes; return (H, H_kv)."""
    if query.dim() < 4:
        raise ValueError(f"query must be (*batch, H, N, D) with at least one batch dimension, "
                         f"got shape {tuple(query.shape)}: the selector is a head, so the head "
                         "axis is needed (query.unsqueeze(0) for one sequence, "
                         ".unsqueeze(-3) for one head)")
    for name, x in (("key", key), ("value", value)):
        if x.dim() != query.dim():
            raise ValueError(f"{name} must have query's {query.dim()} dimensions, got shape "
                             f"{tuple(x.shape)}")
        if x.shape[:-3] != query.shape[:-3]:
            raise ValueError(f"{name}'s batch dimensions {tuple(x.shape[:-3])} differ from "
                             f"query's {tuple(query.shape[:-3])}")
        if x.shape[-2] != query.shape[-2]:
            raise ValueError(f"{name} has {x.shape[-2]} tokens but query has "
                             f"{query.shape[-2]}: selective attention is self-attention over "
                             "one sequence (decode with TorchKVCache)")
    if key.shape[-3] != value.shape[-3]:
        raise ValueError(f"key has {key.shape[-3]} heads but value has {value.shape[-3]}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key's last dimension ({key.shape[-1]}) must equal query's "
                         f"({query.shape[-1]})")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if min(x.shape) < 1:
            raise ValueError(f"every dimension of {name} must be >= 1, got {tuple(x.shape)}")
    H, H_kv = query.shape[-3], key.shape[-3]
    if H != H_kv:
        if not enable_gqa:
            raise ValueError(f"query has {H} heads but key and value have {H_kv}: pass "
                             "enable_gqa=True for grouped-query attention (as in SDPA)")
        if H % H_kv:
            raise ValueError(f"grouped-query attention needs key/value heads ({H_kv}) dividing "
                             f"query heads ({H})")
    return H, H_kv


def selective_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                        is_causal: bool = True, scale: Optional[float] = None,
                        enable_gqa: bool = False, *, selector_head: int = 0,
                        protect_bos: bool = True, selective: bool = True,
                        budget: Optional[int] = None, check_finite: bool = True) -> torch.Tensor:
    """Causal selective attention (Leviathan et al. 2024) of CPU tensors, with SDPA's signature.

    Used like ``torch.nn.functional.scaled_dot_product_attention(query, key, value,
    is_causal=True)`` (which is what ``selective=False`` computes), with autograd, and traceable
    by ``torch.compile(fullgraph=True)`` (the kernels are the custom operator
    ``torch.ops.selattn.attention``).

    Parameters
    ----------
    query : (*batch, H, N, D) float32 or float64 CPU tensor, any strides
    key : (*batch, H_kv, N, D), H_kv dividing H (H_kv < H needs ``enable_gqa``)
    value : (*batch, H_kv, N, Dv); Dv may differ from D (computed by zero padding, exact)
    attn_mask : None only (ValueError otherwise: the causal mask is implied)
    dropout_p : 0.0 only (ValueError otherwise: not implemented)
    is_causal : True only (ValueError otherwise: selective attention is causal)
    scale : float or None, logit scale (default ``1/sqrt(D)``)
    enable_gqa : bool, allow H_kv < H: query head h reads key/value head ``h // (H / H_kv)``
    selector_head : int in [0, H), the query head whose logits (with key head
        ``selector_head // (H / H_kv)``) build the accumulated mask F (default 0)
    protect_bos : bool, never mask position 0
    selective : bool, False gives standard causal attention
    budget : int or None, pruned attention: each query sees only what a ``budget``-slot KV cache
        still holds. Inference only: refused (ValueError) when an input requires grad in grad mode
    check_finite : bool, ValueError on NaN or infinity in an input (and in the gradient of the
        output, in backward)

    Returns
    -------
    out : (*batch, H, N, Dv) tensor of query's dtype, differentiable with respect to query, key,
        value (no budget). float32 runs the C kernels; float64 the listing in torch operations
        (differentiable twice: for ``gradcheck`` / ``gradgradcheck``)
    """
    _refuse_sdpa_options(attn_mask, dropout_p, is_causal)
    for x, name in ((query, "query"), (key, "key"), (value, "value")):
        _check_tensor(x, name)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must have one dtype, got {query.dtype}, "
                        f"{key.dtype}, {value.dtype}")
    _check_options(selector_head, protect_bos, selective, scale, budget)
    H, H_kv = _check_shapes(query, key, value, bool(enable_gqa))
    s = check_selector_head(selector_head, H)
    D, Dv = query.shape[-1], value.shape[-1]
    scale = resolve_scale(scale, D)
    if budget is not None and _wants_grad(query, key, value):
        raise ValueError(f"budget={budget!r}: pruned attention has no backward (an inference "
                         "feature); run it under torch.no_grad() or pass detached tensors, "
                         "and train with budget=None")
    batch, N = query.shape[:-3], query.shape[-2]
    q = query.reshape(-1, H, N, D)                                         # (B, H, N, D)
    k = key.reshape(-1, H_kv, N, D)                                        # (B, H_kv, N, D)
    v = value.reshape(-1, H_kv, N, Dv)                                     # (B, H_kv, N, Dv)
    if H_kv != H:       # SDPA's grouped-query layout: query head h reads kv head h // group
        k = k.repeat_interleave(H // H_kv, dim=1)                          # (B, H, N, D)
        v = v.repeat_interleave(H // H_kv, dim=1)                          # (B, H, N, Dv)
    width = max(D, Dv)  # zero columns change neither q . k nor P v beyond the padded columns
    if D < width:
        q, k = TF.pad(q, (0, width - D)), TF.pad(k, (0, width - D))        # (B, H, N, width)
    if Dv < width:
        v = TF.pad(v, (0, width - Dv))                                     # (B, H, N, width)
    options = dict(selector_head=s, protect_bos=bool(protect_bos), selective=bool(selective))
    if query.dtype == torch.float64:
        if check_finite and not torch.compiler.is_compiling():    # (C checks float32 itself)
            for x, name in ((query, "query"), (key, "key"), (value, "value")):
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(f"{name} contains NaN or infinity")
        if budget is None:
            out = listing_attention(q, k, v, scale=scale, **options)
        else:
            out = torch.from_numpy(_reference.forward(
                q.detach().numpy(), k.detach().numpy(), v.detach().numpy(), scale=scale,
                budget=budget, **options)[0])
    else:
        out = torch_ops.attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                  options["selector_head"], options["protect_bos"],
                                  options["selective"], scale, budget, bool(check_finite))[0]
    return out[..., :Dv].reshape(*batch, H, N, Dv)                         # (*batch, H, N, Dv)


# ----------------------------------------------------------------------------------------------
# Modules


def _check_options(selector_head, protect_bos, selective, scale, budget) -> None:
    if isinstance(selector_head, bool) or not isinstance(selector_head, (int, np.integer)):
        raise TypeError(f"selector_head must be an int, got {type(selector_head).__name__}")
    if selector_head < 0:
        raise ValueError(f"selector_head must be >= 0, got {selector_head}")
    for name, value in (("protect_bos", protect_bos), ("selective", selective)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if scale is not None:
        resolve_scale(scale, 1)                 # type and finiteness (D does not matter here)
    check_budget(budget, bool(protect_bos))


class SelectiveAttention(nn.Module):
    """``selective_attention`` as a module (no parameters): forward(query, key, value) -> out,
    shapes and SDPA arguments as ``selective_attention``'s.

    Parameters
    ----------
    selector_head, protect_bos, selective, scale, budget, check_finite : as in
        ``selective_attention`` (a budget makes the module inference only)
    """

    def __init__(self, *, selector_head: int = 0, protect_bos: bool = True,
                 selective: bool = True, scale: Optional[float] = None,
                 budget: Optional[int] = None, check_finite: bool = True):
        super().__init__()
        _check_options(selector_head, protect_bos, selective, scale, budget)
        self.selector_head, self.protect_bos, self.selective = int(selector_head), \
            bool(protect_bos), bool(selective)
        self.scale, self.budget, self.check_finite = scale, budget, bool(check_finite)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                is_causal: bool = True, enable_gqa: bool = False) -> torch.Tensor:
        """query (*batch, H, N, D), key (*batch, H_kv, N, D), value (*batch, H_kv, N, Dv) ->
        out (*batch, H, N, Dv); the SDPA arguments as ``selective_attention``'s."""
        return selective_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                   self.scale, enable_gqa, selector_head=self.selector_head,
                                   protect_bos=self.protect_bos, selective=self.selective,
                                   budget=self.budget, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return (f"selector_head={self.selector_head}, protect_bos={self.protect_bos}, "
                f"selective={self.selective}, scale={self.scale}, budget={self.budget}")


class SelectiveSelfAttention(nn.Module):
    """Causal multi-head self-attention with selective attention, for a GPT block:
    x (B, N, d_model) -> (B, N, d_model).

    ``qkv`` (an ``nn.Linear(d_model, 3 d_model)``) gives the columns [q | k | v], each with its
    heads side by side (the layout of ``selattn_lm.model``: column ``c`` of q belongs to
    head ``c // head_dim``); the heads' outputs, side by side, go through ``out``
    (``nn.Linear(d_model, d_model)``). The attention itself has no parameters: under
    ``DistributedDataParallel`` its q, k, v gradients flow into ``qkv``, which DDP all-reduces.

    Parameters
    ----------
    d_model : int, model width; n_heads : int, dividing d_model
    bias : bool, biases in both projections
    selector_head, protect_bos, selective, scale : as in ``selective_attention``
    """

    def __init__(self, d_model: int, n_heads: int, *, bias: bool = True, selector_head: int = 0,
                 protect_bos: bool = True, selective: bool = True,
                 scale: Optional[float] = None):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_heads", n_heads)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        _check_options(selector_head, protect_bos, selective, scale, None)
        check_selector_head(selector_head, n_heads)
        self.d_model, self.n_heads, self.head_dim = int(d_model), int(n_heads), \
            int(d_model) // int(n_heads)
        self.selector_head, self.protect_bos, self.selective = int(selector_head), \
            bool(protect_bos), bool(selective)
        self.scale = scale
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The qkv projection split into heads: x (B, N, d) -> q, k, v, each (B, H, N, hd)
        (strided views of one (B, N, 3d) tensor)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be a (B, N, {self.d_model}) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
        B, N, _ = x.shape
        qkv = self.qkv(x)                                                  # (B, N, 3d)
        qkv = qkv.view(B, N, 3, self.n_heads, self.head_dim)               # (B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # (B, H, N, hd) each
        return q, k, v

    def forward(self, x: torch.Tensor, *, budget: Optional[int] = None,
                cache: Optional["TorchKVCache"] = None, return_mask: bool = False):
        """Self-attention of x (B, N, d_model).

        Parameters
        ----------
        x : (B, N, d_model) float32 CPU tensor
        budget : int or None, pruned attention over the whole sequence (inference only)
        cache : TorchKVCache or None, decode through this cache instead: x are the next tokens
            after what it holds (N > 1: a prefill, N = 1: one step; inference only)
        return_mask : bool, also return the accumulated mask F (B, N, N), computed in torch by
            ``accumulated_mask`` so that a loss on it (the memory loss) has a gradient; zeros
            for a standard (non-selective) layer

        Returns
        -------
        y : (B, N, d_model), and F (B, N, N) when ``return_mask``
        """
        q, k, v = self.heads(x)                                            # (B, H, N, hd) each
        B, N = x.shape[0], x.shape[1]
        if cache is not None:
            if budget is not None:
                raise ValueError("pass either budget or cache: a cache has its own budget")
            if return_mask:
                raise ValueError("return_mask is for training; a cache decodes without F")
            o = cache(q, k, v)                                             # (B, H, N, hd)
        else:
            o = selective_attention(q, k, v, selector_head=self.selector_head,
                                    protect_bos=self.protect_bos, selective=self.selective,
                                    scale=self.scale, budget=budget)       # (B, H, N, hd)
        y = self.out(o.transpose(1, 2).reshape(B, N, self.d_model))        # (B, N, d)
        if not return_mask:
            return y
        if self.selective:
            F = accumulated_mask(q, k, selector_head=self.selector_head,
                                 protect_bos=self.protect_bos, scale=self.scale)  # (B, N, N)
        else:
            F = x.new_zeros(B, N, N)                                       # (B, N, N) baseline
        return y, F

    def new_cache(self, batch: int, budget: Optional[int] = None, *,
                  evict_threshold: Optional[float] = None) -> "TorchKVCache":
        """An empty ``TorchKVCache`` with this layer's heads and selector settings."""
        return TorchKVCache(batch, self.n_heads, self.head_dim, budget,
                            selector_head=self.selector_head, protect_bos=self.protect_bos,
                            selective=self.selective, scale=self.scale,
                            evict_threshold=evict_threshold)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, "
                f"selector_head={self.selector_head}, selective={self.selective}")


# ----------------------------------------------------------------------------------------------
# The pruned KV cache for torch tensors


class TorchKVCache:
    """``selattn_c.KVCache`` (one layer's pruned KV cache, C kernels) for torch tensors.

    Parameters
    ----------
    batch, heads, head_dim, budget, selector_head, protect_bos, selective, scale,
    evict_threshold : as in ``selattn_c.KVCache``

    Notes
    -----
    ``prefill`` (N tokens, the blocked kernel) and ``step`` (one token) give the same outputs as
    ``selective_attention(q, k, v, budget=budget)`` on the whole sequence (float32 rounding
    aside) and hold at most ``budget`` tokens. Decoding has no backward: inputs that require grad
    in grad mode are refused (use ``torch.no_grad()`` or ``torch.inference_mode()``). Inputs are
    checked like ``selective_attention``'s (CPU, float32; non-contiguous ones are copied).
    """

    def __init__(self, batch: int, heads: int, head_dim: int, budget: Optional[int] = None, *,
                 selector_head: int = 0, protect_bos: bool = True, selective: bool = True,
                 scale: Optional[float] = None, evict_threshold: Optional[float] = None):
        self.cache = KVCache(batch, heads, head_dim, budget, selector_head=selector_head,
                             protect_bos=protect_bos, selective=selective, scale=scale,
                             evict_threshold=evict_threshold)

    @staticmethod
    def _no_grad(q, k, v) -> None:
        if _wants_grad(q, k, v):
            raise ValueError("KV-cache decoding has no backward: run it under torch.no_grad() or "
                             "torch.inference_mode(), or pass detached tensors")

    def _inputs(self, q, k, v, ndim: int):
        self._no_grad(q, k, v)
        return [_array(_kernel_tensor(x, name, ndim), name)
                for x, name in ((q, "q"), (k, "k"), (v, "v"))]

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                check_finite: bool = True) -> torch.Tensor:
        """Attend from and keep N tokens: q, k, v (B, H, N, D) -> out (B, H, N, D)."""
        qa, ka, va = self._inputs(q, k, v, 4)
        return torch.from_numpy(self.cache.prefill(qa, ka, va, check_finite=check_finite))

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
             check_finite: bool = True) -> torch.Tensor:
        """Attend from and keep one token: q, k, v (B, H, D) -> out (B, H, D)."""
        qa, ka, va = self._inputs(q, k, v, 3)
        return torch.from_numpy(self.cache.step(qa, ka, va, check_finite=check_finite))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The next N tokens (B, H, N, D): one ``step`` when N = 1, else a ``prefill``."""
        if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[2] == 1:
            return self.step(q[:, :, 0], k[:, :, 0], v[:, :, 0])[:, :, None]  # (B, H, 1, D)
        return self.prefill(q, k, v)

    @property
    def length(self) -> int:
        """Tokens seen since the last reset (the next token's position)."""
        return self.cache.length

    @property
    def size(self) -> torch.Tensor:
        """(B,) int64: tokens each batch element holds."""
        return torch.from_numpy(self.cache.size)

    @property
    def evictions(self) -> torch.Tensor:
        """(B,) int64: tokens evicted so far."""
        return torch.from_numpy(self.cache.evictions)

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the cache holds."""
        return self.cache.nbytes

    def reset(self) -> None:
        """Forget every token (the memory is kept)."""
        self.cache.reset()

    def close(self) -> None:
        """Free the cache's memory."""
        self.cache.close()

    def __enter__(self) -> "TorchKVCache":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __repr__(self) -> str:
        return f"TorchKVCache({self.cache!r})"
