"""The rank penalty of pruning-aware training (``selattn_reference.attention.rank_penalty``, § 10
of docs/selective-attention.md): what it changes, what it leaves alone, and that it never
changes what a pruned cache would keep. Its gradient is checked in test_reference_gradcheck.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import qkv_cases
from selattn_reference import attention as A
from tolerances import REORDERED_FLOAT64

STRENGTHS = st.sampled_from([0.0, 0.5, 10.0, 1e3])


def masks_and_budget(data, **fixed):
    case = data.draw(qkv_cases(max_N=40, max_D=8, selective=True, **fixed))
    _, cache = A.forward(case.q, case.k, case.v, **case.options())
    N = case.shape[2]
    return cache.F, data.draw(st.integers(1, N + 1)), case


@given(st.data(), STRENGTHS)
def test_only_keys_past_each_rows_cut_are_penalised(data, strength):
    """Row i < K has no cut and is unchanged. Row i >= K cuts at its K-th smallest F: keys at or
    below the cut keep their F (at least K of them), keys above it get strength * (F - cut)."""
    F, K, _ = masks_and_budget(data)
    F_soft, cut = A.rank_penalty(F, K, strength)
    B, N, _ = F.shape
    for b in range(B):
        for i in range(N):
            row, soft = F[b, i, :i + 1], F_soft[b, i, :i + 1]
            if i < K:
                assert cut[b, i] == -1
                np.testing.assert_array_equal(soft, row)
                continue
            j = cut[b, i]
            assert 0 <= j <= i
            theta = F[b, i, j]
            assert theta == np.sort(row)[K - 1]
            below = row <= theta
            assert below.sum() >= K
            np.testing.assert_array_equal(soft[below], row[below])
            np.testing.assert_allclose(soft[~below], row[~below] + strength * (row[~below] - theta),
                                       rtol=1e-15)
    np.testing.assert_array_equal(np.triu(F_soft, 1), np.triu(F, 1))   # above the diagonal


@given(st.data(), STRENGTHS)
def test_the_penalty_keeps_every_rows_order_so_eviction_is_unchanged(data, strength):
    """F_soft is a strictly increasing function of F within each row, so the eviction rule of § 6
    (which compares F within a row) keeps exactly the same keys under F_soft."""
    F, K, case = masks_and_budget(data)
    F_soft, _ = A.rank_penalty(F, K, strength)
    budget = max(K, 2 if case.protect_bos else 1)
    np.testing.assert_array_equal(A.eviction_mask(F_soft, budget, protect_bos=case.protect_bos),
                                  A.eviction_mask(F, budget, protect_bos=case.protect_bos))


@given(st.data())
def test_no_penalty_for_a_budget_of_n_or_strength_zero(data):
    """soft_budget >= N (no row has to drop) and strength 0 give the plain layer, bit for bit."""
    case = data.draw(qkv_cases(max_N=40, max_D=8))
    N = case.shape[2]
    smallest = 2 if case.protect_bos else 1
    plain, _ = A.forward(case.q, case.k, case.v, **case.options())
    for soft_budget, strength in ((max(N, smallest), 10.0), (N + 3, 1.0),
                                  (data.draw(st.integers(smallest, N + 1)), 0.0)):
        out, cache = A.forward(case.q, case.k, case.v, **case.options(),
                               soft_budget=soft_budget, soft_strength=strength)
        np.testing.assert_array_equal(out, plain)


@given(st.data())
def test_the_penalty_lowers_the_weight_of_keys_past_the_cut(data):
    """With a penalty the softmax weight of a key past its row's cut can only go down relative
    to any key at or below the cut, in every head (the mask of the first grew, that of the second
    did not)."""
    case = data.draw(qkv_cases(max_N=24, max_D=8, selective=True, min_N=3))
    N = case.shape[2]
    K = data.draw(st.integers(2, N - 1))
    _, plain = A.forward(case.q, case.k, case.v, **case.options())
    _, soft = A.forward(case.q, case.k, case.v, **case.options(), soft_budget=K)
    _, cut = A.rank_penalty(plain.F, K)
    for b, i in zip(*np.nonzero(cut >= 0)):
        theta = plain.F[b, i, cut[b, i]]
        past = plain.F[b, i, :i + 1] > theta
        if past.any() and (~past).any():
            with np.errstate(divide="ignore", invalid="ignore"):   # weights that underflow to 0
                gap_plain = np.log(plain.P[b, :, i, :i + 1])
                gap_soft = np.log(soft.P[b, :, i, :i + 1])
                change = gap_soft - gap_plain       # (H, i + 1), minus each head's log-normaliser
            finite = np.isfinite(change)
            worst_past = np.where(finite & past, change, -np.inf).max(axis=-1)     # (H,)
            best_kept = np.where(finite & ~past, change, np.inf).min(axis=-1)      # (H,)
            assert np.all(worst_past <= best_kept + REORDERED_FLOAT64 * (1 + np.abs(best_kept)))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(soft_budget=1), ValueError, "budget 1 is too small"),
    (dict(soft_budget=2.5), TypeError, "budget must be an int"),
    (dict(soft_budget=3, soft_strength=-1.0), ValueError, "soft_strength must be a finite"),
    (dict(soft_budget=3, soft_strength=float("nan")), ValueError, "soft_strength"),
    (dict(soft_budget=3, soft_strength=True), TypeError, "soft_strength must be a number"),
])
def test_bad_soft_settings_are_refused(kwargs, error, match):
    q = k = v = np.zeros((1, 1, 4, 2))
    with pytest.raises(error, match=match):
        A.forward(q, k, v, **kwargs)
