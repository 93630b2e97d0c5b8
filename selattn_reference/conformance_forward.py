"""The checks of a forward function ``fn(q, k, v) -> out`` against the reference.

Each ``check_*`` runs one idea on the candidate through a ``ForwardRun`` (which calls it safely
and in its convention) and returns a ``CheckResult``; ``diagnose_forward`` then tries the known
mistakes on the outputs the random check collected.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import numpy as np

from .attention import backward
from .conformance_calls import CandidateError, Caller, as_output
from .conformance_cases import (
    Case,
    causality_case,
    load_golden,
    option_cases,
    probe_case,
    random_cases,
)
from .conformance_convention import Convention
from .conformance_mistakes import FORWARD_LABELS, diagnose, mistaken_output
from .conformance_report import CheckResult
from .conformance_tolerances import INVARIANT_MIN_WEIGHT, gradient_atol, output_atol

MAX_LINES = 12   # findings listed per check (the count of the rest is given)


class ForwardRun:
    """A candidate forward function, how to call it, and the outputs collected so far.

    Parameters
    ----------
    fn : the candidate, ``fn(q, k, v, **options) -> out``; may have a ``gradients(q, k, v, dout,
        **options) -> (dq, dk, dv)`` method (the torch adapter)
    convention : the names of its options
    caller : the time-limited caller
    """

    def __init__(self, fn: Callable, convention: Convention, caller: Caller):
        self.fn = fn
        self.convention = convention
        self.caller = caller
        self.collected: List[Tuple[Case, np.ndarray]] = []   # (case, out) for the diagnosis

    def output(self, case: Case) -> np.ndarray:
        """The candidate's output on ``case`` (float64, the case's head order)."""
        call = self.convention.prepare(case)
        what = f"case {case.name} {case.shape}"
        out = as_output(self.caller.call(what, self.fn, *call.args, **call.kwargs), what,
                        case.shape)
        return call.undo(out)

    def gradients(self, case: Case, dout: np.ndarray) -> Tuple[np.ndarray, ...]:
        """The candidate's (dq, dk, dv) of ``sum(out * dout)`` on ``case``."""
        call = self.convention.prepare(case)
        what = f"gradients of case {case.name} {case.shape}"
        grads = self.caller.call(what, self.fn.gradients, *call.args, call.undo(dout),
                                 **call.kwargs)
        if not isinstance(grads, tuple) or len(grads) != 3:
            raise CandidateError(f"{what}: expected (dq, dk, dv)")
        dq, dk, dv = (call.undo(as_output(g, f"{what} ({name})", case.shape))
                      for g, name in zip(grads, ("dq", "dk", "dv")))
        return call.q_factor * dq, dk, dv


def case_atol(case: Case, F: np.ndarray) -> float:
    """The output tolerance of ``case`` given the mask F it uses (conformance_tolerances)."""
    B, H, N, D = case.shape
    return output_atol(case.logit_max(), float(np.abs(F).max()), N, D,
                       float(np.abs(case.v).max()))


class Worst:
    """Tracks the largest error relative to its tolerance, for a passing check's summary."""

    def __init__(self) -> None:
        self.ratio, self.error = 0.0, 0.0

    def add(self, error: float, atol: float) -> bool:
        """Record one comparison; True when it is within the tolerance."""
        if atol > 0 and error / atol > self.ratio:
            self.ratio, self.error = error / atol, error
        return error <= atol

    def summary(self, count: int, what: str) -> str:
        return (f"{count} {what}; largest error {self.error:.2g} "
                f"({self.ratio:.2g} of its float32 tolerance)")


def note(check: CheckResult, line: str) -> None:
    """A failure line, the first MAX_LINES of them in full."""
    if len(check.findings) < MAX_LINES:
        check.fail(line)
    else:
        check.status = "FAIL"
        check.findings.append(line)


