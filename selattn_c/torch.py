"""selattn_c.torch: selective attention for PyTorch, on the C kernels (CPU, float32).

Optional: ``pip install '.[torch]'``. Nothing else in selattn_c imports this module.

- ``selective_attention(q, k, v, ...)``: a function beside
  ``torch.nn.functional.scaled_dot_product_attention`` (always causal), differentiable through
  ``SelectiveAttentionFunction`` (a ``torch.autograd.Function`` over ``selattn_c.forward`` and
  ``selattn_c.backward``); with ``selective=False`` it computes what
  ``scaled_dot_product_attention(q, k, v, is_causal=True)`` computes.
- ``SelectiveAttention``: that function as an ``nn.Module`` (no parameters).
- ``SelectiveSelfAttention``: causal multi-head self-attention with qkv and output projections,
  x (B, N, d) -> (B, N, d), to put into a GPT block.
- ``TorchKVCache``: ``selattn_c.KVCache`` (the pruned KV cache) for torch tensors: ``prefill`` and
  ``step`` for token-by-token generation.
- ``accumulated_mask`` and ``memory_loss``: the mask F and the paper's memory loss in plain torch
  operations, differentiable by autograd (O(B N^2) memory: for the memory loss of small models).

What the kernels take, and what happens to other input (docs/torch.md):

- CPU tensors only: a CUDA (or any other device) tensor is a ``ValueError`` that names the
  argument and says to pass ``x.cpu()``.
- float32 only: float64, float16 and bfloat16 are refused with a ``TypeError`` saying to convert
  with ``x.float()``. They are not cast silently, because the kernels compute in float32: a
  float64 caller (a gradient check, say) would otherwise get float32 accuracy without noticing.
- Any strides: a non-contiguous tensor is copied to a contiguous one first (one copy of that
  input); a contiguous float32 CPU tensor is handed to C without a copy (``tensor.numpy()``
  shares its memory), and the results are tensors over the kernels' output arrays (no copy).
- ``budget`` (pruned attention) is inference only: with a budget, an input that requires grad
  while grad mode is on is a ``ValueError`` (run under ``torch.no_grad()`` or detach).
- Shapes: q, k, v must be (B, H, N, D) of one shape (``ValueError`` naming the argument).
- NaN or infinity in an input raise ``ValueError`` unless ``check_finite=False``.

Saved tensors: the forward saves q, k, v, the output and its row statistics for the backward
with ``save_for_backward``, so modifying q, k, v or the output in place before ``backward`` is the
usual autograd error, not a wrong gradient. A second derivative (``create_graph=True``) is
refused (``once_differentiable``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

import selattn_c
from . import Context, KVCache
from selattn_reference.validation import (
    check_budget,
    check_selector_head,
    check_tau,
    resolve_scale,
)

__all__ = [
    "SelectiveAttention",
    "SelectiveAttentionFunction",
    "SelectiveSelfAttention",
    "TorchKVCache",
    "accumulated_mask",
    "memory_loss",
    "selective_attention",
]


# ----------------------------------------------------------------------------------------------
# Tensors in, arrays for the kernels


def _kernel_tensor(x, name: str, ndim: int) -> torch.Tensor:
    """``x`` checked (a dense CPU float32 tensor of ``ndim`` dimensions) and made contiguous:
    ``x`` itself (detached) when it already is, else a contiguous copy."""
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
        raise TypeError(f"{name}: cannot read the tensor's data as an array ({exc}); the bridge "
                        "needs a real CPU tensor (it is not traceable by torch.compile, vmap or "
                        "functorch transforms)") from None


def _qkv_tensors(q, k, v) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as contiguous CPU float32 (B, H, N, D) tensors of one shape."""
    tensors = [_kernel_tensor(x, name, 4) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    shape = tensors[0].shape
    for name, x in zip("kv", tensors[1:]):
        if x.shape != shape:
            raise ValueError(f"shape mismatch: q is {tuple(shape)} but {name} is "
                             f"{tuple(x.shape)}; q, k and v must all be (B, H, N, D)")
    return tensors[0], tensors[1], tensors[2]


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in tensors)


def _kernel_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, selector_head: int,
                    protect_bos: bool, selective: bool, scale: Optional[float],
                    budget: Optional[int], check_finite: bool
                    ) -> Tuple[torch.Tensor, Context]:
    """``selattn_c.forward`` on contiguous float32 tensors: (out tensor, the kernels' Context)."""
    out, ctx = selattn_c.forward(_array(q, "q"), _array(k, "k"), _array(v, "v"),
                                 selector_head=selector_head, protect_bos=protect_bos,
                                 selective=selective, scale=scale, budget=budget,
                                 check_finite=check_finite)
    return torch.from_numpy(out), ctx                                      # (B, H, N, D)


