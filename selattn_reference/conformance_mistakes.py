"""The known mistakes of selective-attention implementations, as code, and their diagnosis.

Each mistake is the reference with one line of the paper's listing (docs/selective-attention.md,
"The mechanism in one listing") done wrong. ``mistaken_mask`` builds the accumulated mask F with
any set of mistakes, ``mistaken_output`` the layer's output (optionally with a pruned KV
buffer), and ``diagnose`` says which set of at most two mistakes reproduces a candidate's outputs.

Forward mistakes (any forward or cache can make them):

- ``cumsum-over-keys``: F summed along each row (over keys) instead of down each column;
- ``no-shift``: S summed without shifting it one query down;
- ``self-masked``: the diagonal of S not zeroed;
- ``bos-masked``: column 0 of S not zeroed;
- ``no-relu``: the selector's logits used without the relu.

Cache mistakes (decoding token by token):

- ``f-not-carried``: each step replaces a held token's F by the latest token's row of S instead
  of adding it, so F is ``S`` shifted one query down, not its running sum;
- ``bos-evicted``: the eviction rule may evict BOS (it has F = 0, so it goes first on ties).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .attention import eviction_mask


@dataclass(frozen=True)
class Mistake:
    """One known mistake: its label, what is wrong, and the line of the listing it breaks."""

    label: str
    kind: str        # "forward" or "cache"
    sentence: str    # one sentence: what the implementation does wrong
    line: str        # the line of the paper's listing (docs/selective-attention.md) it breaks


MISTAKES = {m.label: m for m in (
    Mistake("cumsum-over-keys", "forward",
            "F is a running sum along each row of S (over keys) instead of down each column "
            "(over queries), so a key is masked by what the previous token thought of other keys.",
            "F = running sum of S down each column   (§ 4)"),
    Mistake("no-shift", "forward",
            "S is summed without being shifted one query down, so a token's own selection already "
            "masks keys for that token instead of only for the tokens after it.",
            "S = S shifted down one row, row 0 = 0   (§ 4)"),
    Mistake("self-masked", "forward",
            "the diagonal of S is not zeroed, so every token masks itself for the tokens after it "
            "(F[i, i-1] should be 0: a token is always read unmasked by its successor).",
            "S[diagonal] = 0   (§ 3)"),
    Mistake("bos-masked", "forward",
            "column 0 of S is not zeroed, so BOS, where idle heads park their attention, gets "
            "masked.",
            "S[:, column 0] = 0   (§ 3)"),
    Mistake("no-relu", "forward",
            "the selector's logits enter S without the relu, so negative logits lower F and "
            "un-mask keys (F must be non-negative and never decrease).",
            "S = max(S, 0)   (§ 2)"),
    Mistake("f-not-carried", "cache",
            "the cache does not carry F across decoding steps: each step replaces a held token's "
            "F with the latest token's selection instead of adding it, so masks do not add up.",
            "F = running sum of S down each column   (§ 4; the cache's step 4, docs/kv-cache.md)"),
    Mistake("bos-evicted", "cache",
            "the eviction rule may evict BOS; BOS is never masked (F = 0), so it must never be "
            "evicted either, but with equal F it is the oldest token and goes first.",
            "S[:, column 0] = 0   (§ 3: BOS is never masked, hence never evicted, § 6)"),
)}

FORWARD_LABELS = tuple(m.label for m in MISTAKES.values() if m.kind == "forward")
CACHE_LABELS = FORWARD_LABELS + tuple(m.label for m in MISTAKES.values() if m.kind == "cache")


def mistaken_mask(L_sel: np.ndarray, protect_bos: bool, mistakes: Iterable[str] = ()
                  ) -> np.ndarray:
    """F from the selector's scaled logits, with the given mistakes (none: the reference's F).

    Parameters
    ----------
    L_sel : (B, N, N) the selector head's scaled logits (entries above the diagonal unused)
    protect_bos : bool, the layer's setting
    mistakes : labels from ``MISTAKES``

    Returns
    -------
    F : (B, N, N)
    """
    mistakes = set(mistakes)
    unknown = mistakes - set(MISTAKES)
    if unknown:
        raise ValueError(f"unknown mistake labels: {sorted(unknown)}")
    N = L_sel.shape[-1]
    S = np.where(np.tri(N, dtype=bool), L_sel, 0.0)                 # (B, N, N) causal part
    if "no-relu" not in mistakes:
        S = np.maximum(S, 0.0)                                      # S = max(S, 0)
    allowed = np.tri(N, k=0 if "self-masked" in mistakes else -1, dtype=bool)
    if protect_bos and "bos-masked" not in mistakes:
        allowed[:, 0] = False                                       # S[:, column 0] = 0
    S = np.where(allowed, S, 0.0)                                   # S[diagonal] = 0
    if "no-shift" not in mistakes:
        shifted = np.zeros_like(S)
        shifted[:, 1:] = S[:, :-1]                                  # shifted down one row
        S = shifted
    if "f-not-carried" in mistakes:
        return S                                                    # the latest row only
    return np.cumsum(S, axis=2 if "cumsum-over-keys" in mistakes else 1)


def masked_attention(q, k, v, F, scale: float, visible: Optional[np.ndarray] = None
                     ) -> np.ndarray:
    """``softmax(scale q k^T - F)`` over the visible keys (causal when None), times v.

    q, k, v : (B, H, N, D); F : (B, N, N); visible : (B, N, N) bool or None -> out (B, H, N, D)
    """
    N = q.shape[2]
    if visible is None:
        visible = np.broadcast_to(np.tri(N, dtype=bool), F.shape)
    L = scale * (q @ k.swapaxes(-1, -2))                                    # (B, H, N, N)
    logits = np.where(visible[:, None], L - F[:, None], -np.inf)
    P = np.exp(logits - logits.max(axis=-1, keepdims=True))
    P /= P.sum(axis=-1, keepdims=True)
    return P @ v


def mistaken_output(q, k, v, *, selector_head: int, protect_bos: bool, scale: float,
                    mistakes: Iterable[str] = (), budget: Optional[int] = None
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """The layer's output with the given mistakes, and the F it used.

    With ``budget``, each query attends only to what a ``budget``-slot buffer holds under the
    rule of § 6, as a decoding cache applies it: to the mistaken F (with ``no-shift``, to that F
    shifted, since a cache evicts before the new token selects), and ``bos-evicted`` lets it
    evict BOS.

    Returns
    -------
    out : (B, H, N, D); F : (B, N, N)
    """
    mistakes = set(mistakes)
    L_sel = scale * (q[:, selector_head] @ k[:, selector_head].swapaxes(-1, -2))
    F = mistaken_mask(L_sel, protect_bos, mistakes)
    visible = None
    if budget is not None:
        keep_bos = protect_bos and "bos-evicted" not in mistakes
        # A cache evicts before it sees the new token's selection, so without the shift it still
        # evicts by the shifted F (the no-shift F of the row before): only attention is affected.
        F_evict = F if "no-shift" not in mistakes else mistaken_mask(
            L_sel, protect_bos, mistakes - {"no-shift"})
        visible = eviction_mask(F_evict, budget, protect_bos=keep_bos)
    return masked_attention(q, k, v, F, scale, visible), F


def candidate_sets(labels: Sequence[str]) -> List[Tuple[str, ...]]:
    """Every set of one or two labels, singles first (the simplest explanation wins)."""
    singles = [(label,) for label in labels]
    pairs = list(itertools.combinations(labels, 2))
    return singles + pairs


def diagnose(labels: Sequence[str], matches: Callable[[Tuple[str, ...]], bool]
             ) -> Tuple[str, ...]:
    """The first set of at most two mistakes whose outputs ``matches`` the candidate's, or ().

    Parameters
    ----------
    labels : the mistakes that apply (``FORWARD_LABELS`` or ``CACHE_LABELS``)
    matches : called with a set of labels, True when the candidate's outputs equal the
        mistaken reference's within tolerance on every diagnosis case
    """
    for mistakes in candidate_sets(labels):
        if matches(mistakes):
            return mistakes
    return ()
