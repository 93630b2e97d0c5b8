"""The pruned KV cache of one selective-attention layer, in NumPy: the readable model of
``selattn_c.KVCache`` (the C version has the same decoding API, state and slot layout, plus
input checks, ``bind_step`` and memory management).  § 9

Decoding token by token, a cache holds the keys and values of earlier tokens in *slots*. Selective
attention adds one number per held token: its running accumulated mask ``F`` (how strongly later
tokens have asked to forget it). One ``step`` for token ``i`` (0-based, BOS is 0):

1. make room: with ``budget`` slots all in use, evict the held token with the largest F (never BOS
   when protected; the oldest on equal F). Its slot is freed;
2. insert token i into the free slot with the smallest index (its F starts at 0);
3. attend: every head's ``softmax(scale q.k - F)`` over the held tokens, times their values;
4. update: add the selector head's ``relu(scale q_s.k_s)`` of token i to the F of every other held
   token (BOS excepted when protected). This is row i of S, so a held token's F is now
   ``F[i + 1, j] = sum_{m <= i} S[m, j]``: exactly the prefill's F;
5. optionally drop every held token whose F exceeds ``evict_threshold`` (BOS excepted when
   protected): its weight is already multiplied by less than ``e^-threshold``.

Why eviction is safe: F never decreases, so a token that has the largest F now would only be
masked more strongly later. ``prefill`` runs ``step`` N times here; the C version computes the same
thing with the blocked kernel.

Slot layout: ``k``, ``v`` are (B, H, capacity, D); ``positions`` (B, capacity) holds the absolute
position of each slot's token, -1 for a free slot; ``F`` (B, capacity) its running mask (0 when
free). With a budget the capacity is the budget; without one it doubles when full.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .validation import (
    check_budget,
    check_cache_dims,
    check_selector_head,
    check_threshold,
    resolve_scale,
)

_INITIAL_CAPACITY = 16  # unbudgeted caches start this big and double when full


class KVCache:
    """A pruned KV cache for one selective-attention layer (NumPy model, float64 by default).

    Parameters
    ----------
    batch, heads, head_dim : int, B, H and D of the tokens it will hold
    budget : int or None, most tokens held per batch element (None: no limit). At least 2 with
        BOS protection (BOS and the newest token), at least 1 without.
    selector_head : int, the head whose logits build F (default 0)
    protect_bos : bool, never mask or evict position 0
    selective : bool, False gives standard attention (F = 0; eviction is then a sliding window
        that keeps BOS)
    scale : float or None, logit scale (default ``1/sqrt(head_dim)``)
    evict_threshold : float >= 0 or None, also drop held tokens whose F exceeds it
    dtype : numpy float dtype of the stored keys and values
    """

    def __init__(self, batch: int, heads: int, head_dim: int, budget: Optional[int] = None, *,
                 selector_head: int = 0, protect_bos: bool = True, selective: bool = True,
                 scale: Optional[float] = None, evict_threshold: Optional[float] = None,
                 dtype=np.float64):
        self.B, self.H, self.D = check_cache_dims(batch, heads, head_dim)
        self.selector_head = check_selector_head(selector_head, self.H)
        self.protect_bos = bool(protect_bos)
        self.selective = bool(selective)
        self.scale = resolve_scale(scale, self.D)
        self.budget = check_budget(budget, self.protect_bos)
        self.evict_threshold = check_threshold(evict_threshold)
        self.dtype = np.dtype(dtype)
        self.reset()

    # -- state ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every token (the capacity goes back to its initial size)."""
        cap = self.budget if self.budget is not None else _INITIAL_CAPACITY
        self.k = np.zeros((self.B, self.H, cap, self.D), self.dtype)   # (B, H, cap, D)
        self.v = np.zeros((self.B, self.H, cap, self.D), self.dtype)   # (B, H, cap, D)
        self.positions = np.full((self.B, cap), -1, np.int64)          # (B, cap) -1 = free
        self.F = np.zeros((self.B, cap), self.dtype)                   # (B, cap)
        self.evictions = np.zeros(self.B, np.int64)                    # (B,)
        self.length = 0                                                # tokens seen

    @property
    def capacity(self) -> int:
        return self.positions.shape[1]

    @property
    def size(self) -> np.ndarray:
        """(B,) tokens held by each batch element."""
        return (self.positions >= 0).sum(axis=1)

    def held(self, b: int):
        """(positions, F) of the tokens batch element b holds, oldest first."""
        slots = np.flatnonzero(self.positions[b] >= 0)
        order = np.argsort(self.positions[b, slots])
        return self.positions[b, slots[order]], self.F[b, slots[order]]

    # -- the rule ---------------------------------------------------------------------------

    def _evictable(self, b: int) -> np.ndarray:
        """(cap,) bool: held slots the rule may evict (not BOS when protected)."""
        pos = self.positions[b]
        ok = pos >= 0
        if self.protect_bos:
            ok &= pos != 0
        return ok

    def _victim(self, b: int) -> int:
        """Slot of the held token with the largest F; on equal F the oldest (smallest position)."""
        ok = self._evictable(b)
        F = np.where(ok, self.F[b], -np.inf)
        tied = ok & (F == F.max())
        pos = np.where(tied, self.positions[b], np.iinfo(np.int64).max)
        return int(np.argmin(pos))

    def _free(self, b: int, slot: int) -> None:
        self.positions[b, slot] = -1
        self.F[b, slot] = 0.0
        self.evictions[b] += 1

    def _grow(self) -> None:
        """Double the capacity of an unbudgeted cache (slots keep their index)."""
        cap = self.capacity
        pad4 = ((0, 0), (0, 0), (0, cap), (0, 0))
        self.k = np.pad(self.k, pad4)                                  # (B, H, 2 cap, D)
        self.v = np.pad(self.v, pad4)                                  # (B, H, 2 cap, D)
        self.positions = np.pad(self.positions, ((0, 0), (0, cap)), constant_values=-1)
        self.F = np.pad(self.F, ((0, 0), (0, cap)))                    # (B, 2 cap)

    # -- decoding ---------------------------------------------------------------------------

    def step(self, q, k, v) -> np.ndarray:
        """Attend from one new token and keep it.

        Parameters
        ----------
        q, k, v : (B, H, D) the new token's query, key and value

        Returns
        -------
        out : (B, H, D)
        """
        q, k, v = (np.asarray(x, dtype=self.dtype) for x in (q, k, v))
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.shape != (self.B, self.H, self.D):
                raise ValueError(f"{name} must have shape {(self.B, self.H, self.D)}, "
                                 f"got {x.shape}")
        i = self.length
        slot = np.empty(self.B, np.int64)
        for b in range(self.B):
            # 1. make room
            if self.budget is not None and self.size[b] == self.budget:
                self._free(b, self._victim(b))
            if self.size[b] == self.capacity:
                self._grow()
            # 2. insert into the smallest free slot
            slot[b] = np.flatnonzero(self.positions[b] < 0)[0]
            self.k[b, :, slot[b]] = k[b]
            self.v[b, :, slot[b]] = v[b]
            self.positions[b, slot[b]] = i
            self.F[b, slot[b]] = 0.0

        # 3. attend over the held tokens, F subtracted
        held = self.positions >= 0                                            # (B, cap)
        L = self.scale * np.einsum("bhd,bhcd->bhc", q, self.k)                # (B, H, cap)
        logits = np.where(held[:, None], L - self.F[:, None], -np.inf)        # (B, H, cap)
        P = np.exp(logits - logits.max(axis=-1, keepdims=True))               # (B, H, cap)
        P /= P.sum(axis=-1, keepdims=True)
        out = np.einsum("bhc,bhcd->bhd", P, self.v)                           # (B, H, D)

        if self.selective:
            # 4. this token's row of S goes into the F of every other held token
            others = held.copy()                                              # (B, cap)
            others[np.arange(self.B), slot] = False
            if self.protect_bos:
                others &= self.positions != 0
            self.F += np.where(others, np.maximum(L[:, self.selector_head], 0.0), 0.0)
            # 5. drop tokens masked beyond the threshold
            if self.evict_threshold is not None:
                for b in range(self.B):
                    for s in np.flatnonzero(self._evictable(b) & (self.F[b] > self.evict_threshold)):
                        self._free(b, s)
        self.length += 1
        return out

    def prefill(self, q, k, v) -> np.ndarray:
        """N steps at once: q, k, v (B, H, N, D) -> out (B, H, N, D)."""
        q, k, v = (np.asarray(x, dtype=self.dtype) for x in (q, k, v))
        if q.ndim != 4 or q.shape[:2] != (self.B, self.H) or q.shape[3] != self.D:
            raise ValueError(f"q must have shape (B, H, N, D) = ({self.B}, {self.H}, N, {self.D}),"
                             f" got {q.shape}")
        outs = [self.step(q[:, :, n], k[:, :, n], v[:, :, n]) for n in range(q.shape[2])]
        return np.stack(outs, axis=2) if outs else np.empty_like(q)           # (B, H, N, D)
