"""The tiny LM's attention backends, in one place: ``NumpyAttention`` (the NumPy reference,
dtype-generic, with the rank penalty of pruning-aware training), ``CAttention`` (the C
kernels, float32) and ``make_attention`` (the chooser behind ``--backend auto|c|numpy``).

Both backends have the same interface: ``forward(q, k, v, *, selective, selector_head,
need_F, budget, soft_budget, soft_strength) -> (out, F, ctx)`` and ``backward(dout, dF,
ctx) -> (dq, dk, dv)``.

``CAttention`` adds the memory loss (``memory_loss``, ``memory_loss_backward``), which
``selattn_lm.model.forward`` then asks the backend for instead of reading F. Nothing there holds
an N x N buffer in training: the forward and the backward run in C in O(N) memory per head, the
memory loss comes from the kernels' row sums of F (``selattn_c.memory_loss``), and its gradient,
one row of F per batch element, goes into the C backward (``selattn_c.backward(...,
dF_rows=, dF_row_index=)``), which carries it through F into the selector head inside its tiles
(docs/kernel-design.md). The rank penalty of pruning-aware training (``soft_budget``) runs in
the kernels too, row by row. F itself is materialised only when a caller asks for it
(``need_F``: plots, inspection).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from selattn_reference.attention import DEFAULT_SOFT_STRENGTH
from selattn_reference.attention import backward as attention_backward_reference
from selattn_reference.attention import forward as attention_forward_reference
from selattn_reference.validation import check_like

from selattn_c import Context, accumulated_mask, backward, forward
from selattn_c.memory import DFRows, memory_loss, memory_loss_backward


class NumpyAttention:
    """Attention backend on the NumPy reference (``selattn_reference.forward``/``backward``).

    Slow (it keeps (B, H, N, N) logits and weights) but dtype-generic: the backend of the
    float64 gradient checks, and of training when the C extension is not built.
    """

    def forward(self, q, k, v, *, selective: bool, selector_head: int, need_F: bool,
                budget: Optional[int] = None, soft_budget: Optional[int] = None,
                soft_strength: float = DEFAULT_SOFT_STRENGTH):
        """Selective attention of q, k, v (B, H, N, hd), BOS protected; ``soft_budget`` adds the
        rank penalty of pruning-aware training (``selattn_reference.attention.rank_penalty``).

        Returns
        -------
        out : (B, H, N, hd)
        F : (B, N, N) accumulated mask when ``need_F`` (else None)
        ctx : what ``backward`` needs
        """
        out, cache = attention_forward_reference(q, k, v, selector_head=selector_head,
                                                 selective=selective, budget=budget,
                                                 soft_budget=soft_budget,
                                                 soft_strength=soft_strength)
        return out, (cache.F if need_F else None), cache

    def backward(self, dout, dF, ctx):
        """Gradients (dq, dk, dv) of ``forward``; ``dF`` (B, N, N) or None is an extra upstream
        gradient on F (the memory loss)."""
        if ctx.budget is not None:
            raise ValueError(f"backward through a budgeted forward (budget={ctx.budget}) is not "
                             "supported: budgets are for inference; train with budgets=None")
        return attention_backward_reference(dout, ctx, dF=dF)


PROTECT_BOS = True   # the model always protects BOS (position 0 is never masked)


class CAttention:
    """Attention backend of the tiny LM on the C kernels: float32 in, float32 out, BOS protected.

    The interface is ``selattn_lm.backends.NumpyAttention``'s; the two agree within float32
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


# ----------------------------------------------------------------------------------------------
# The backend chooser of the command line and the training loops


BACKENDS = ("auto", "c", "numpy")


def make_attention(backend: str = "auto"):
    """The attention backend: ``'c'`` (``CAttention``), ``'numpy'`` (``NumpyAttention``, the
    reference) or ``'auto'`` (C when the extension is built, else NumPy: a pure-Python install
    still trains). Returns (attention object, name)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend in ("auto", "c"):
        import selattn_c
        if selattn_c.extension_built():
            return CAttention(), "c"
        if backend == "c":
            raise ValueError("backend 'c' needs the compiled extension, which is not installed "
                             f"({selattn_c.extension_reason()}); use --backend numpy or auto")
    return NumpyAttention(), "numpy"
