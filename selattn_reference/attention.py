"""Selective attention in NumPy: the executable spec.

Leviathan, Kalman, Matias, "Selective Attention Improves Transformer" (arXiv 2410.02703).
Every other implementation in this project (the C kernel, its KV cache) is tested against this file.
It is written to be read next to ``docs/selective-attention.md``; the ``§`` marks point there.

Shapes: q, k, v, out are (B, H, N, D): batch, heads, tokens, head size. Positions are 0-based and
position 0 is BOS. Logit matrices are (B, H, N, N) with queries on axis -2 and keys on axis -1;
the accumulated mask F is (B, N, N) and is shared by all heads.

Layer style (CS231n): ``forward(...) -> (out, cache)`` and ``backward(dout, cache) -> grads``.
The code is dtype-generic: float64 for checking, float32 works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .validation import (
    check_budget,
    check_like,
    check_mask,
    check_qkv,
    check_selector_head,
    check_strength,
    check_tau,
    check_threshold,
    resolve_scale,
)


@dataclass
class Cache:
    """What ``backward`` needs from ``forward`` (this is the slow clear path: it keeps N x N)."""

    q: np.ndarray        # (B, H, N, D)
    k: np.ndarray        # (B, H, N, D)
    v: np.ndarray        # (B, H, N, D)
    L: np.ndarray        # (B, H, N, N) scaled logits, -inf above the diagonal
    F: np.ndarray        # (B, N, N)    accumulated mask (zeros when selective=False)
    visible: np.ndarray  # (B, N, N)    bool: which keys each query attends to
    P: np.ndarray        # (B, H, N, N) attention weights
    scale: float
    selector_head: int
    protect_bos: bool
    selective: bool
    budget: Optional[int]
    soft_cut: Optional[np.ndarray] = None  # (B, N) the rank penalty's cuts (§ 10), or None
    soft_strength: float = 0.0


# ----------------------------------------------------------------------------------------------
# The selection mask S and the accumulated mask F


def selection_constraints(N: int, protect_bos: bool) -> np.ndarray:
    """(N, N) bool: where S may be non-zero. Strictly below the diagonal (a token never masks
    itself, nor a future token), and never column 0 when BOS is protected.  § 3"""
    allowed = np.tri(N, k=-1, dtype=bool)                # (N, N) j < i
    if protect_bos:
        allowed[:, 0] = False                            # BOS is never masked
    return allowed


def accumulated_mask_from_logits(L_sel: np.ndarray, protect_bos: bool) -> np.ndarray:
    """F from the selector head's scaled logits ``L_sel`` (B, N, N).  §§ 2-4"""
    N = L_sel.shape[-1]
    S = np.maximum(L_sel, 0.0)                                      # (B, N, N) relu     § 2
    S = np.where(selection_constraints(N, protect_bos), S, 0.0)     # (B, N, N) BOS, self § 3
    F = np.zeros_like(S)                                            # (B, N, N)
    F[:, 1:] = np.cumsum(S, axis=1)[:, :-1]   # roll one query down, sum over queries    § 4
    return F


def accumulated_mask_backward(dF: np.ndarray, L_sel: np.ndarray, protect_bos: bool) -> np.ndarray:
    """Gradient of ``accumulated_mask_from_logits`` with respect to the selector's logits.  § 7

    Parameters
    ----------
    dF : (B, N, N) upstream gradient on F
    L_sel : (B, N, N) the selector head's scaled logits (as the forward saw them)
    protect_bos : bool, as in the forward

    Returns
    -------
    dL_sel : (B, N, N), of dF's dtype
    """
    N = dF.shape[-1]
    # F[:, 1:] = cumsum(S, axis=1)[:, :-1]: dS[m, j] = sum_{i > m} dF[i, j]
    dS = np.zeros_like(dF)                                          # (B, N, N)
    dS[:, :-1] = np.cumsum(dF[:, :0:-1], axis=1)[:, ::-1]           # reverse cumsum
    # S = where(constraints, S, 0): no gradient where S was forced to zero
    dS = np.where(selection_constraints(N, protect_bos), dS, 0.0)
    # S = relu(L_sel): gradient only where the logit was positive
    return np.where(L_sel > 0, dS, 0.0)


