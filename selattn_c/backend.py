"""``CAttention``: the tiny LM's attention backend on the C kernels (float32).

It has the interface of ``selattn_reference.model.NumpyAttention``. The forward and the backward
run in C without any N x N buffer; F, when the memory loss needs it, comes from
``selattn_c.accumulated_mask``. ``selattn_c.backward`` has no input for an extra gradient on F,
so the memory loss' gradient goes through F into the selector head in NumPy here:

    F[i, j] = sum_{m < i} S[m, j]          ->  dS[m, j] = sum_{i > m} dF[i, j]
    S = relu(L_sel) where allowed           ->  dS = 0 where S was constrained or L_sel <= 0
    L_sel = scale * q_sel @ k_sel^T         ->  dq_sel += scale * dS @ k_sel,
                                                dk_sel += scale * dS^T @ q_sel

(``selattn_reference.attention.accumulated_mask_backward``, the reference backward's own steps,
§ 7 of docs/selective-attention.md). This part costs
O(B N^2 D) for the selector head only, once per layer.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from selattn_reference.attention import accumulated_mask_backward
from selattn_reference.validation import check_like

from . import Context, accumulated_mask, backward, forward

PROTECT_BOS = True   # the model always protects BOS (position 0 is never masked)


def mask_gradient(dF: np.ndarray, q_sel: np.ndarray, k_sel: np.ndarray, scale: float,
                  protect_bos: bool = PROTECT_BOS) -> Tuple[np.ndarray, np.ndarray]:
    """Gradient of a loss on F with respect to the selector head's q and k.

    Parameters
    ----------
    dF : (B, N, N) upstream gradient on the accumulated mask F
    q_sel, k_sel : (B, N, D) the selector head's queries and keys (as the forward saw them)
    scale : float, the logit scale of the forward
    protect_bos : bool, as in the forward

    Returns
    -------
    dq_sel, dk_sel : (B, N, D)
    """
    L_sel = scale * (q_sel @ k_sel.swapaxes(-1, -2))                       # (B, N, N)
    dS = accumulated_mask_backward(dF, L_sel, protect_bos).astype(q_sel.dtype, copy=False)
    dq_sel = scale * (dS @ k_sel)                                          # (B, N, D)
    dk_sel = scale * (dS.swapaxes(-1, -2) @ q_sel)                         # (B, N, D)
    return dq_sel, dk_sel


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
        """Selective attention of q, k, v (B, H, N, hd). The rank penalty of pruning-aware
        training (``soft_budget``) is not in the kernels: ``NumpyAttention`` has it.

        Returns
        -------
        out : (B, H, N, hd) float32
        F : (B, N, N) float32 accumulated mask when ``need_F`` (zeros when not selective),
            else None
        ctx : Context for ``backward`` (that of ``selattn_c.forward``)
        """
        if soft_budget is not None:
            raise ValueError("the C kernels have no rank penalty (soft_budget): use "
                             "NumpyAttention for pruning-aware training steps")
        out, ctx = forward(q, k, v, selector_head=selector_head, protect_bos=PROTECT_BOS,
                           selective=selective, budget=budget)
        F = None
        if need_F:
            B, H, N, D = ctx.q.shape
            if selective:
                F = accumulated_mask(ctx.q, ctx.k, selector_head=ctx.selector_head,
                                     protect_bos=PROTECT_BOS, scale=ctx.scale)  # (B, N, N)
            else:
                F = np.zeros((B, N, N), dtype=np.float32)                       # baseline
        return out, F, ctx

    def backward(self, dout, dF, ctx: Context):
        """Gradients (dq, dk, dv), float32 (B, H, N, hd), of ``forward``; ``dF`` (B, N, N) or
        None is an extra upstream gradient on F (the memory loss)."""
        dq, dk, dv = backward(dout, ctx)   # checks ctx, refuses a budget  (B, H, N, hd) each
        B, H, N, D = ctx.q.shape
        if dF is not None:
            dF = check_like(dF, "dF", (B, N, N))
            if ctx.selective:     # not selective: F is a constant zero, dF contributes nothing
                s = ctx.selector_head
                dq_sel, dk_sel = mask_gradient(dF.astype(np.float32, copy=False), ctx.q[:, s],
                                               ctx.k[:, s], ctx.scale, ctx.protect_bos)
                dq[:, s] += dq_sel
                dk[:, s] += dk_sel
        return dq, dk, dv
