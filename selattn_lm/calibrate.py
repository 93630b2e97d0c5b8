"""Greedy per-layer KV budget calibration (Leviathan et al. 2024, § "pruning"): start every layer
at the full context, then repeatedly apply the single-layer budget reduction that hurts the
held-out score least, as long as the model stays within a tolerance of the unpruned one.

The search only sees an abstract ``score(budgets) -> Score`` function, so it is tested on its own
with synthetic scores (tests/test_calibrate.py); ``selattn_lm.runner`` supplies the real one (exact-
match accuracy and answer loss of a checkpoint on held-out examples under per-layer budgets).

Why per layer and greedy: layers differ in how much context they need, so one budget for all
layers wastes memory; an exhaustive search over L budgets is exponential in L, while each greedy
round costs at most L x len(fractions) evaluations (and evaluations are memoised).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from selattn_reference.validation import check_budget, check_budgets

from .bounded_json import read_json_file
from .progress import progress_bar

# candidate budgets: these fractions of a layer's current budget. 0.9 lets the search end close
# to a layer's real need (with 0.5 and 0.75 alone, a layer at 43 can only try 32 or 21)
DEFAULT_FRACTIONS = (0.5, 0.75, 0.9)
DEFAULT_TOLERANCE = 0.005         # 0.5 accuracy points below the unpruned model
CRITERIA = ("accuracy", "loss")


@dataclass(frozen=True)
class Score:
    """How well the model does on the held-out examples under some budgets.

    accuracy : float in [0, 1], exact-match answer accuracy (higher is better)
    loss : float, mean cross-entropy on the answer tokens (lower is better; breaks accuracy ties)
    """

    accuracy: float
    loss: float = 0.0


@dataclass(frozen=True)
class Step:
    """One accepted reduction: ``layer`` went from ``old`` to ``new`` slots, scoring ``score``."""

    layer: int
    old: int
    new: int
    score: Score
    budgets: Tuple[int, ...]


@dataclass
class Calibration:
    """The result of ``greedy_calibrate``.

    budgets : per-layer budgets found (slots per layer)
    context : the full context (every layer's starting budget)
    unpruned : score with every layer at the full context
    final : score under ``budgets``
    steps : the accepted reductions, in order
    evaluations : how many distinct budget vectors were scored
    """

    budgets: List[int]
    context: int
    unpruned: Score
    final: Score
    steps: List[Step] = field(default_factory=list)
    evaluations: int = 0
    tolerance: float = DEFAULT_TOLERANCE
    criterion: str = "accuracy"
    fractions: Tuple[float, ...] = DEFAULT_FRACTIONS

    @property
    def kept_fraction(self) -> float:
        """Total budget over (layers x context): 1/8 or less is the paper's regime."""
        return sum(self.budgets) / (len(self.budgets) * self.context)

    def to_dict(self) -> Dict[str, object]:
        """A JSON-ready description (what ``write_budgets`` stores)."""
        return {
            "budgets": list(self.budgets),
            "context": self.context,
            "kept_fraction": self.kept_fraction,
            "criterion": self.criterion,
            "tolerance": self.tolerance,
            "fractions": list(self.fractions),
            "unpruned": asdict(self.unpruned),
            "calibrated": asdict(self.final),
            "evaluations": self.evaluations,
            "steps": [{"layer": s.layer, "old": s.old, "new": s.new, **asdict(s.score)}
                      for s in self.steps],
        }


def _check_fractions(fractions) -> Tuple[float, ...]:
    try:
        fractions = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"fractions must be a sequence of numbers, got {fractions!r}") from exc
    if not fractions or not all(0.0 < f < 1.0 for f in fractions):
        raise ValueError(f"fractions must be a non-empty sequence of numbers in (0, 1), "
                         f"got {list(fractions)}")
    return tuple(sorted(set(fractions)))


def candidate_budgets(budget: int, fractions: Sequence[float], minimum: int) -> List[int]:
    """The reductions tried for one layer at ``budget``: ``floor(budget * f)`` for each fraction,
    raised to ``minimum``, without duplicates or non-reductions; smallest first."""
    out = {max(minimum, math.floor(budget * f)) for f in fractions}
    return sorted(b for b in out if b < budget)


def _better(criterion: str, a: Score, b: Score) -> bool:
    """True when score ``a`` hurts less than ``b`` (accuracy, then loss; or loss, then accuracy)."""
    if criterion == "accuracy":
        return (a.accuracy, -a.loss) > (b.accuracy, -b.loss)
    return (-a.loss, a.accuracy) > (-b.loss, b.accuracy)


def _acceptable(criterion: str, s: Score, unpruned: Score, tolerance: float) -> bool:
    """Within ``tolerance`` of the unpruned model (1e-12 absorbs the rounding of n_correct / n)."""
    if criterion == "accuracy":
        return s.accuracy >= unpruned.accuracy - tolerance - 1e-12
    return s.loss <= unpruned.loss + tolerance + 1e-12