def check_call(run: ForwardRun) -> CheckResult:
    check = CheckResult("call", "one call on a small input (B, H, N, D) = (1, 2, 6, 4)")
    case = random_cases()[0]
    small = Case("first-call", case.q[:1, :2, :6, :4], case.k[:1, :2, :6, :4],
                 case.v[:1, :2, :6, :4])
    try:
        run.output(small)
        check.found = "a finite float array of shape (1, 2, 6, 4)"
    except CandidateError as exc:
        check.fail(str(exc))
    return check


def check_shapes(run: ForwardRun) -> CheckResult:
    shapes = ((1, 1, 1, 1), (1, 1, 9, 3), (3, 2, 1, 4), (2, 2, 6, 1), (2, 5, 7, 3), (1, 2, 64, 8))
    check = CheckResult("shapes", f"{len(shapes)} shapes (B, H, N, D) from (1, 1, 1, 1) to "
                        "(1, 2, 64, 8): shape and finiteness of out")
    rng = np.random.default_rng(5)
    for shape in shapes:
        case = Case("shape", *(rng.standard_normal(shape) for _ in range(3)))
        try:
            run.output(case)
        except CandidateError as exc:
            note(check, str(exc))
    if check.status != "FAIL":
        check.found = "each returned as (B, H, N, D), finite"
    return check


def compare(check: CheckResult, worst: Worst, case: Case, out: np.ndarray,
            expected: np.ndarray, F: np.ndarray, what: str = "out") -> None:
    error = float(np.abs(out - expected).max())
    atol = case_atol(case, F)
    if not worst.add(error, atol):
        b, h, i, d = np.unravel_index(int(np.abs(out - expected).argmax()), out.shape)
        note(check, f"case {case.name}: {what} differs by {error:.3g} (tolerance {atol:.2g}), "
                    f"worst at batch {b}, head {h}, query {i}")


def check_golden(run: ForwardRun) -> CheckResult:
    golden = load_golden()
    check = CheckResult("golden", f"{len(golden)} golden vectors (an independent float64 "
                        "implementation of the listing): out")
    worst, ran, skipped = Worst(), 0, []
    for case in golden:
        if not run.convention.can_run(case):
            skipped.append(case.name)
            continue
        try:
            out = run.output(case)
        except CandidateError as exc:
            note(check, str(exc))
            continue
        ran += 1
        compare(check, worst, case, out, case.expected["out"], case.reference()[1].F)
    if check.status != "FAIL":
        if ran == 0:
            check.skip("no golden case could run")
        else:
            check.found = worst.summary(ran, "cases")
            if skipped:
                check.found += ("; not run (BOS unprotected, no option for it): "
                                + ", ".join(skipped))
    return check


def check_random(run: ForwardRun) -> CheckResult:
    cases = random_cases()
    check = CheckResult("random", f"{len(cases)} random cases against the reference: inputs "
                        "x0.1 to x10 (logits to ~100), N 1-40, D 1-16, H 1-4, ties, selector "
                        "head 2, scale 0.7")
    worst = Worst()
    for case in cases:
        try:
            out = run.output(case)
        except CandidateError as exc:
            note(check, str(exc))
            continue
        run.collected.append((case, out))
        expected, cache = case.reference()
        compare(check, worst, case, out, expected, cache.F)
    if check.status != "FAIL":
        check.found = worst.summary(len(cases), "cases")
    return check


def check_options(run: ForwardRun) -> CheckResult:
    cases = option_cases()
    check = CheckResult("options", f"{len(cases)} cases passing the options by name: "
                        + run.convention.describe())
    if not run.convention.takes_options:
        check.skip("other heads and scales were still run, by permuting heads and "
                   "rescaling q")
        return check
    worst, ran = Worst(), 0
    for case in cases:
        if not run.convention.can_run(case):
            continue
        try:
            out = run.output(case)
        except CandidateError as exc:
            note(check, str(exc))
            continue
        ran += 1
        run.collected.append((case, out))
        expected, cache = case.reference()
        compare(check, worst, case, out, expected, cache.F)
    if check.status != "FAIL":
        check.found = worst.summary(ran, "cases")
    return check


