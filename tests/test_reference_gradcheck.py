"""``backward`` against centred finite differences of ``forward``, in float64.

The loss is ``sum(out * dout)`` plus, when a memory-loss threshold tau is drawn, ``sum(mem)``
with ``mem = memory_loss(F, tau)``; the analytic gradient of the second term enters ``backward``
through ``dF = memory_loss_backward(1, F, tau)``.

The layer is only piecewise smooth: relu(selector logit) has a kink at 0, min(F, tau) at tau,
the max over rows of the memory loss where two rows tie, and a budgeted buffer changes its held
set where two F values cross. A centred difference straddling a kink measures neither one-sided
derivative, so inputs within a safety margin of a kink are skipped (``assume``), with the margin
derived from the largest change one finite-difference step can make. With a budget the analytic
gradient treats the held set as a constant, so an input whose held set differs at either end of
a step is skipped too, and so is one whose rank-penalty cuts (§ 10) or keys past them differ.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

from helpers import QKVCase, numerical_gradient, qkv_cases, rel_error, soft_signature
from selattn_reference import attention as A
from tolerances import FD_KINK_SAFETY, FD_MAX_REL_ERROR, FD_NOISE_FACTOR, FD_STEP

# Moderate inputs: logits of order 1..10, so the softmax is neither flat nor saturated and the
# gradients are well above the finite-difference noise.
FD_INPUT_SCALES = (0.5, 1.0, 2.0)
TAUS = st.sampled_from([0.5, 1.0, 2.0])


def small_cases(**fixed) -> st.SearchStrategy[QKVCase]:
    """Shapes small enough for one forward pass per perturbed entry (<= 3 * 2*3*7*4 entries)."""
    return qkv_cases(max_B=2, max_H=3, max_N=7, max_D=4, input_scales=FD_INPUT_SCALES, **fixed)


def assume_away_from_kinks(cache: A.Cache, q: np.ndarray, k: np.ndarray,
                           tau: Optional[float]) -> None:
    """Skip inputs where one step of size FD_STEP could cross a kink (see the module docstring)."""
    if not cache.selective:
        return  # F = 0 identically: no relu, and the memory loss is constant
    B, H, N, D = q.shape
    # One step in one entry of q (k) moves each scaled logit by at most |scale| * h * max|k| (|q|).
    dlogit = abs(cache.scale) * FD_STEP * max(np.abs(q).max(), np.abs(k).max())
    allowed = A.selection_constraints(N, cache.protect_bos)                      # (N, N)
    selector_logits = cache.L[:, cache.selector_head][:, allowed]                # (B, n_allowed)
    assume(np.all(np.abs(selector_logits) > FD_KINK_SAFETY * dlogit))
    if tau is None:
        return
    # F[i, j] sums at most N selector entries of column j, and a row of the memory loss sums N
    # terms of min(F, tau) / tau, so these bound how far F and a row sum move in one step.
    dF = N * dlogit
    drow = N * dF / tau
    causal = np.tri(N, dtype=bool)                                               # (N, N)
    kept = np.where(causal, 1.0 - np.minimum(cache.F, tau) / tau, 0.0)           # (B, N, N)
    row_sums = kept.sum(axis=-1)                                                 # (B, N)
    if N > 1:
        top_two = np.sort(row_sums, axis=-1)[:, -2:]                             # (B, 2)
        assume(np.all(top_two[:, 1] - top_two[:, 0] > 2 * FD_KINK_SAFETY * drow))  # unique max
    row = row_sums.argmax(axis=-1)                                               # (B,)
    near_tau = np.abs(cache.F[np.arange(B), row] - tau) <= FD_KINK_SAFETY * dF   # (B, N)
    assume(not (near_tau & causal[row]).any())


def gradient_errors(case: QKVCase, *, scale: Optional[float] = None,
                    budget: Optional[int] = None, tau: Optional[float] = None,
                    soft_budget: Optional[int] = None, soft_strength: float = 10.0
                    ) -> Dict[str, float]:
    """CS231n relative errors of backward against centred differences, for dq, dk and dv."""
    q, k, v = case.q.copy(), case.k.copy(), case.v.copy()
    B = q.shape[0]
    dout = np.random.default_rng(case.seed + 1).standard_normal(q.shape)        # (B, H, N, D)
    options = dict(case.options(), scale=scale, budget=budget, soft_budget=soft_budget,
                   soft_strength=soft_strength)
    _, cache = A.forward(q, k, v, **options)
    assume_away_from_kinks(cache, q, k, tau)

    dF = None if tau is None else A.memory_loss_backward(np.ones(B), cache.F, tau)
    analytic = A.backward(dout, cache, dF=dF)

    held_set_changed = []

    def loss_terms() -> np.ndarray:
        out, perturbed = A.forward(q, k, v, **options)
        if not np.array_equal(perturbed.visible, cache.visible):
            held_set_changed.append(True)
        if soft_signature(perturbed) != soft_signature(cache):   # a rank-penalty kink (§ 10)
            held_set_changed.append(True)
        terms = (out * dout).ravel()
        if tau is not None:
            terms = np.concatenate([terms, A.memory_loss(perturbed.F, tau)])
        return terms

    numeric = [numerical_gradient(loss_terms, x, FD_STEP) for x in (q, k, v)]
    assume(not held_set_changed)
    floor = fd_noise(cache, loss_terms()) / FD_MAX_REL_ERROR
    return {name: rel_error(a, n, floor)
            for name, a, n in zip(("dq", "dk", "dv"), analytic, numeric)}


def fd_noise(cache: A.Cache, terms: np.ndarray) -> float:
    """Rounding noise of one difference quotient: each loss term is computed to a relative error
    of about eps * (1 + max|L| + max F) (the softmax passes logit errors through with factor 1),
    and the quotient divides the difference of two such sums by 2h."""
    finite_L = cache.L[np.isfinite(cache.L)]
    condition = 1.0 + np.abs(finite_L).max() + cache.F.max()
    return FD_NOISE_FACTOR * np.finfo(np.float64).eps * condition * np.abs(terms).sum() / FD_STEP


def check_gradients(case: QKVCase, **options) -> None:
    """Assert that backward matches centred differences (see the module docstring)."""
    for name, error in gradient_errors(case, **options).items():
        assert error <= FD_MAX_REL_ERROR, f"{name}: relative error {error:.3g}"


@given(small_cases(), st.data())
def test_gradients_any_options(case, data):
    """Every option drawn at random, including explicit scales, budgets and the memory loss."""
    N = case.shape[2]
    check_gradients(
        case,
        scale=data.draw(st.sampled_from([None, 0.3, 1.0])),
        budget=data.draw(st.none() | st.integers(2, N + 1)),
        tau=data.draw(st.none() | TAUS),
    )


@given(small_cases(min_H=2, selective=True), st.data())
def test_gradients_selector_head_not_zero(case, data):
    H = case.shape[1]
    case = dataclasses.replace(case, selector_head=data.draw(st.integers(1, H - 1)))
    check_gradients(case)


@given(small_cases(min_N=3, selective=True, protect_bos=False))
def test_gradients_bos_unprotected(case):
    check_gradients(case)


@given(small_cases(min_N=3), st.data())
def test_gradients_budgeted(case, data):
    """With a budget below N some keys are evicted; their gradient must be exactly the pruned
    layer's (the held set is a constant of the forward pass)."""
    N = case.shape[2]
    smallest = 2 if case.protect_bos else 1
    check_gradients(case, budget=data.draw(st.integers(smallest, N - 1)))


@given(small_cases(min_N=2, selective=True), TAUS)
def test_gradients_memory_loss(case, tau):
    """The memory loss' gradient reaches q and k of the selector head only through dF."""
    check_gradients(case, tau=tau)


@given(small_cases(selective=False), st.none() | TAUS)
def test_gradients_not_selective(case, tau):
    """Standard causal attention; a dF passed in must contribute nothing (F is constant 0)."""
    check_gradients(case, tau=tau)


@given(small_cases(min_N=3), st.data())
def test_gradients_rank_penalty(case, data):
    """Pruning-aware training (§ 10): the gradient through the rank penalty, including the share
    each past key sends to its row's cut, with and without a budget and the memory loss."""
    N = case.shape[2]
    smallest = 2 if case.protect_bos else 1
    check_gradients(case, soft_budget=data.draw(st.integers(smallest, N - 1)),
                    soft_strength=data.draw(st.sampled_from([0.5, 3.0, 10.0])),
                    budget=data.draw(st.none() | st.integers(smallest, N + 1)),
                    tau=data.draw(st.none() | TAUS))