# ----------------------------------------------------------------------------------------------
# The autograd Function and the functional form


class SelectiveAttentionFunction(torch.autograd.Function):
    """Selective attention with autograd: the C forward and backward (``selattn_c``).

    ``apply(q, k, v, selector_head, protect_bos, selective, scale, check_finite)`` with q, k, v
    (B, H, N, D) float32 CPU tensors; returns out (B, H, N, D) float32. Use
    ``selective_attention`` instead of calling this directly: it checks the arguments and skips
    the graph when nothing needs a gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, selector_head: int, protect_bos: bool, selective: bool,
                scale: Optional[float], check_finite: bool):
        qc, kc, vc = _qkv_tensors(q, k, v)
        out, sctx = _kernel_forward(qc, kc, vc, selector_head=selector_head,
                                    protect_bos=protect_bos, selective=selective, scale=scale,
                                    budget=None, check_finite=check_finite)
        # The Context's arrays are views of qc, kc, vc (no copy for contiguous inputs): saving
        # the tensors lets autograd catch an in-place change before backward, and frees them
        # after it. lse and fstart are saved as tensors for the same reason (freed with the graph).
        lse = torch.from_numpy(sctx.lse)                                   # (B, H, N)
        fstart = None if sctx.fstart is None else torch.from_numpy(sctx.fstart)
        ctx.save_for_backward(qc, kc, vc, out, lse, fstart)
        ctx.options = (sctx.scale, sctx.selector_head, sctx.protect_bos, sctx.selective,
                       sctx.dead_key_threshold)
        ctx.check_finite = check_finite
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, fstart = ctx.saved_tensors
        scale, selector_head, protect_bos, selective, dead_t = ctx.options
        sctx = Context(q=q.numpy(), k=k.numpy(), v=v.numpy(), out=out.numpy(), lse=lse.numpy(),
                       scale=scale, selector_head=selector_head, protect_bos=protect_bos,
                       selective=selective, budget=None,
                       fstart=None if fstart is None else fstart.numpy(),
                       dead_key_threshold=dead_t)
        # dout may be expanded (stride 0, e.g. from out.sum()) or of another layout: C order
        d = dout.detach().to(torch.float32).contiguous()                   # (B, H, N, D)
        dq, dk, dv = selattn_c.backward(_array(d, "dout"), sctx, check_finite=ctx.check_finite)
        return (torch.from_numpy(dq), torch.from_numpy(dk), torch.from_numpy(dv),
                None, None, None, None, None)


def selective_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        selector_head: int = 0, protect_bos: bool = True,
                        selective: bool = True, scale: Optional[float] = None,
                        budget: Optional[int] = None, check_finite: bool = True) -> torch.Tensor:
    """Causal selective attention (Leviathan et al. 2024) of CPU float32 tensors, on the C kernels.

    Used like ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)``
    (which is what ``selective=False`` computes), with autograd.

    Parameters
    ----------
    q, k, v : (B, H, N, D) float32 CPU tensors of one shape, any strides (non-contiguous ones are
        copied; contiguous ones are read in place)
    selector_head : int, the head whose logits build the accumulated mask F (default 0)
    protect_bos : bool, never mask position 0
    selective : bool, False gives standard causal attention
    scale : float or None, logit scale (default ``1/sqrt(D)``)
    budget : int or None, pruned attention: each query sees only what a ``budget``-slot KV cache
        still holds. Inference only: refused (ValueError) when an input requires grad in grad mode
    check_finite : bool, ValueError on NaN or infinity in an input (and in the gradient of the
        output, in backward)

    Returns
    -------
    out : (B, H, N, D) float32 CPU tensor, differentiable with respect to q, k, v when they
        require grad (no budget)
    """
    if budget is not None:
        if _wants_grad(q, k, v):
            raise ValueError(f"budget={budget!r}: pruned attention has no backward (an inference "
                             "feature); run it under torch.no_grad() or pass detached tensors, "
                             "and train with budget=None")
        qc, kc, vc = _qkv_tensors(q, k, v)
        return _kernel_forward(qc, kc, vc, selector_head=selector_head, protect_bos=protect_bos,
                               selective=selective, scale=scale, budget=budget,
                               check_finite=check_finite)[0]
    if not _wants_grad(q, k, v):     # no graph: nothing is saved for a backward
        qc, kc, vc = _qkv_tensors(q, k, v)
        return _kernel_forward(qc, kc, vc, selector_head=selector_head, protect_bos=protect_bos,
                               selective=selective, scale=scale, budget=None,
                               check_finite=check_finite)[0]
    return SelectiveAttentionFunction.apply(q, k, v, selector_head, protect_bos, selective, scale,
                                            check_finite)


# ----------------------------------------------------------------------------------------------
# The accumulated mask and the memory loss in torch (autograd)


def accumulated_mask(q: torch.Tensor, k: torch.Tensor, *, selector_head: int = 0,
                     protect_bos: bool = True, scale: Optional[float] = None) -> torch.Tensor:
    """The accumulated mask ``F[b, i, j] = sum_{m < i} relu(L_sel[b, m, j])`` (over the allowed
    entries: j < m, and j > 0 with BOS protected) in plain torch operations, so autograd
    differentiates a loss on F into the selector head's q and k. Any float dtype and device.

    It materialises (B, N, N): meant for the memory loss of small models, where the kernels
    (which never hold F) cannot hand F's gradient back. ``selattn_c.accumulated_mask`` computes
    the same values without autograd.

    Parameters
    ----------
    q, k : (B, H, N, D) tensors
    selector_head, protect_bos, scale : as in ``selective_attention``

    Returns
    -------
    F : (B, N, N) tensor of q's dtype
    """
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating (B, H, N, D) torch.Tensor")
    if q.shape != k.shape:
        raise ValueError(f"shape mismatch: q is {tuple(q.shape)} but k is {tuple(k.shape)}")
    B, H, N, D = q.shape
    s = check_selector_head(selector_head, H)
    scale = resolve_scale(scale, D)
    L_sel = scale * (q[:, s] @ k[:, s].transpose(-1, -2))                  # (B, N, N)
    allowed = torch.ones(N, N, dtype=torch.bool, device=q.device).tril(-1)  # (N, N) j < m
    if protect_bos:
        allowed[:, 0] = False                                              # BOS never masked
    S = torch.where(allowed, torch.relu(L_sel), torch.zeros((), dtype=q.dtype, device=q.device))
    # F[:, i] = sum_{m < i} S[:, m]: the cumulative sum over queries, shifted one query down
    zero_row = S.new_zeros(B, 1, N)                                        # (B, 1, N)
    return torch.cat([zero_row, torch.cumsum(S, dim=1)[:, :-1]], dim=1)    # (B, N, N)


def memory_loss(F: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """The paper's memory loss of one layer, per batch element, as
    ``selattn_reference.memory_loss``: ``max_i sum_{j <= i} (1 - min(F[i, j], tau) / tau)``.

    The gradient flows into the row attaining the max (the first, on ties) and only where
    ``F < tau``, as the reference's ``memory_loss_backward``.

    Parameters
    ----------
    F : (B, N, N) tensor, the accumulated mask
    tau : float > 0

    Returns
    -------
    mem : (B,) tensor
    """
    if not isinstance(F, torch.Tensor) or F.dim() != 3 or F.shape[1] != F.shape[2]:
        raise ValueError("F must be a (B, N, N) torch.Tensor")
    tau = check_tau(tau)
    N = F.shape[-1]
    causal = torch.ones(N, N, dtype=torch.bool, device=F.device).tril()    # (N, N) j <= i
    # where(F < tau, F, tau) rather than clamp: at F == tau exactly the reference's gradient is 0
    kept = torch.where(causal, 1.0 - torch.where(F < tau, F, F.new_tensor(tau)) / tau,
                       F.new_zeros(()))                                    # (B, N, N)
    rows = kept.sum(dim=-1)                                                # (B, N)
    first_max = rows.argmax(dim=-1, keepdim=True)                          # (B, 1) first on ties
    return rows.gather(-1, first_max)[:, 0]                                # (B,)


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
    """``selective_attention`` as a module (no parameters): forward(q, k, v) -> out, all
    (B, H, N, D) float32 CPU tensors.

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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, N, D) -> out (B, H, N, D)."""
        return selective_attention(q, k, v, selector_head=self.selector_head,
                                   protect_bos=self.protect_bos, selective=self.selective,
                                   scale=self.scale, budget=self.budget,
                                   check_finite=self.check_finite)

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