def check_causality(run: ForwardRun) -> CheckResult:
    case = causality_case()
    cuts = (0, 5, 11)
    check = CheckResult("causality", "q, k, v changed after position t = "
                        + ", ".join(map(str, cuts)) + ": out up to t must not move")
    try:
        base = run.output(case)
    except CandidateError as exc:
        check.fail(str(exc))
        return check
    atol = case_atol(case, case.reference()[1].F)
    rng = np.random.default_rng(6)
    worst = 0.0
    for t in cuts:
        changed = [x.copy() for x in (case.q, case.k, case.v)]
        for x in changed:
            x[:, :, t + 1:] = 3.0 * rng.standard_normal(x[:, :, t + 1:].shape)
        try:
            out = run.output(Case(f"causality-after-{t}", *changed))
        except CandidateError as exc:
            note(check, str(exc))
            continue
        moved = float(np.abs(out[:, :, :t + 1] - base[:, :, :t + 1]).max())
        worst = max(worst, moved)
        if moved > atol:
            first = int(np.flatnonzero(np.abs(out - base).max(axis=(0, 1, 3)) > atol)[0])
            note(check, f"changing tokens after {t} moved the output of query {first} by "
                        f"{moved:.3g}: a query sees the future")
    if check.status != "FAIL":
        check.found = f"the past moved by at most {worst:.2g} (tolerance {atol:.2g})"
    return check


