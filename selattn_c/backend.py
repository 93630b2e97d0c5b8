"""``CAttention``: the tiny LM's attention backend on the C kernels (float32).

It has the interface of ``selattn_reference.model.NumpyAttention``, plus the memory loss
(``memory_loss``, ``memory_loss_backward``), which ``selattn_reference.model.forward`` then asks
the backend for instead of reading F. Nothing here holds an N x N buffer in training: the
forward and the backward run in C in O(N) memory per head, the memory loss comes from the
kernels' row sums of F (``selattn_c.memory_loss``), and its gradient, one row of F per batch
element, goes into the C backward (``selattn_c.backward(..., dF_rows=, dF_row_index=)``), which
carries it through F into the selector head inside its tiles (docs/kernel-design.md). The rank
penalty of pruning-aware training (``soft_budget``) runs in the kernels too, row by row. F itself
is materialised only when a caller asks for it (``need_F``: plots, inspection).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from selattn_reference.attention import DEFAULT_SOFT_STRENGTH
from selattn_reference.validation import check_like

from . import Context, accumulated_mask, backward, forward
from .memory import DFRows, memory_loss, memory_loss_backward

PROTECT_BOS = True   # the model always protects BOS (position 0 is never masked)


class CAttention:
    """Attention backend of the tiny LM on the C kernels: float32 in, float32 out, BOS protected.

    The interface is ``selattn_reference.model.NumpyAttention``'s; the two agree within float32
    rounding (tests/test_model_backend.py). With a ``budget`` the forward is the kernels' pruned
    prefill and ``backward`` refuses it (pruning is an inference feature): the context is the
    kernels' own ``Context``, which ``selattn_c.backward`` checks.
    """

    def forward(self, q, k, v, *, selective: bool, selector_head: int, need_F: bool,
                budget: Optional[int] = None, soft_budget: Optional[int] = None,
                soft_strength: Optional[float] = None):
        """Selective attention of q, k, v (B, H, N, hd); ``soft_budget`` adds the rank penalty
        of pruning-aware training (``selattn_c.forward(..., soft_budget=)``), ``soft_strength``
        None its default slope.

        Returns
        -------
        out : (B, H, N, hd) float32
        F : (B, N, N) float32 accumulated mask when ``need_F`` (zeros when not selective),
            else None
        ctx : Context for ``backward`` (that of ``selattn_c.forward``)
        """
        if soft_strength is None:
            soft_strength = DEFAULT_SOFT_STRENGTH
        out, ctx = forward(q, k, v, selector_head=selector_head, protect_bos=PROTECT_BOS,
                           selective=selective, budget=budget, soft_budget=soft_budget,
                           soft_strength=soft_strength)
        F = None
        if need_F:
            B, H, N, D = ctx.q.shape
            if selective:
                F = accumulated_mask(ctx.q, ctx.k, selector_head=ctx.selector_head,
                                     protect_bos=PROTECT_BOS, scale=ctx.scale)  # (B, N, N)
            else:
                F = np.zeros((B, N, N), dtype=np.float32)                       # baseline
        return out, F, ctx

    def memory_loss(self, ctx: Context, tau: float, ignore_rows: Optional[np.ndarray] = None
                    ) -> Tuple[np.ndarray, tuple]:
        """The memory loss of one layer from its context, without F (``selattn_c.memory_loss``).

        Parameters
        ----------
        ctx : Context of ``forward``
        tau : float > 0
        ignore_rows : (B, N) bool or None, rows counted as fully evicted (the model's PAD rows)

        Returns
        -------
        mem : (B,) float32
        state : what ``memory_loss_backward`` needs (the argmax rows, not F)
        """
        mem, row = memory_loss(ctx, tau, ignore_rows=ignore_rows, return_row=True)
        return mem, (ctx, tau, ignore_rows, row)

    def memory_loss_backward(self, dmem, state: tuple) -> DFRows:
        """Gradient of ``memory_loss`` on F as rows (B, 1, N), for ``backward``'s ``dF``;
        ``dmem`` is a float (the same for every batch element) or (B,)."""
        ctx, tau, ignore_rows, row = state
        dmem = np.broadcast_to(np.asarray(dmem, dtype=np.float64), row.shape)     # (B,)
        return memory_loss_backward(dmem, ctx, tau, row=row, ignore_rows=ignore_rows)

    def backward(self, dout, dF, ctx: Context):
        """Gradients (dq, dk, dv), float32 (B, H, N, hd), of ``forward``. ``dF`` is None or an
        extra upstream gradient on F: ``DFRows`` (``memory_loss_backward``: a few rows of F), or
        a dense (B, N, N) array (then handed to the kernels as its N rows; it is N x N already).
        Not selective: F is the constant 0 and dF contributes nothing."""
        if dF is None:
            return backward(dout, ctx)     # checks ctx, refuses a budget  (B, H, N, hd) each
        if isinstance(dF, DFRows):
            return backward(dout, ctx, dF_rows=dF.rows, dF_row_index=dF.index)
        if not isinstance(ctx, Context):
            return backward(dout, ctx)     # backward's own TypeError
        B, H, N, D = ctx.q.shape
        dF = check_like(dF, "dF", (B, N, N))
        index = np.broadcast_to(np.arange(N, dtype=np.int64), (B, N))         # every row
        return backward(dout, ctx, dF_rows=dF, dF_row_index=index)