def accumulated_mask(q, k, *, selector_head: int = 0, protect_bos: bool = True,
                     scale: Optional[float] = None) -> np.ndarray:
    """The accumulated mask ``F[b, i, j] = sum_{m < i} S[b, m, j]``.

    Parameters
    ----------
    q, k : (B, H, N, D) float arrays
    selector_head : int, the head whose logits decide what is masked (the paper uses 0)
    protect_bos : bool, never mask position 0
    scale : float or None, logit scale (default ``1/sqrt(D)``)

    Returns
    -------
    F : (B, N, N) array, ``F[b, i, j]`` is subtracted from every head's logit of query i on key j.
    """
    q, k, (B, H, N, D) = check_qkv(q, k)
    s = check_selector_head(selector_head, H)
    scale = resolve_scale(scale, D)
    L_sel = scale * (q[:, s] @ k[:, s].swapaxes(-1, -2))           # (B, N, N)
    return accumulated_mask_from_logits(L_sel, bool(protect_bos))


# ----------------------------------------------------------------------------------------------
# Pruning: which keys a K-slot buffer still holds when query i attends


def eviction_mask(F, budget: Optional[int], *, protect_bos: bool = True,
                  evict_threshold: Optional[float] = None) -> np.ndarray:
    """Which keys a ``budget``-slot KV buffer holds when each query attends.  § 6

    Walk i = 0..N-1: insert token i; while more than ``budget`` tokens are held, drop the held
    token with the largest ``F[i, j]`` (never i itself, never BOS when protected; on equal F the
    oldest). Because F never decreases down a column, a dropped token would never have come back.
    With ``evict_threshold=t``, first drop every held token with ``F[i, j] > t`` (BOS excepted
    when protected): the KV cache's optional threshold rule (§ 9).

    Parameters
    ----------
    F : (B, N, N) accumulated mask
    budget : int or None, slots; >= 2 with BOS protection, >= 1 without (None: no limit)
    evict_threshold : float >= 0 or None

    Returns
    -------
    visible : (B, N, N) bool, ``visible[b, i, j]`` is True when query i may attend to key j.
    """
    F = check_mask(F)
    K = check_budget(budget, bool(protect_bos))
    t = check_threshold(evict_threshold)
    B, N, _ = F.shape
    K = N if K is None else K
    visible = np.zeros((B, N, N), dtype=bool)
    held = np.zeros((B, N), dtype=bool)                  # (B, N) the buffers, one per sequence
    rows = np.arange(B)
    for i in range(N):                                   # every sequence steps in lockstep
        if t is not None:                                # the threshold rule
            over = held & (F[:, i] > t)                  # (B, N)
            if protect_bos:
                over[:, 0] = False
            held &= ~over
        held[:, i] = True
        full = held.sum(axis=1) > K                      # (B,) one insert needs at most one drop
        if full.any():
            evictable = held.copy()
            evictable[:, i] = False
            if protect_bos:
                evictable[:, 0] = False
            score = np.where(evictable, F[:, i], -np.inf)        # (B, N)
            victim = np.argmax(score, axis=1)            # argmax takes the first (oldest) tie
            held[rows[full], victim[full]] = False
        visible[:, i] = held
    return visible


# ----------------------------------------------------------------------------------------------
# Pruning-aware training: a soft version of the eviction rule


DEFAULT_SOFT_STRENGTH = 10.0   # slope of the rank penalty: 10 masks a key 11x faster past the cut