def check_bos_self(run: ForwardRun) -> CheckResult:
    """BOS, self and the previous token are never masked; F is shared by the heads, >= 0, and
    never decreases down a column. Read off the attention weights (one-hot values), with no
    reference: ``P[i, j] / P[i, i] = exp(L[i, j] - L[i, i] - F[i, j] + F[i, i])``."""
    case = probe_case()
    check = CheckResult("bos-self", "attention weights read off one-hot values: BOS, self "
                        "and previous token unmasked; F >= 0, shared, non-decreasing")
    try:
        P = run.output(case)[0]                                     # (H, N, N)
    except CandidateError as exc:
        check.fail(str(exc))
        return check
    H, N, _ = P.shape
    L = case.scale * (case.q[0] @ case.k[0].swapaxes(-1, -2))       # (H, N, N)
    e = case_atol(case, case.reference()[1].F)                      # absolute error of a weight
    future = np.triu(np.ones((N, N), dtype=bool), k=1)
    if np.abs(P[:, future]).max() > e:
        note(check, "weight on future keys (query i attends to a key j > i)")
    diag_P = np.diagonal(P, axis1=1, axis2=2)[..., None]            # (H, N, 1)
    ratio = np.exp(L - np.diagonal(L, axis1=1, axis2=2)[..., None])  # (H, N, N) if F were 0
    rows = np.arange(N)
    for name, i, j in (("BOS", rows[1:], np.zeros(N - 1, dtype=int)),
                       ("the previous token", rows[2:], rows[1:-1])):
        for h in range(H):
            expected = diag_P[h, i, 0] * ratio[h, i, j]
            bad = np.abs(P[h, i, j] - expected) > e * (1.0 + ratio[h, i, j])
            for r in np.flatnonzero(bad)[:2]:
                with np.errstate(divide="ignore"):
                    implied = float(np.log(expected[r] / max(P[h, i[r], j[r]], 1e-300)))
                note(check, f"query {i[r]}, head {h}: {name} (key {j[r]}) is masked relative "
                            f"to the query itself: F[{i[r]}, {j[r]}] - F[{i[r]}, {i[r]}] = "
                            f"{implied:.3g}, must be 0")
    # F recovered from the usable weights: (L[i, j] - L[i, i]) - log(P[i, j] / P[i, i])
    usable = (P >= INVARIANT_MIN_WEIGHT) & (diag_P >= INVARIANT_MIN_WEIGHT) & np.tri(N, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        Fh = np.log(ratio) - np.log(np.maximum(P, 1e-300) / np.maximum(diag_P, 1e-300))
        err = e / np.maximum(P, 1e-300) + e / np.maximum(diag_P, 1e-300)
    both = usable.all(axis=0)                                       # (N, N)
    spread = (np.abs(Fh[:1] - Fh) - err - err[:1]).max(axis=0)
    if (both & (spread > 0)).any():
        i, j = np.argwhere(both & (spread > 0))[0]
        note(check, f"the heads subtract different masks at query {i}, key {j}: F must be "
                    "shared")
    negative = usable[0] & (Fh[0] < -err[0])
    if negative.any():
        i, j = np.argwhere(negative)[0]
        note(check, f"F[{i}, {j}] = {Fh[0, i, j]:.3g} < 0: a mask raised a logit")
    down = usable[0, 1:] & usable[0, :-1]
    fall = down & (Fh[0, 1:] < Fh[0, :-1] - err[0, 1:] - err[0, :-1])
    if fall.any():
        i, j = np.argwhere(fall)[0]
        note(check, f"F decreases down column {j} (query {i} to {i + 1}): masks must persist")
    if check.status != "FAIL":
        check.found = f"every invariant holds on {H} heads x {N} queries"
    return check


def check_gradients(run: ForwardRun) -> CheckResult:
    golden = [c for c in load_golden() if run.convention.can_run(c)]
    randoms = [c for c in random_cases(seed=7) if not c.near_relu_kink()
               and c.q.shape[2] > 1][:8]
    check = CheckResult("gradients", f"dq, dk, dv of sum(out * dout): {len(golden)} golden, "
                        f"{len(randoms)} random cases")
    if not hasattr(run.fn, "gradients"):
        check.skip("a NumPy function (the torch adapter checks gradients)")
        return check
    rng = np.random.default_rng(8)
    worst, ran = Worst(), 0
    for case in golden + randoms:
        if case.near_relu_kink():
            continue
        if case.expected:
            dout = case.expected["dout"]
            expected = tuple(case.expected[n] for n in ("dq", "dk", "dv"))
        else:
            dout = rng.standard_normal(case.shape)
            expected = backward(dout, case.reference()[1])
        try:
            grads = run.gradients(case, dout)
        except CandidateError as exc:
            note(check, str(exc))
            continue
        ran += 1
        F = case.reference()[1].F
        B, H, N, D = case.shape
        vmax, dmax = float(np.abs(case.v).max()), float(np.abs(dout).max())
        natural = (case.scale * np.abs(case.k).max() * dmax * vmax,
                   case.scale * np.abs(case.q).max() * dmax * vmax, dmax)
        for name, got, want, size in zip(("dq", "dk", "dv"), grads, expected, natural):
            atol = gradient_atol(case.logit_max(), float(F.max()), N, D,
                                 max(size, float(np.abs(want).max())))
            error = float(np.abs(got - want).max())
            if not worst.add(error, atol):
                note(check, f"case {case.name}: {name} differs by {error:.3g} "
                            f"(tolerance {atol:.2g})")
    if check.status != "FAIL":
        check.found = worst.summary(ran, "cases")
    return check


def diagnose_forward(run: ForwardRun) -> Tuple[str, ...]:
    """The known mistakes (at most two) that reproduce the candidate's random-case outputs."""
    usable = [(c, out) for c, out in run.collected
              if c.q.shape[2] >= 8 and np.abs(c.q).max() < 10.0]
    if len(usable) < 3:
        return ()

    def matches(mistakes) -> bool:
        for case, out in usable:
            expected, F = mistaken_output(case.q, case.k, case.v,
                                          selector_head=case.selector_head,
                                          protect_bos=case.protect_bos, scale=case.scale,
                                          mistakes=mistakes)
            atol = case_atol(case, np.maximum(np.abs(F), case.reference()[1].F))
            if np.abs(out - expected).max() > atol:
                return False
        return True

    return diagnose(FORWARD_LABELS, matches)


FORWARD_CHECKS = (check_call, check_shapes, check_golden, check_causality, check_bos_self,
                  check_random, check_options, check_gradients)