def greedy_calibrate(score: Callable[[Tuple[int, ...]], Score], n_layers: int, context: int, *,
                     tolerance: float = DEFAULT_TOLERANCE, criterion: str = "accuracy",
                     fractions: Sequence[float] = DEFAULT_FRACTIONS, minimum: int = 2,
                     log: Optional[Callable[[str], None]] = None) -> Calibration:
    """Greedy per-layer budget search.

    Start with every layer at ``context`` slots. Each round scores, for every layer, the budgets
    ``floor(current * f)`` for ``f`` in ``fractions`` (other layers unchanged), keeps the
    candidates that stay within ``tolerance`` of the unpruned score and applies the one that hurts
    least (ties: the larger saving, then the lower layer). It stops when no candidate is
    acceptable or every layer is at ``minimum``.

    Parameters
    ----------
    score : callable, budgets (tuple of n_layers ints) -> Score; called once per distinct tuple
    n_layers : int >= 1
    context : int, the full context (the unpruned budget of every layer)
    tolerance : float >= 0, allowed drop of accuracy (criterion "accuracy", e.g. 0.005 = 0.5
        points) or allowed rise of the loss (criterion "loss", in nats)
    criterion : "accuracy" (tie-break by loss) or "loss" (tie-break by accuracy)
    fractions : fractions in (0, 1) of the current budget to try
    minimum : int, the smallest budget a layer may get (2: BOS and the current token)
    log : callable taking one line of progress, or None (stderr, below a progress bar of the
        evaluations on a terminal)

    Returns
    -------
    Calibration with the budgets, the unpruned and final scores and the accepted steps.
    """
    for name, x in (("n_layers", n_layers), ("context", context), ("minimum", minimum)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    check_budget(minimum, protect_bos=True)      # the KV cache's own minimum (BOS + current)
    if context < minimum:
        raise ValueError(f"context {context} is smaller than the minimum budget {minimum}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"tolerance must be a number, got {type(tolerance).__name__}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    fractions = _check_fractions(fractions)
    bar = progress_bar(desc="calibrate", unit="evaluation", quiet=log is not None)
    log = log or (lambda line: bar.write(line, file=sys.stderr))

    memo: Dict[Tuple[int, ...], Score] = {}

    def evaluate(budgets: Tuple[int, ...]) -> Score:
        if budgets not in memo:
            s = score(budgets)
            if not isinstance(s, Score):
                raise TypeError(f"score must return a Score, got {type(s).__name__}")
            memo[budgets] = s
            bar.update(1)
        return memo[budgets]

    budgets = (context,) * n_layers
    unpruned = evaluate(budgets)
    log(f"calibrate: unpruned accuracy {unpruned.accuracy:.4f} loss {unpruned.loss:.4f}, "
        f"{n_layers} layers x {context} slots, tolerance {tolerance:g} ({criterion})")
    current, steps = unpruned, []
    while True:
        best = None   # (score, layer, new budget)
        for layer in range(n_layers):
            for new in candidate_budgets(budgets[layer], fractions, minimum):
                trial = budgets[:layer] + (new,) + budgets[layer + 1:]
                s = evaluate(trial)
                if not _acceptable(criterion, s, unpruned, tolerance):
                    continue
                if (best is None or _better(criterion, s, best[0])
                        or (s == best[0] and new - budgets[layer] < best[2] - budgets[best[1]])):
                    best = (s, layer, new)
        if best is None:
            break
        s, layer, new = best
        old = budgets[layer]
        budgets = budgets[:layer] + (new,) + budgets[layer + 1:]
        current = s
        steps.append(Step(layer=layer, old=old, new=new, score=s, budgets=budgets))
        log(f"calibrate: step {len(steps):2d}: layer {layer} {old:4d} -> {new:4d} slots, "
            f"accuracy {s.accuracy:.4f} loss {s.loss:.4f}, budgets {list(budgets)} "
            f"({sum(budgets) / (n_layers * context):.3f} of the full cache, "
            f"{len(memo)} evaluations)")
    log(f"calibrate: done: budgets {list(budgets)}, accuracy {current.accuracy:.4f} "
        f"(unpruned {unpruned.accuracy:.4f}), {len(memo)} evaluations")
    bar.close()
    return Calibration(budgets=list(budgets), context=context, unpruned=unpruned, final=current,
                       steps=steps, evaluations=len(memo), tolerance=float(tolerance),
                       criterion=criterion, fractions=fractions)


# ----------------------------------------------------------------------------------------------
# The budgets file


def write_budgets(path, calibration: Calibration, meta: Optional[Dict[str, object]] = None) -> None:
    """Write ``calibration`` (plus ``meta``, e.g. the checkpoint's file name and the held-out
    set) as indented JSON to ``path``."""
    data = dict(meta or {})
    data.update(calibration.to_dict())
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_budgets(path, n_layers: int) -> List[int]:
    """Read the ``budgets`` of a file written by ``write_budgets`` and check them against a model
    of ``n_layers`` layers. Raises ValueError naming the file when it is missing or malformed,
    larger than 1 MiB, nested too deep or holds absurd numbers (``bounded_json``)."""
    data = read_json_file(path, "budgets file")    # bounded size and nesting, no traceback
    if not isinstance(data, dict) or "budgets" not in data:
        raise ValueError(f"budgets file {str(path)!r} has no 'budgets' entry")
    try:
        budgets = check_budgets(data["budgets"], n_layers)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"budgets file {str(path)!r}: {exc}") from None
    if any(b is None for b in budgets):
        raise ValueError(f"budgets file {str(path)!r}: every layer needs an int budget")
    return budgets
