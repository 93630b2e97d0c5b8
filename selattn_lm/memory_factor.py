"""The equal-perplexity memory factor (Leviathan et al. 2024): by how much the selective
model's KV memory can shrink while its bits per byte stay at or below the standard model's with
the full cache.

Definitions. A *candidate* is a set of per-layer budgets (slots per layer); its memory is their
sum, the full cache's ``context x n_layers``. Given candidates ordered by strictly decreasing
memory, index 0 the full cache, a score (test bits per byte under those budgets) and a target
(the standard model's full-cache bits per byte), the *equal-perplexity point* is the candidate
i* found by ``equal_quality_point``: its score is <= target, the next candidate's (i* + 1) is
above it (or i* is the last candidate), and every candidate evaluated on the way with a larger
memory also scored <= target. The memory factor is ``full memory / memory(i*)``; None when the
full cache already scores above the target (the selective model never reaches the standard
one).

The search gallops, then bisects: from the full cache it jumps to the first candidate with at
most half the memory of the last passing one, until a candidate fails (or the last passes); then
it bisects between the last pass and the first failure down to adjacent candidates. When the
score rises monotonically as memory falls, i* is exactly the largest reduction among the
candidates; otherwise it is a point where the curve crosses the target with every evaluated
larger memory below it (the evaluated scores are returned, so a reader can see the curve it
sampled). About 2 log2(len) evaluations.

The two candidate lists of the study:

- ``uniform_candidates``: the same budget K in every layer, K = context, context - 1, ..., 2:
  resolution one slot; factor ``context / K``.
- greedy per-layer budgets: the path of ``selattn_lm.text_results.search_path`` (the greedy search
  of ``selattn_lm.calibrate`` on the validation split, one layer's budget cut per step):
  resolution one step of that search; factor ``context x n_layers / sum(budgets)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

Budgets = Tuple[int, ...]


@dataclass(frozen=True)
class EqualQualityPoint:
    """The result of ``equal_quality_point``.

    index : int or None, the chosen candidate (None: even the full cache is above the target)
    budgets : its per-layer budgets, or None
    memory : its total slots, or None
    full_memory : the full cache's total slots (candidate 0)
    score : its score, or None
    target : the target score
    evaluated : [(index, score)] of every candidate scored, in the order of evaluation
    """

    index: Optional[int]
    budgets: Optional[Budgets]
    memory: Optional[int]
    full_memory: int
    score: Optional[float]
    target: float
    evaluated: List[Tuple[int, float]] = field(default_factory=list)

    @property
    def factor(self) -> Optional[float]:
        """Full memory over the chosen candidate's, or None."""
        return None if self.memory is None else self.full_memory / self.memory

    def to_dict(self) -> dict:
        """JSON-able: the budgets, memory, factor, score, target and the evaluated points."""
        return {"budgets": None if self.budgets is None else list(self.budgets),
                "memory": self.memory, "full_memory": self.full_memory, "factor": self.factor,
                "test_bpb": self.score, "target": self.target,
                "evaluated": [[i, s] for i, s in self.evaluated]}


def _check_candidates(candidates: Sequence[Sequence[int]]) -> List[Budgets]:
    out: List[Budgets] = []
    for c in candidates:
        try:
            b = tuple(int(x) for x in c)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"candidates must be sequences of ints, got {c!r}") from exc
        if not b or any(x < 1 for x in b) or any(x != y for x, y in zip(b, c)):
            raise ValueError(f"candidates must be non-empty sequences of ints >= 1, got {c!r}")
        out.append(b)
    if not out:
        raise ValueError("candidates must not be empty")
    if len({len(b) for b in out}) != 1:
        raise ValueError("every candidate must have one budget per layer (the same length)")
    memories = [sum(b) for b in out]
    if any(a <= b for a, b in zip(memories, memories[1:])):
        raise ValueError(f"candidates must have strictly decreasing total memory, got "
                         f"{memories}")
    return out


def equal_quality_point(candidates: Sequence[Sequence[int]], score: Callable[[Budgets], float],
                        target: float) -> EqualQualityPoint:
    """The equal-perplexity point among ``candidates`` (see the module docstring).

    Parameters
    ----------
    candidates : sequence of per-layer budget tuples (n_layers ints each), strictly decreasing
        total memory, the first the full cache
    score : callable, budgets -> float (lower is better; test bits per byte); called once per
        evaluated candidate
    target : float, the score to stay at or below

    Returns
    -------
    EqualQualityPoint
    """
    cands = _check_candidates(candidates)
    if isinstance(target, bool) or not isinstance(target, (int, float)) \
            or not math.isfinite(target):
        raise ValueError(f"target must be a finite number, got {target!r}")
    memories = [sum(b) for b in cands]
    evaluated: List[Tuple[int, float]] = []
    scores = {}

    def passes(i: int) -> bool:
        if i not in scores:
            s = float(score(cands[i]))
            if not math.isfinite(s):
                raise ValueError(f"score of budgets {list(cands[i])} is not finite: {s}")
            scores[i] = s
            evaluated.append((i, s))
        return scores[i] <= target

    def result(i: Optional[int]) -> EqualQualityPoint:
        if i is None:
            return EqualQualityPoint(None, None, None, memories[0], None, float(target),
                                     evaluated)
        return EqualQualityPoint(i, cands[i], memories[i], memories[0], scores[i],
                                 float(target), evaluated)

    if not passes(0):
        return result(None)
    lo, hi = 0, None                          # lo passes; hi (when known) fails
    last = len(cands) - 1
    while hi is None and lo < last:           # gallop: halve the memory while it passes
        nxt = next((i for i in range(lo + 1, len(cands)) if memories[i] * 2 <= memories[lo]),
                   last)
        if passes(nxt):
            lo = nxt
        else:
            hi = nxt
    if hi is None:                            # the last candidate passes
        return result(lo)
    while hi - lo > 1:                        # bisect: lo passes, hi fails
        mid = (lo + hi) // 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return result(lo)


def uniform_candidates(context: int, n_layers: int, minimum: int = 2) -> List[Budgets]:
    """The same budget in every layer, from ``context`` down to ``minimum`` slots one at a
    time: [(context,) * n_layers, (context - 1,) * n_layers, ..., (minimum,) * n_layers]."""
    for name, x in (("context", context), ("n_layers", n_layers), ("minimum", minimum)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if n_layers < 1 or minimum < 2 or context < minimum:
        raise ValueError(f"need n_layers >= 1 and 2 <= minimum <= context, got n_layers "
                         f"{n_layers}, minimum {minimum}, context {context}")
    return [(K,) * n_layers for K in range(context, minimum - 1, -1)]
