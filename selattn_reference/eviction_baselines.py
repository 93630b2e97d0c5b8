"""KV-cache eviction rules to compare selective attention's pruning with: a sliding window and
H2O (heavy hitters by accumulated attention).

Both are attention backends with the interface of ``selattn_lm.backends.NumpyAttention``
(inference only: ``backward`` refuses), so ``model.forward(..., attention=SlidingWindow(),
budgets=[...])`` scores a model, usually a standard one, under a ``budget``-slot cache per layer.
A budget counts every key a query can see, itself included, as in ``eviction_mask``:

- ``SlidingWindow``: BOS and the ``budget - 1`` most recent tokens (the current one included).
  Keeping BOS (an attention sink) makes it the StreamingLLM rule, a stronger baseline than the
  bare window; selective attention's cache protects BOS too.
- ``HeavyHitters``: H2O (Zhang et al., 2023, arXiv 2306.14048). Each held key accumulates the
  attention weight it received from every query so far, summed over heads. When a new token
  makes the cache overflow, the key with the smallest accumulated weight is evicted among those
  outside the ``recent`` most recent tokens (the H2O paper splits the budget evenly between
  heavy hitters and recent tokens: ``recent = budget // 2``). Nothing is protected: BOS stays
  because it collects much attention, not by rule.

Shapes as in ``attention.py``: q, k, v (B, H, N, D); visibility masks (B, N, N) with queries on
axis -2.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .validation import check_budget, check_qkv, resolve_scale


def attend(q, k, v, visible, scale: float) -> np.ndarray:
    """Causal softmax attention restricted to ``visible`` (B, N, N) keys -> out (B, H, N, D)."""
    logits = scale * (q @ k.swapaxes(-1, -2))                              # (B, H, N, N)
    logits = np.where(visible[:, None], logits, -np.inf)
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)                                     # (B, H, N, N)
    return p @ v                                                           # (B, H, N, D)


def sliding_window_mask(N: int, budget: int) -> np.ndarray:
    """(N, N) bool: query i sees BOS and keys i - budget + 2 .. i (``budget`` keys at most)."""
    i, j = np.arange(N)[:, None], np.arange(N)[None, :]
    return (j <= i) & ((i - j < budget - 1) | (j == 0))


def heavy_hitter_attention(q, k, v, budget: int, scale: float, recent: Optional[int] = None
                           ) -> np.ndarray:
    """Token-by-token attention with an H2O cache of ``budget`` slots -> out (B, H, N, D).

    At query i: insert token i; if more than ``budget`` are held, evict the held key with the
    smallest accumulated attention among those older than the ``recent`` newest (the oldest on
    ties); attend over the held keys; add this query's weights (summed over heads) to the
    accumulated attention of each held key.
    """
    B, H, N, D = q.shape
    recent = budget // 2 if recent is None else recent
    held = np.zeros((B, N), dtype=bool)                                    # (B, N)
    score = np.zeros((B, N), dtype=np.float64)                             # (B, N)
    out = np.empty_like(q)                                                 # (B, H, N, D)
    rows = np.arange(B)
    for i in range(N):
        held[:, i] = True
        if i + 1 > budget:                   # every sequence holds min(i + 1, budget) keys
            old = held.copy()
            old[:, max(0, i - recent + 1):] = False    # the recent window is never evicted
            victim = np.argmin(np.where(old, score, np.inf), axis=1)       # (B,) oldest on ties
            held[rows, victim] = False
        logit = scale * np.einsum("bhd,bhnd->bhn", q[:, :, i], k)          # (B, H, N)
        logit = np.where(held[:, None], logit, -np.inf)
        logit -= logit.max(axis=-1, keepdims=True)
        p = np.exp(logit)
        p /= p.sum(axis=-1, keepdims=True)                                 # (B, H, N)
        out[:, :, i] = np.einsum("bhn,bhnd->bhd", p, v)
        score += p.sum(axis=1)
    return out


class _EvictionBaseline:
    """Shared checks of the two baselines; subclasses implement ``_attend``."""

    name = ""

    def forward(self, q, k, v, *, selective: bool, selector_head: int, need_F: bool,
                budget: Optional[int] = None, **unused):
        """Attention of q, k, v (B, H, N, hd) under this rule with ``budget`` slots (None:
        full causal attention). Only for standard models: a selective model's F would be
        ignored, so ``selective=True`` is refused.

        Returns out (B, H, N, hd), None (no F), None (no backward context).
        """
        if selective:
            raise ValueError(f"the {self.name} baseline prunes standard attention; a selective "
                             "model's own rule is its KV cache (budgets on CAttention or "
                             "NumpyAttention)")
        q, k, v, (B, H, N, D) = check_qkv(q, k, v)
        budget = check_budget(budget, protect_bos=True)
        scale = resolve_scale(None, D)
        if budget is None or budget >= N:
            budget = N
        return self._attend(q, k, v, budget, scale), None, None

    def backward(self, dout, dF, ctx):
        raise ValueError(f"the {self.name} baseline is for inference: it has no backward")


class SlidingWindow(_EvictionBaseline):
    """BOS plus the most recent ``budget - 1`` tokens (StreamingLLM's sink + window)."""

    name = "sliding-window"

    def _attend(self, q, k, v, budget, scale):
        B, H, N, D = q.shape
        visible = np.broadcast_to(sliding_window_mask(N, budget), (B, N, N))
        return attend(q, k, v, visible, scale)


class HeavyHitters(_EvictionBaseline):
    """H2O: heavy hitters by accumulated attention plus a recent window (half the budget)."""

    name = "H2O"

    def _attend(self, q, k, v, budget, scale):
        if budget >= q.shape[2]:             # nothing is ever evicted: plain causal attention
            N = q.shape[2]
            return attend(q, k, v, np.broadcast_to(np.tri(N, dtype=bool), (q.shape[0], N, N)),
                          scale)
        return heavy_hitter_attention(q, k, v, budget, scale)
