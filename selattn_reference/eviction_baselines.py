"""KV-cache eviction rules to compare selective attention's pruning with: a sliding window, H2O
(heavy hitters by accumulated attention) and TOVA (the current query's attention), all on
standard models; and the selective model under a sliding window, the control that tells
selective attention's choice of what to evict from its mere use of F.

They are attention backends with the interface of ``selattn_lm.backends.NumpyAttention``
(inference only: ``backward`` refuses), so ``model.forward(..., attention=SlidingWindow(),
budgets=[...])`` scores a model under a ``budget``-slot cache per layer. A budget counts every
key a query can see, itself included, as in ``eviction_mask``:

- ``SlidingWindow``: BOS and the ``budget - 1`` most recent tokens (the current one included).
  Keeping BOS (an attention sink) makes it the StreamingLLM rule, a stronger baseline than the
  bare window; selective attention's cache protects BOS too.
- ``HeavyHitters``: H2O (Zhang et al., 2023, arXiv 2306.14048). Each held key accumulates the
  attention weight it received from every query so far, summed over heads. When a new token
  makes the cache overflow, the key with the smallest accumulated weight is evicted among those
  outside the ``recent`` most recent tokens (the H2O paper splits the budget evenly between
  heavy hitters and recent tokens: ``recent = budget // 2``). Nothing is protected: BOS stays
  because it collects much attention, not by rule.
- ``TOVA``: Token Omission Via Attention (Oren et al., 2024, arXiv 2401.06104). The current
  query attends over the held keys and itself; then, when the cache is full, the key with the
  smallest weight *of this query*, averaged over the heads, is dropped (the new token itself
  may be). The paper's cache of ``c`` states is attended with the new token as ``c + 1`` keys;
  here ``c = budget - 1``, so a query sees at most ``budget`` keys like under the other rules.
  Nothing is protected, as in the paper.
- ``SelectiveSlidingWindow``: a selective model's attention, F subtracted as usual, restricted
  to ``SlidingWindow``'s keys: recency eviction instead of the largest-F eviction of its KV
  cache (``selattn_reference.attention.eviction_mask``). The gap between the two at one budget
  is what selective attention's pruning adds over keeping the most recent tokens.

Shapes as in ``attention.py``: q, k, v (B, H, N, D); visibility masks (B, N, N) with queries on
axis -2.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .attention import accumulated_mask_from_logits
from .validation import check_budget, check_qkv, check_selector_head, resolve_scale


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
    L = scale * (q @ k.swapaxes(-1, -2))                                   # (B, H, N, N)
    P = np.zeros_like(L)                                                   # (B, H, N, N)
    rows = np.arange(B)
    for i in range(N):
        held[:, i] = True
        if i + 1 > budget:                   # every sequence holds min(i + 1, budget) keys
            old = held.copy()
            old[:, max(0, i - recent + 1):] = False    # the recent window is never evicted
            victim = np.argmin(np.where(old, score, np.inf), axis=1)       # (B,) oldest on ties
            held[rows, victim] = False
        logit = np.where(held[:, None], L[:, :, i], -np.inf)               # (B, H, N)
        logit -= logit.max(axis=-1, keepdims=True)
        p = np.exp(logit)
        p /= p.sum(axis=-1, keepdims=True)                                 # (B, H, N)
        P[:, :, i] = p
        score += p.sum(axis=1)
    return P @ v                                                           # (B, H, N, D)


def tova_attention(q, k, v, budget: int, scale: float) -> np.ndarray:
    """Token-by-token attention with a TOVA cache of ``budget`` slots -> out (B, H, N, D).

    At query i: insert token i (the cache then holds at most ``budget`` keys); attend over the
    held keys; if ``budget`` keys are held, evict the one with the smallest weight of this query
    averaged over the heads (token i included; the oldest on ties), so that at most
    ``budget - 1`` keys wait for the next token.
    """
    B, H, N, D = q.shape
    held = np.zeros((B, N), dtype=bool)                                    # (B, N)
    L = scale * (q @ k.swapaxes(-1, -2))                                   # (B, H, N, N)
    P = np.zeros_like(L)                                                   # (B, H, N, N)
    rows = np.arange(B)
    for i in range(N):
        held[:, i] = True
        logit = np.where(held[:, None], L[:, :, i], -np.inf)               # (B, H, N)
        logit -= logit.max(axis=-1, keepdims=True)
        p = np.exp(logit)
        p /= p.sum(axis=-1, keepdims=True)                                 # (B, H, N)
        P[:, :, i] = p
        if i + 1 >= budget:                  # every sequence holds min(i + 1, budget) keys
            weight = np.where(held, p.mean(axis=1), np.inf)                # (B, N)
            victim = np.argmin(weight, axis=1)                             # (B,) oldest on ties
            held[rows, victim] = False
    return P @ v                                                           # (B, H, N, D)


def selective_window_attention(q, k, v, budget: int, scale: float, selector_head: int
                               ) -> np.ndarray:
    """Selective attention (F subtracted, BOS protected) restricted to ``sliding_window_mask``
    -> out (B, H, N, D). F is the full-context accumulated mask of ``attention.forward``: the
    window only decides which keys are held, not how strongly they are masked."""
    B, H, N, D = q.shape
    causal = np.tri(N, dtype=bool)                                         # (N, N)
    L = np.where(causal, scale * (q @ k.swapaxes(-1, -2)), -np.inf)        # (B, H, N, N)
    F = accumulated_mask_from_logits(L[:, selector_head], protect_bos=True)  # (B, N, N)
    logits = np.where(sliding_window_mask(N, budget), L - F[:, None], -np.inf)  # (B, H, N, N)
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)                                     # (B, H, N, N)
    return p @ v                                                           # (B, H, N, D)


class _EvictionBaseline:
    """Shared checks of the baselines of standard models; subclasses implement ``_attend``."""

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


class TOVA(_EvictionBaseline):
    """TOVA: evict the key the current query attends to least (mean over heads)."""

    name = "TOVA"

    def _attend(self, q, k, v, budget, scale):
        N = q.shape[2]
        if budget >= N:                      # nothing is ever evicted: plain causal attention
            return attend(q, k, v, np.broadcast_to(np.tri(N, dtype=bool), (q.shape[0], N, N)),
                          scale)
        return tova_attention(q, k, v, budget, scale)


class SelectiveSlidingWindow:
    """A selective model's attention (F applied) with recency eviction: BOS and the most recent
    ``budget - 1`` tokens, instead of its KV cache's largest-F eviction."""

    name = "selective sliding-window"

    def forward(self, q, k, v, *, selective: bool, selector_head: int, need_F: bool,
                budget: Optional[int] = None, **unused):
        """Selective attention of q, k, v (B, H, N, hd) over a ``budget``-key sliding window
        (None: every causal key, which is ``attention.forward``). Only for selective models.

        Returns out (B, H, N, hd), F (B, N, N) when ``need_F`` else None, None (no backward
        context).
        """
        if not selective:
            raise ValueError(f"the {self.name} control is for selective models; a standard "
                             "model's sliding window is SlidingWindow")
        q, k, v, (B, H, N, D) = check_qkv(q, k, v)
        s = check_selector_head(selector_head, H)
        budget = check_budget(budget, protect_bos=True)
        scale = resolve_scale(None, D)
        if budget is None or budget >= N:
            budget = N
        out = selective_window_attention(q, k, v, budget, scale, s)
        F = None
        if need_F:
            L_sel = np.where(np.tri(N, dtype=bool), scale * (q[:, s] @ k[:, s].swapaxes(-1, -2)),
                             -np.inf)
            F = accumulated_mask_from_logits(L_sel, protect_bos=True)
        return out, F, None

    def backward(self, dout, dF, ctx):
        raise ValueError(f"the {self.name} control is for inference: it has no backward")