def rank_penalty(F, budget: int, strength: float = DEFAULT_SOFT_STRENGTH
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """F with a penalty on the keys a ``budget``-slot buffer would rank out.  § 10

    Row i's cut ``theta[i] = F[i, cut[i]]`` is the ``budget``-th smallest ``F[i, j]`` over its
    keys ``j <= i`` (no cut, ``cut[i] = -1``, when row i has ``budget`` keys or fewer: nothing to
    drop). Keys above the cut are the ones the eviction rule of § 6 ranks out at query i; past
    the cut their mask grows ``1 + strength`` times as fast:

        F_soft[i, j] = F[i, j] + strength * max(F[i, j] - theta[i], 0)

    so the loss sees, softly, what a pruned cache would do, and its gradient through F reaches
    the selector head where it ranks a needed key beyond the budget.

    Parameters
    ----------
    F : (B, N, N) accumulated mask
    budget : int, slots (>= 1)
    strength : float >= 0

    Returns
    -------
    F_soft : (B, N, N)
    cut : (B, N) int, the column of each row's cut, -1 where the row has none
    """
    F = check_mask(F)
    K = check_budget(budget, protect_bos=False)
    strength = check_strength(strength)
    B, N, _ = F.shape
    cut = np.full((B, N), -1, dtype=np.int64)                           # (B, N)
    if K >= N:                                                          # no row has to drop
        return F.copy(), cut
    F_keys = np.where(np.tri(N, dtype=bool), F, np.inf)                 # (B, N, N) keys j <= i
    kth = np.argpartition(F_keys, K - 1, axis=-1)[..., K - 1]           # (B, N) column of the cut
    rows = np.arange(N) >= K                                            # (N,) rows with > K keys
    cut[:, rows] = kth[:, rows]
    past, theta = keys_past_the_cut(F, cut)                             # (B, N, N), (B, N, 1)
    F_soft = F + strength * np.where(past, F - theta, 0.0)              # (B, N, N)
    return F_soft, cut


def keys_past_the_cut(F, cut) -> Tuple[np.ndarray, np.ndarray]:
    """past (B, N, N) bool: the keys j <= i of rows with a cut whose F is above the cut's, and
    theta (B, N, 1) = F[i, cut[i]] (F[i, 0] where row i has no cut; unused there).  § 10"""
    N = F.shape[-1]
    rows = cut >= 0                                                     # (B, N)
    theta = np.take_along_axis(F, np.where(rows, cut, 0)[..., None], axis=-1)  # (B, N, 1)
    past = np.tri(N, dtype=bool) & rows[..., None] & (F > theta)        # (B, N, N)
    return past, theta


def rank_penalty_backward(dF_soft, F, cut, strength: float) -> np.ndarray:
    """Gradient of ``rank_penalty`` with respect to F.  § 10

    ``F_soft[i, j] = F[i, j] + strength * (F[i, j] - F[i, cut[i]])`` for keys j past the cut,
    so a past key passes ``(1 + strength)`` times its gradient to ``F[i, j]`` and minus
    ``strength`` times it to the cut ``F[i, cut[i]]``; every other key passes it through.

    dF_soft, F : (B, N, N); cut : (B, N) from ``rank_penalty`` -> dF (B, N, N)
    """
    past, _ = keys_past_the_cut(F, cut)                                 # (B, N, N)
    extra = strength * np.where(past, dF_soft, 0.0)                     # (B, N, N)
    dF = dF_soft + extra
    b, i = np.nonzero(cut >= 0)                                         # the rows with a cut
    np.subtract.at(dF, (b, i, cut[b, i]), extra.sum(axis=-1)[b, i])     # the cut's share
    return dF


# ----------------------------------------------------------------------------------------------
# The layer


def forward(q, k, v, *, selector_head: int = 0, protect_bos: bool = True, selective: bool = True,
            scale: Optional[float] = None, budget: Optional[int] = None,
            soft_budget: Optional[int] = None, soft_strength: float = DEFAULT_SOFT_STRENGTH):
    """Selective attention, forward.

    Parameters
    ----------
    q, k, v : (B, H, N, D) float arrays of one dtype
    selector_head : int, head whose logits build the mask (default 0, the paper's choice)
    protect_bos : bool, never mask or evict position 0
    selective : bool, False gives standard causal attention (F = 0)
    scale : float or None, logit scale (default ``1/sqrt(D)``)
    budget : int or None, keep at most ``budget`` keys per query (pruned KV buffer)
    soft_budget : int or None, training only: subtract the rank penalty of § 10 for a
        ``soft_budget``-slot buffer on top of F (None: no penalty)
    soft_strength : float >= 0, the penalty's slope (§ 10)

    Returns
    -------
    out : (B, H, N, D)
    cache : Cache, with ``cache.F`` (B, N, N) and ``cache.P`` (B, H, N, N)
    """
    q, k, v, (B, H, N, D) = check_qkv(q, k, v)
    s = check_selector_head(selector_head, H)
    scale = resolve_scale(scale, D)
    protect_bos = bool(protect_bos)
    budget = check_budget(budget, protect_bos)
    soft_budget = check_budget(soft_budget, protect_bos)
    soft_strength = check_strength(soft_strength)

    causal = np.tri(N, dtype=bool)                                      # (N, N) j <= i     § 1
    L = np.where(causal, scale * (q @ k.swapaxes(-1, -2)), -np.inf)     # (B, H, N, N)      § 1
    if selective:
        F = accumulated_mask_from_logits(L[:, s], protect_bos)          # (B, N, N)    §§ 2-4
    else:
        F = np.zeros((B, N, N), dtype=L.dtype)                          # (B, N, N) baseline
    visible = np.broadcast_to(causal, (B, N, N))                        # (B, N, N)
    if budget is not None:
        visible = eviction_mask(F, budget, protect_bos=protect_bos)     # (B, N, N)         § 6
    F_used, cut = F, None                                               # (B, N, N)
    if soft_budget is not None:
        F_used, cut = rank_penalty(F, soft_budget, soft_strength)       # (B, N, N), (B, N) § 10
    logits = np.where(visible[:, None], L - F_used[:, None], -np.inf)   # (B, H, N, N)      § 5
    logits = logits - logits.max(axis=-1, keepdims=True)                # (B, H, N, N) stable
    P = np.exp(logits)                                                  # (B, H, N, N)
    P /= P.sum(axis=-1, keepdims=True)                                  # (B, H, N, N) softmax
    out = P @ v                                                         # (B, H, N, D)      § 5

    cache = Cache(q=q, k=k, v=v, L=L, F=F, visible=np.array(visible), P=P, scale=scale,
                  selector_head=s, protect_bos=protect_bos, selective=bool(selective),
                  budget=budget, soft_cut=cut, soft_strength=soft_strength)
    return out, cache


def backward(dout, cache: Cache, dF=None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Selective attention, backward.  § 7

    Parameters
    ----------
    dout : (B, H, N, D) upstream gradient of ``out``
    cache : Cache from ``forward``
    dF : (B, N, N) or None, extra upstream gradient on ``cache.F`` (e.g. from the memory loss)

    Returns
    -------
    dq, dk, dv : (B, H, N, D). The gradient includes the path through F into the selector head's
    q and k. With a budget the held set is treated as a constant.
    """
    q, k, v, P, L, F = cache.q, cache.k, cache.v, cache.P, cache.L, cache.F
    B, H, N, D = q.shape
    dout = check_like(dout, "dout", (B, H, N, D))
    s = cache.selector_head

    # out = P @ v
    dv = P.swapaxes(-1, -2) @ dout                                      # (B, H, N, D)
    dP = dout @ v.swapaxes(-1, -2)                                      # (B, H, N, N)
    # P = softmax(logits): dlogits = P * (dP - rowsum(dP * P))
    dlogits = P * (dP - (dP * P).sum(axis=-1, keepdims=True))           # (B, H, N, N)
    # logits = L - F[:, None]: L gets dlogits, F gets minus its sum over heads
    dL = dlogits.copy()                                                 # (B, H, N, N)
    if cache.selective:
        dF_total = -dlogits.sum(axis=1)                                 # (B, N, N)
        if cache.soft_cut is not None:    # logits = L - F_soft(F)                         § 10
            dF_total = rank_penalty_backward(dF_total, F, cache.soft_cut, cache.soft_strength)
        if dF is not None:
            dF_total = dF_total + check_like(dF, "dF", (B, N, N))
        dL[:, s] += accumulated_mask_backward(dF_total, L[:, s], cache.protect_bos)
    elif dF is not None:
        check_like(dF, "dF", (B, N, N))  # F is a constant zero: validated, contributes nothing
    # L = scale * q @ k^T (entries above the diagonal are constants -inf: dL is 0 there)
    dq = cache.scale * (dL @ k)                                         # (B, H, N, D)
    dk = cache.scale * (dL.swapaxes(-1, -2) @ q)                        # (B, H, N, D)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# The memory loss (the paper's auxiliary loss for pruning)  § 8


def memory_loss(F, tau: float = 1.0) -> np.ndarray:
    """Memory of a layer: ``max_i sum_{j <= i} (1 - min(F[i, j], tau) / tau)`` per batch element.

    Parameters
    ----------
    F : (B, N, N) accumulated mask
    tau : float > 0, masking strength at which a token counts as fully evicted

    Returns
    -------
    mem : (B,) the largest number of (soft) keys any query still needs.
    """
    F = check_mask(F)
    tau = check_tau(tau)
    N = F.shape[-1]
    kept = np.where(np.tri(N, dtype=bool), 1.0 - np.minimum(F, tau) / tau, 0.0)  # (B, N, N)
    return kept.sum(axis=-1).max(axis=-1)                                         # (B,)


def memory_loss_backward(dmem, F, tau: float = 1.0) -> np.ndarray:
    """Gradient of ``memory_loss`` with respect to F.

    Parameters
    ----------
    dmem : (B,) upstream gradient of ``mem``
    F : (B, N, N) accumulated mask
    tau : float > 0

    Returns
    -------
    dF : (B, N, N). Only the row that attains the max (the first, on ties) gets gradient, and
    only where ``F < tau`` (beyond tau the min is flat).
    """
    F = check_mask(F)
    tau = check_tau(tau)
    B, N, _ = F.shape
    dmem = check_like(dmem, "dmem", (B,))
    causal = np.tri(N, dtype=bool)                                                # (N, N)
    kept = np.where(causal, 1.0 - np.minimum(F, tau) / tau, 0.0)                  # (B, N, N)
    row = kept.sum(axis=-1).argmax(axis=-1)                                       # (B,)
    dF = np.zeros_like(F)                                                         # (B, N, N)
    b = np.arange(B)
    live = causal[row] & (F[b, row] < tau)                                        # (B, N)
    dF[b, row] = np.where(live, -dmem[:, None] / tau, 0.0)
    return dF
