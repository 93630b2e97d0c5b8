"""The checks of a KV-cache factory ``make(batch, heads, head_dim, budget)`` whose object decodes
with ``step(q, k, v) -> out``, each (B, H, D), against the reference's pruned forward.

The rule a cache must follow (docs/kv-cache.md): the budget counts every held key including the
current token; when it is full, the held token with the largest F is evicted, the oldest on ties,
never BOS. Step i's output must then equal query i's output of
``selattn_reference.forward(q, k, v, budget=budget)``.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import numpy as np

from .conformance_calls import CandidateError, Caller, as_output
from .conformance_cases import Case, clear_decisions, decode_budgets, decode_cases, option_cases
from .conformance_convention import Convention
from .conformance_forward import Worst, case_atol, note
from .conformance_mistakes import CACHE_LABELS, diagnose, mistaken_output
from .conformance_report import CheckResult


class CacheRun:
    """A candidate cache factory, how to call it, and the decodes collected for the diagnosis."""

    def __init__(self, make: Callable, convention: Convention, caller: Caller):
        self.make = make
        self.convention = convention
        self.caller = caller
        self.collected: List[Tuple[Case, int, np.ndarray]] = []   # (case, budget, outs)

    def decode(self, case: Case, budget: int) -> np.ndarray:
        """A fresh cache of ``budget`` slots steps through ``case``: outs (B, H, N, D)."""
        call = self.convention.prepare(case)
        B, H, N, D = case.shape
        what = f"make({B}, {H}, {D}, {budget})"
        cache = self.caller.call(what, self.make, B, H, D, budget, **call.kwargs)
        step = getattr(cache, "step", None)
        if not callable(step):
            raise CandidateError(f"{what} returned {type(cache).__name__}, which has no "
                                 "step(q, k, v) method")
        q, k, v = call.args
        outs = np.empty((B, H, N, D))
        for i in range(N):
            what = f"case {case.name}, budget {budget}: step {i}"
            out = self.caller.call(what, step, *(np.array(x[:, :, i]) for x in (q, k, v)))
            outs[:, :, i] = as_output(out, what, (B, H, D))
        return call.undo(outs)


def check_call(run: CacheRun) -> CheckResult:
    check = CheckResult("call", "make(1, 2, 4, 3), then 5 steps")
    case = decode_cases()[0]
    small = Case("first-call", *(x[:1, :2, :5] for x in (case.q, case.k, case.v)))
    try:
        run.decode(small, 3)
        check.found = "each step a finite float array of shape (1, 2, 4)"
    except CandidateError as exc:
        check.fail(str(exc))
    return check


def _compare(check: CheckResult, worst: Worst, case: Case, budget: int, outs: np.ndarray
             ) -> None:
    expected, cache = case.reference(budget=budget)
    diff = np.abs(outs - expected)
    atol = case_atol(case, cache.F)
    if not worst.add(float(diff.max()), atol):
        step = int(np.flatnonzero(diff.max(axis=(0, 1, 3)) > atol)[0])
        note(check, f"case {case.name}, budget {budget}: step {step} differs by "
                    f"{float(diff[:, :, step].max()):.3g} (tolerance {atol:.2g})")


def check_decode(run: CacheRun) -> CheckResult:
    cases = decode_cases()
    N = cases[0].shape[2]
    budgets = decode_budgets(N)
    check = CheckResult("decode", f"{len(cases)} sequences of {N} tokens (random, ties) x "
                        "budgets " + ", ".join(map(str, budgets)) + ", a fresh cache each: every "
                        "step against the reference's pruned forward")
    worst, ran, unclear = Worst(), 0, 0
    for case in cases:
        for budget in budgets:
            if not clear_decisions(case, budget):
                unclear += 1
                continue
            try:
                outs = run.decode(case, budget)
            except CandidateError as exc:
                note(check, str(exc))
                continue
            ran += 1
            run.collected.append((case, budget, outs))
            _compare(check, worst, case, budget, outs)
    if check.status != "FAIL":
        check.found = worst.summary(ran, "decodes")
        if unclear:
            check.found += f" ({unclear} left out: a near-tie float32 could decide either way)"
    return check


def check_bos_budget(run: CacheRun) -> CheckResult:
    """Without the reference: with one-hot values a step's output is its attention weights, so it
    shows which tokens the cache holds."""
    case = Case("held-probe", *(x for x in _probe_arrays()))
    budgets = (2, 4)
    check = CheckResult("bos-budget", "one-hot values show what each step attends to, budgets "
                        + ", ".join(map(str, budgets)) + ": BOS, itself, at most budget tokens")
    e = case_atol(case, case.reference()[1].F)
    for budget in budgets:
        try:
            P = run.decode(case, budget)[0]                            # (H, N, N)
        except CandidateError as exc:
            note(check, str(exc))
            continue
        for i in range(P.shape[1]):
            held = np.flatnonzero((P[:, i] > e).any(axis=0))
            if 0 not in held:
                note(check, f"budget {budget}, step {i}: BOS is no longer attended to (evicted)")
            if i not in held:
                note(check, f"budget {budget}, step {i}: the current token is not attended to")
            if len(held) > budget:
                note(check, f"budget {budget}, step {i}: attends to {len(held)} tokens "
                            f"({', '.join(map(str, held))}); the budget counts every held key, "
                            "the current token included")
    if check.status != "FAIL":
        check.found = "BOS and the current token always held, never more than the budget"
    return check


def _probe_arrays(N: int = 10) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys and queries with selector logits of order 1 and one-hot values (D = N)."""
    rng = np.random.default_rng(9)
    q = 0.5 * rng.standard_normal((1, 2, N, N))
    k = rng.standard_normal((1, 2, N, N))
    v = np.broadcast_to(np.eye(N), (1, 2, N, N)).copy()
    return q, k, v


def check_options(run: CacheRun) -> CheckResult:
    cases = option_cases()
    check = CheckResult("options", f"{len(cases)} sequences, budgets 3 and N, the options "
                        "passed to make() by name: " + run.convention.describe())
    if not run.convention.takes_options:
        check.skip("other heads and scales were still run, by permuting heads and "
                   "rescaling q")
        return check
    worst, ran = Worst(), 0
    for case in cases:
        if not run.convention.can_run(case):
            continue
        for budget in (3, case.shape[2]):
            if not clear_decisions(case, budget):
                continue
            try:
                outs = run.decode(case, budget)
            except CandidateError as exc:
                note(check, str(exc))
                continue
            ran += 1
            run.collected.append((case, budget, outs))
            _compare(check, worst, case, budget, outs)
    if check.status != "FAIL":
        check.found = worst.summary(ran, "decodes")
    return check


def diagnose_cache(run: CacheRun) -> Tuple[str, ...]:
    """The known mistakes (at most two) that reproduce the candidate's decodes."""
    if len(run.collected) < 3:
        return ()

    def matches(mistakes) -> bool:
        for case, budget, outs in run.collected:
            expected, F = mistaken_output(case.q, case.k, case.v,
                                          selector_head=case.selector_head,
                                          protect_bos=case.protect_bos, scale=case.scale,
                                          mistakes=mistakes, budget=budget)
            atol = case_atol(case, np.maximum(np.abs(F), case.reference()[1].F))
            if np.abs(outs - expected).max() > atol:
                return False
        return True

    return diagnose(CACHE_LABELS, matches)


CACHE_CHECKS = (check_call, check_decode, check_bos_budget, check_options)
