"""The C kernels as PyTorch operators: ``torch.ops.selattn.attention`` and
``torch.ops.selattn.attention_backward`` (``torch.library.custom_op``).

Part of the PyTorch bridge (``selattn_c.torch``, which checks the arguments and calls these).
Registered as custom operators, with a fake (meta) implementation that gives the output shapes
without running C, and with autograd (the forward's backward is the second operator), so that
``torch.compile(fullgraph=True)`` traces through them as single nodes instead of into cffi, and
autograd saves exactly what the C backward needs.

Both take contiguous (B, H, N, D) float32 CPU tensors (the caller makes them so); the scale is
already resolved (a float). The backward operator has no autograd of its own: a second
derivative of the float32 path is refused (float64 runs ``torch_math.listing_attention``
instead, which has one).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

import selattn_c
from . import Context
from .checks import fstart_shape

__all__ = ["attention", "attention_backward"]

Tensor = torch.Tensor


def _array(x: Tensor, name: str):
    """A NumPy view of the CPU float32 tensor ``x`` (no copy when contiguous)."""
    return x.detach().contiguous().numpy()


def _fstart_or_empty(fstart, like: Tensor) -> Tensor:
    # An operator returns tensors only: no kept mask rows is a (0,) tensor
    return like.new_empty(0) if fstart is None else torch.from_numpy(fstart)


@torch.library.custom_op("selattn::attention", mutates_args=(), device_types="cpu")
def attention(q: Tensor, k: Tensor, v: Tensor, selector_head: int, protect_bos: bool,
              selective: bool, scale: float, budget: Optional[int],
              check_finite: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``selattn_c.forward``: q, k, v (B, H, N, D) float32 -> out (B, H, N, D), lse (B, H, N),
    fstart ((B, ceil(N / 64), N), or (0,) when the forward keeps none)."""
    out, ctx = selattn_c.forward(_array(q, "q"), _array(k, "k"), _array(v, "v"),
                                 selector_head=selector_head, protect_bos=protect_bos,
                                 selective=selective, scale=scale, budget=budget,
                                 check_finite=check_finite,
                                 # exact: the saved fstart must hold F on every tile, as the
                                 # backward below (a Context without skipping) reads it
                                 dead_key_threshold=None)
    return torch.from_numpy(out), torch.from_numpy(ctx.lse), _fstart_or_empty(ctx.fstart, q)


@attention.register_fake
def _attention_fake(q, k, v, selector_head, protect_bos, selective, scale, budget, check_finite):
    B, H, N, _ = q.shape
    shape = fstart_shape(B, N) if (selective and budget is None) else None
    return (q.new_empty(q.shape), q.new_empty((B, H, N)),
            q.new_empty(shape if shape is not None else (0,)))


@torch.library.custom_op("selattn::attention_backward", mutates_args=(), device_types="cpu")
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       fstart: Tensor, selector_head: int, protect_bos: bool, selective: bool,
                       scale: float, check_finite: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``selattn_c.backward``: dout (B, H, N, D) and what ``attention`` saved -> dq, dk, dv."""
    sctx = Context(q=_array(q, "q"), k=_array(k, "k"), v=_array(v, "v"), out=_array(out, "out"),
                   lse=_array(lse, "lse"), scale=scale, selector_head=selector_head,
                   protect_bos=protect_bos, selective=selective, budget=None,
                   fstart=_array(fstart, "fstart") if fstart.numel() else None)
    # dout may be expanded (stride 0, e.g. from out.sum()) or of another dtype: C order float32
    d = dout.detach().to(torch.float32).contiguous()                       # (B, H, N, D)
    dq, dk, dv = selattn_c.backward(d.numpy(), sctx, check_finite=check_finite)
    return torch.from_numpy(dq), torch.from_numpy(dk), torch.from_numpy(dv)


@attention_backward.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, fstart, selector_head, protect_bos,
                             selective, scale, check_finite):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, selector_head, protect_bos, selective, scale, budget, check_finite = inputs
    out, lse, fstart = output
    ctx.save_for_backward(q, k, v, out, lse, fstart)
    ctx.options = (selector_head, protect_bos, selective, scale, check_finite)
    ctx.budget = budget
    ctx.mark_non_differentiable(lse, fstart)


def _backward(ctx, dout, _dlse, _dfstart):
    if ctx.budget is not None:          # selective_attention refuses this before the forward
        raise RuntimeError("pruned attention (budget) has no backward")
    q, k, v, out, lse, fstart = ctx.saved_tensors
    selector_head, protect_bos, selective, scale, check_finite = ctx.options
    if dout is None:
        return (None,) * 9
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, fstart, selector_head, protect_bos,
                                    selective, scale, check_finite)
    return dq, dk, dv, None, None, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)
