"""Implementations for the conformance kit to judge: honest ports of the paper's listing (float64
and float32), the same ports with each known mistake, other mistakes, and broken callables.

Written independently of ``selattn_reference`` (the listing's own steps: roll, cumsum, eye) so
that the kit's verdicts are tested on code that does not share its bugs. The CLI tests load this
file as ``tests/conformance_candidates.py:NAME``.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import List, Optional

import numpy as np

# ----------------------------------------------------------------------------------------------
# The forward, as the listing writes it


def listing(q, k, v, *, mistake: Optional[str] = None, dtype=np.float64, selector_head: int = 0,
            protect_bos: bool = True, scale: Optional[float] = None) -> np.ndarray:
    """The listing of the paper, step by step; ``mistake`` switches one step to a known mistake
    (or to 'selector-only', F subtracted from the selector head only: not a known mistake)."""
    q, k, v = (np.asarray(x, dtype=dtype) for x in (q, k, v))
    B, H, N, D = q.shape
    scale = dtype(1.0 / np.sqrt(D) if scale is None else scale)
    logits = scale * np.einsum("bhid,bhjd->bhij", q, k)
    causal = np.tril(np.ones((N, N), dtype=bool))
    logits = np.where(causal, logits, -np.inf).astype(dtype)
    S = logits[:, selector_head]
    if mistake == "no-relu":
        S = np.where(causal, S, 0.0)
    else:
        S = np.maximum(S, 0.0)
    S = S.copy()
    if protect_bos and mistake != "bos-masked":
        S[..., 0] = 0.0
    if mistake != "self-masked":
        S = S * (1.0 - np.eye(N, dtype=dtype))
    if mistake != "no-shift":
        S = np.roll(S, 1, axis=-2)
        S[..., 0, :] = 0.0
    F = np.cumsum(S, axis=-1 if mistake == "cumsum-over-keys" else -2).astype(dtype)
    if mistake == "selector-only":
        logits[:, selector_head] -= F
    else:
        logits = logits - F[:, None]
    logits = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return (weights @ v).astype(dtype)


def reference_port(q, k, v):
    return listing(q, k, v)


def float32_port(q, k, v):
    return listing(q, k, v, dtype=np.float32)


def with_options(q, k, v, *, sel: int = 0, keep_bos: bool = True, softmax_scale=None):
    """Takes the three options under its own names."""
    return listing(q, k, v, selector_head=sel, protect_bos=keep_bos, scale=softmax_scale)


def cumsum_over_keys(q, k, v):
    return listing(q, k, v, mistake="cumsum-over-keys")


def no_shift(q, k, v):
    return listing(q, k, v, mistake="no-shift")


def self_masked(q, k, v):
    return listing(q, k, v, mistake="self-masked")


def bos_masked(q, k, v):
    return listing(q, k, v, mistake="bos-masked", dtype=np.float32)


def no_relu(q, k, v):
    return listing(q, k, v, mistake="no-relu")


def selector_only(q, k, v):
    return listing(q, k, v, mistake="selector-only")


# ----------------------------------------------------------------------------------------------
# Broken callables


def raises(q, k, v):
    raise RuntimeError("CUDA out of memory (pretend)")


def wrong_shape(q, k, v):
    return listing(q, k, v)[:, :, :-1] if q.shape[2] > 1 else listing(q, k, v)[..., :0]


def returns_tuple(q, k, v):
    return listing(q, k, v), None


def returns_list(q, k, v):
    return listing(q, k, v).tolist()


def returns_nan(q, k, v):
    out = listing(q, k, v)
    out[..., -1, :] = np.nan
    return out


def hangs(q, k, v):
    time.sleep(30)
    return listing(q, k, v)


def exits(q, k, v):
    os._exit(0)


def segfaults(q, k, v):
    ctypes.string_at(0)


NOT_CALLABLE = 42

# ----------------------------------------------------------------------------------------------
# A KV cache, token by token, as lists of held tokens


class ListCache:
    """Per batch element, a list of held tokens [position, k (H, D), v (H, D), F].

    ``mistake``: 'f-not-carried', 'bos-evicted', 'no-shift' (the token's own selection masks
    before it attends), or 'newest-on-ties' (not a known mistake)."""

    def __init__(self, batch: int, heads: int, head_dim: int, budget: int, *,
                 mistake: Optional[str] = None, dtype=np.float64):
        self.budget, self.mistake, self.dtype = budget, mistake, dtype
        self.scale = dtype(1.0 / np.sqrt(head_dim))
        self.held: List[list] = [[] for _ in range(batch)]
        self.position = 0

    def _victim(self, held: list) -> int:
        candidates = [n for n, token in enumerate(held)
                      if token[0] != 0 or self.mistake == "bos-evicted"]
        largest = max(held[n][3] for n in candidates)
        tied = [n for n in candidates if held[n][3] == largest]
        return tied[-1] if self.mistake == "newest-on-ties" else tied[0]

    def step(self, q, k, v) -> np.ndarray:
        q, k, v = (np.asarray(x, dtype=self.dtype) for x in (q, k, v))
        out = np.zeros(q.shape, dtype=self.dtype)
        for b, held in enumerate(self.held):
            if len(held) == self.budget:
                held.pop(self._victim(held))
            held.append([self.position, k[b], v[b], self.dtype(0.0)])
            keys = np.stack([t[1] for t in held], axis=1)             # (H, n, D)
            values = np.stack([t[2] for t in held], axis=1)           # (H, n, D)
            logits = self.scale * np.einsum("hd,hnd->hn", q[b], keys)
            selection = np.maximum(logits[0], 0.0)                    # the selector is head 0
            if self.mistake == "no-shift":                            # masks before attending
                self._update(held, selection)
            F = np.array([t[3] for t in held], dtype=self.dtype)      # (n,)
            weights = np.exp(logits - F - (logits - F).max(axis=-1, keepdims=True))
            weights /= weights.sum(axis=-1, keepdims=True)
            out[b] = np.einsum("hn,hnd->hd", weights, values)
            if self.mistake != "no-shift":
                self._update(held, selection)
        self.position += 1
        return out

    def _update(self, held: list, selection: np.ndarray) -> None:
        """Add the current token's selection to the F of every other held token but BOS."""
        for n, token in enumerate(held[:-1]):
            if token[0] != 0:
                grown = selection[n]
                token[3] = grown if self.mistake == "f-not-carried" else token[3] + grown


def list_cache(batch, heads, head_dim, budget):
    return ListCache(batch, heads, head_dim, budget)


def list_cache_float32(batch, heads, head_dim, budget):
    return ListCache(batch, heads, head_dim, budget, dtype=np.float32)


def f_not_carried(batch, heads, head_dim, budget):
    return ListCache(batch, heads, head_dim, budget, mistake="f-not-carried")


def bos_evicted(batch, heads, head_dim, budget):
    return ListCache(batch, heads, head_dim, budget, mistake="bos-evicted")


def cache_no_shift(batch, heads, head_dim, budget):
    return ListCache(batch, heads, head_dim, budget, mistake="no-shift")


def newest_on_ties(batch, heads, head_dim, budget):
    return ListCache(batch, heads, head_dim, budget, mistake="newest-on-ties")


def no_step(batch, heads, head_dim, budget):
    return object()
