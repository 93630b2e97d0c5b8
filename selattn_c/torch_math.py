"""Selective attention in plain torch operations, differentiable (twice) by autograd.

Part of the PyTorch bridge (``selattn_c.torch``). These functions materialise (B, N, N) or
(B, H, N, N) tensors, so they are for small inputs: the memory loss of small models
(``accumulated_mask``, ``memory_loss``) and double precision (``listing_attention``, the paper's
listing, which ``selattn_c.torch.selective_attention`` runs for float64 inputs so that
``torch.autograd.gradcheck`` and ``gradgradcheck`` work; the C kernels compute in float32).
Any float dtype and device.
"""

from __future__ import annotations

from typing import Optional

import torch

from selattn_reference.validation import check_selector_head, check_tau, resolve_scale

__all__ = ["accumulated_mask", "listing_attention", "memory_loss"]


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




def listing_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, selector_head: int,
                      protect_bos: bool, selective: bool, scale: float) -> torch.Tensor:
    """Causal selective attention as the paper's listing, in torch operations:
    ``softmax(scale q k^T - F, causal) v`` with F from ``accumulated_mask``.

    Autograd differentiates it to any order (relu's kink aside), so a gradient check runs on it.
    Its values match ``selattn_reference.forward`` (tests: float64, to rounding).

    Parameters
    ----------
    q, k : (B, H, N, D) tensors of one float dtype; v : (B, H, N, Dv)
    selector_head, protect_bos, selective : as in ``selective_attention``
    scale : float, the logit scale (already resolved)

    Returns
    -------
    out : (B, H, N, Dv)
    """
    N = q.shape[-2]
    L = scale * (q @ k.transpose(-1, -2))                                  # (B, H, N, N)
    if selective:
        F = accumulated_mask(q, k, selector_head=selector_head, protect_bos=protect_bos,
                             scale=scale)                                  # (B, N, N)
        L = L - F[:, None]                                                 # (B, H, N, N)
    causal = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()    # (N, N) j <= i
    L = L.masked_fill(~causal, float("-inf"))
    return torch.softmax(L, dim=-1) @ v                                    # (B, H, N, Dv)
