"""Properties of selective attention that hold for every input (Hypothesis).

Each test states a fact about the mechanism (docs/selective-attention.md) and checks it on
random shapes up to (3, 4, 96, 48), every option, and input scales up to 30 (hard masks).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

from helpers import QKVCase, budgets, qkv_cases
from selattn_reference import attention as A
from tolerances import FLOAT32_EPS, FLOAT32_ERROR_FACTOR, REORDERED_FLOAT64

TAUS = st.sampled_from([0.25, 1.0, 3.0])


def causal_mask(N: int) -> np.ndarray:
    return np.tri(N, dtype=bool)                                                 # (N, N) j <= i


def naive_causal_attention(q, k, v, scale: float) -> np.ndarray:
    """Textbook causal softmax attention, written independently of the reference."""
    N = q.shape[2]
    logits = scale * np.einsum("bhid,bhjd->bhij", q, k)                          # (B, H, N, N)
    logits[..., ~causal_mask(N)] = -np.inf
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))                # (B, H, N, N)
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("bhij,bhjd->bhid", weights, v)                              # (B, H, N, D)


def logit_condition(cache: A.Cache) -> float:
    """1 + the largest |logit| or F: the factor by which the softmax amplifies relative rounding."""
    return 1.0 + np.abs(cache.L[np.isfinite(cache.L)]).max() + cache.F.max()


# ----------------------------------------------------------------------------------------------
# Causality


@given(qkv_cases(), st.data())
def test_causality(case: QKVCase, data):
    """Changing q, k, v at positions > i leaves out[..., :i+1, :] unchanged, and F up to row i+1
    (F[i+1] is built from the decisions of tokens <= i), and the buffer up to row i."""
    B, H, N, D = case.shape
    i = data.draw(st.integers(0, N - 1), label="i")
    budget = data.draw(st.none() | budgets(N, case.protect_bos), label="budget")
    out, cache = A.forward(case.q, case.k, case.v, **case.options(), budget=budget)

    rng = np.random.default_rng(case.seed + 1)
    future = [x.copy() for x in (case.q, case.k, case.v)]
    for x in future:
        x[:, :, i + 1:] = case.input_scale * rng.standard_normal(x[:, :, i + 1:].shape)
    out2, cache2 = A.forward(*future, **case.options(), budget=budget)

    np.testing.assert_array_equal(out2[:, :, : i + 1], out[:, :, : i + 1])
    np.testing.assert_array_equal(cache2.F[:, : i + 2], cache.F[:, : i + 2])
    np.testing.assert_array_equal(cache2.visible[:, : i + 1], cache.visible[:, : i + 1])


# ----------------------------------------------------------------------------------------------
# The accumulated mask F


@given(qkv_cases(selective=True))
def test_accumulated_mask_structure(case: QKVCase):
    _, cache = A.forward(case.q, case.k, case.v, **case.options())
    F = cache.F                                                                  # (B, N, N)
    N = F.shape[-1]
    np.testing.assert_array_equal(
        F, A.accumulated_mask(case.q, case.k, selector_head=case.selector_head,
                              protect_bos=case.protect_bos))
    assert np.all(F >= 0), "relu: only positive evidence masks"
    assert not F[:, ~causal_mask(N)].any(), "no query masks a key from its future"
    assert not np.diagonal(F, axis1=1, axis2=2).any(), "F[i, i] = 0: a token sees itself"
    assert not np.diagonal(F, offset=-1, axis1=1, axis2=2).any(), (
        "F[i, i-1] = 0: only token i-1 could have masked itself before query i, and it may not")
    assert not F[:, :2].any(), "rows 0 and 1 are empty: nothing before token 1 can mask"
    if case.protect_bos:
        assert not F[:, :, 0].any(), "BOS is never masked"
    assert np.all(np.diff(F, axis=1) >= 0), "masking accumulates: F never decreases down a column"


@given(qkv_cases(selective=True))
def test_only_tokens_before_the_last_can_mask(case: QKVCase):
    """F is non-zero exactly when some token m < N-1 has a positive selector logit at an allowed
    position: token m's decision reaches queries m+1.., so the last token's is never used."""
    _, cache = A.forward(case.q, case.k, case.v, **case.options())
    N = case.shape[2]
    allowed = A.selection_constraints(N, case.protect_bos)                       # (N, N)
    deciding = (cache.L[:, case.selector_head] > 0) & allowed                    # (B, N, N)
    np.testing.assert_array_equal(cache.F.any(axis=(1, 2)), deciding[:, :-1].any(axis=(1, 2)))


# ----------------------------------------------------------------------------------------------
# Relation to standard attention


@given(qkv_cases(), st.none() | st.integers(0, 1000))
def test_not_selective_is_causal_attention(case: QKVCase, budget_over_N):
    """selective=False is textbook causal attention; F is zero and a budget >= N changes nothing."""
    N = case.shape[2]
    budget = None if budget_over_N is None else max(N + budget_over_N, 2)
    case = dataclasses.replace(case, selective=False)
    out, cache = A.forward(case.q, case.k, case.v, **case.options(), budget=budget)
    assert not cache.F.any()
    # Reordered float64 rounding, amplified by the logits' magnitude through the softmax.
    atol = REORDERED_FLOAT64 * logit_condition(cache) * np.abs(case.v).max()
    np.testing.assert_allclose(out, naive_causal_attention(case.q, case.k, case.v, cache.scale),
                               rtol=0, atol=atol)


@given(qkv_cases(selective=True))
def test_no_positive_selector_logit_means_standard_attention(case: QKVCase):
    """With every selector logit <= 0 (selector q entries >= 0, k entries <= 0, positive scale),
    relu makes S = 0, so F = 0 and the output is bitwise that of selective=False."""
    s = case.selector_head
    q, k = case.q.copy(), case.k.copy()
    q[:, s], k[:, s] = np.abs(q[:, s]), -np.abs(k[:, s])
    out, cache = A.forward(q, k, case.v, **case.options())
    assert np.all(cache.L[:, s] <= 0)
    assert not cache.F.any()
    baseline, _ = A.forward(q, k, case.v, **dict(case.options(), selective=False))
    np.testing.assert_array_equal(out, baseline)


@given(qkv_cases(), st.integers(0, 3))
def test_budget_of_at_least_N_is_no_budget(case: QKVCase, extra):
    N = case.shape[2]
    budget = max(N + extra, 2 if case.protect_bos else 1)
    out, cache = A.forward(case.q, case.k, case.v, **case.options(), budget=budget)
    unpruned, _ = A.forward(case.q, case.k, case.v, **case.options())
    everything_causal = np.broadcast_to(causal_mask(N), cache.visible.shape)     # (B, N, N)
    np.testing.assert_array_equal(cache.visible, everything_causal)
    np.testing.assert_array_equal(out, unpruned)


# ----------------------------------------------------------------------------------------------
# The softmax


@given(qkv_cases(), st.data())
def test_attention_rows_are_distributions_over_visible_keys(case: QKVCase, data):
    N = case.shape[2]
    budget = data.draw(st.none() | budgets(N, case.protect_bos), label="budget")
    _, cache = A.forward(case.q, case.k, case.v, **case.options(), budget=budget)
    P = cache.P                                                                  # (B, H, N, N)
    assert np.all(P >= 0)
    np.testing.assert_allclose(P.sum(axis=-1), 1.0, rtol=0, atol=REORDERED_FLOAT64)
    hidden = np.broadcast_to(~cache.visible[:, None], P.shape)                   # (B, H, N, N)
    assert not P[hidden].any(), "keys outside the buffer (or in the future) get weight exactly 0"


# ----------------------------------------------------------------------------------------------
# Pruning


@given(qkv_cases(), st.data())
def test_buffer_rules(case: QKVCase, data):
    """Each query sees itself, BOS when protected, exactly min(i + 1, budget) keys, no future
    key; a dropped token never returns; and the dropped token had the largest F of the tokens
    that could have been dropped, and was the oldest of those with that F (eviction_mask's
    rule)."""
    B, H, N, D = case.shape
    budget = data.draw(budgets(N, case.protect_bos), label="budget")
    _, cache = A.forward(case.q, case.k, case.v, **case.options(), budget=budget)
    visible, F = cache.visible, cache.F                                          # (B, N, N)
    positions = np.arange(N)

    assert visible[:, positions, positions].all(), "a query always sees itself"
    if case.protect_bos:
        assert visible[:, :, 0].all(), "BOS is never evicted"
    assert not visible[:, ~causal_mask(N)].any(), "causal"
    np.testing.assert_array_equal(visible.sum(axis=-1),
                                  np.broadcast_to(np.minimum(positions + 1, budget), (B, N)))
    # visible[i+1, j] <= visible[i, j] for j <= i: once dropped, never back.
    returns = visible[:, 1:].astype(int) - visible[:, :-1].astype(int)           # (B, N-1, N)
    assert np.all(returns[:, causal_mask(N)[:-1]] <= 0), "a dropped token came back"

    for b in range(B):
        for i in range(1, N):
            dropped = np.flatnonzero(visible[b, i - 1] & ~visible[b, i])
            if dropped.size == 0:
                continue
            assert dropped.size == 1, "one insert needs at most one drop"
            kept = visible[b, i].copy()
            kept[i] = False                   # the new token cannot be dropped
            if case.protect_bos:
                kept[0] = False               # neither can BOS
            j = dropped[0]
            assert np.all(F[b, i, j] >= F[b, i, kept]), (b, i)
            assert not kept[: j][F[b, i, : j] == F[b, i, j]].any(), f"({b}, {i}): not the oldest"


@given(qkv_cases(), st.data())
def test_pruning_only_removes_the_evicted_softmax_mass(case: QKVCase, data):
    """out = (1 - m) * pruned_out + sum_{evicted j} P[i, j] v[j], where m is the unpruned weight
    of the evicted keys: pruning renormalises the softmax over what is kept, nothing else."""
    N = case.shape[2]
    budget = data.draw(budgets(N, case.protect_bos), label="budget")
    out, cache = A.forward(case.q, case.k, case.v, **case.options())
    pruned, pruned_cache = A.forward(case.q, case.k, case.v, **case.options(), budget=budget)
    evicted = ~pruned_cache.visible[:, None] & causal_mask(N)                    # (B, 1, N, N)
    P_evicted = np.where(evicted, cache.P, 0.0)                                  # (B, H, N, N)
    kept_mass = np.where(evicted, 0.0, cache.P).sum(axis=-1, keepdims=True)      # (B, H, N, 1)
    atol = REORDERED_FLOAT64 * logit_condition(cache) * np.abs(case.v).max()
    np.testing.assert_allclose(kept_mass * pruned + P_evicted @ case.v, out, rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------
# Memory loss


@given(qkv_cases(), TAUS)
def test_memory_loss_bounds_and_gradient_support(case: QKVCase, tau):
    """1 <= mem <= N (query 0 keeps itself; no query keeps more than its N keys); mem = N without
    selection; and the gradient lives on one row, where F < tau, with value -dmem / tau."""
    B, H, N, D = case.shape
    _, cache = A.forward(case.q, case.k, case.v, **case.options())
    mem = A.memory_loss(cache.F, tau)
    assert mem.shape == (B,)
    assert np.all(mem >= 1.0) and np.all(mem <= N)
    if not case.selective:
        np.testing.assert_array_equal(mem, float(N))
    dmem = np.random.default_rng(case.seed).uniform(0.5, 2.0, size=B)
    dF = A.memory_loss_backward(dmem, cache.F, tau)                              # (B, N, N)
    for b in range(B):
        rows = np.flatnonzero(dF[b].any(axis=-1))
        assert rows.size <= 1, "only the argmax row gets gradient"
        live = dF[b] != 0
        assert np.all(cache.F[b][live] < tau), "no gradient where min(F, tau) is flat"
        np.testing.assert_array_equal(dF[b][live], -dmem[b] / tau)


@given(qkv_cases(selective=True))
def test_memory_loss_grows_with_tau(case: QKVCase):
    """A larger tau needs more masking to count a token as evicted, so memory can only grow.
    Exactly, even in floating point: every term max(0, 1 - F / tau) and every partial sum is a
    monotone function of tau under IEEE rounding."""
    _, cache = A.forward(case.q, case.k, case.v, **case.options())
    mems = [A.memory_loss(cache.F, tau) for tau in (0.25, 1.0, 4.0, 16.0)]
    for smaller, larger in zip(mems, mems[1:]):
        assert np.all(smaller <= larger)


# ----------------------------------------------------------------------------------------------
# float32


def float32_bound(cache64: A.Cache, natural_scale: float) -> float:
    """|x32 - x64| bound: eps32 * (N + D + max|L| + max F) * natural scale (see tolerances)."""
    B, H, N, D = cache64.q.shape
    condition = N + D + logit_condition(cache64)
    return FLOAT32_ERROR_FACTOR * FLOAT32_EPS * condition * natural_scale


@given(qkv_cases())
def test_float32_forward_close_to_float64(case: QKVCase):
    q, k, v = (x.astype(np.float32) for x in (case.q, case.k, case.v))
    out32, cache32 = A.forward(q, k, v, **case.options())
    # The float64 run starts from the float32-rounded inputs, so only the arithmetic differs.
    out64, cache64 = A.forward(*(x.astype(np.float64) for x in (q, k, v)), **case.options())
    assert out32.dtype == cache32.F.dtype == cache32.P.dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=0,
                               atol=float32_bound(cache64, np.abs(v).max()))
    np.testing.assert_allclose(cache32.F, cache64.F, rtol=0, atol=float32_bound(cache64, 1.0))
    assert np.all(A.memory_loss(cache32.F, 1.0) >= 1.0)


@given(qkv_cases())
def test_float32_backward_close_to_float64(case: QKVCase):
    q, k, v = (x.astype(np.float32) for x in (case.q, case.k, case.v))
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    dout = np.random.default_rng(case.seed + 1).standard_normal(q.shape).astype(np.float32)
    _, cache32 = A.forward(q, k, v, **case.options())
    _, cache64 = A.forward(q64, k64, v64, **case.options())
    B, H, N, D = case.shape
    s = case.selector_head
    if case.selective:
        # relu's gradient jumps at 0: skip inputs where a selector logit is within the float32
        # dot-product error bound (D * eps32 * |q| . |k|) of 0, where the two precisions may
        # disagree on its sign.
        abs_dot = np.abs(q64[:, s]) @ np.abs(k64[:, s]).swapaxes(-1, -2)          # (B, N, N)
        dot_error = D * FLOAT32_EPS * abs(cache64.scale) * abs_dot
        near_kink = np.abs(cache64.L[:, s]) <= FLOAT32_ERROR_FACTOR * dot_error   # (B, N, N)
        assume(not near_kink[:, A.selection_constraints(N, case.protect_bos)].any())
    grads32 = A.backward(dout, cache32)
    grads64 = A.backward(dout.astype(np.float64), cache64)
    m = lambda x: float(np.abs(x).max())
    upstream = m(dout) * m(v64) * abs(cache64.scale)
    natural = {"dq": upstream * m(k64), "dk": upstream * m(q64), "dv": m(dout)}
    for name, g32, g64 in zip(("dq", "dk", "dv"), grads32, grads64):
        assert g32.dtype == np.float32, name
        np.testing.assert_allclose(g32, g64, rtol=0, atol=float32_bound(cache64, natural[name]),
                                   err_msg=name)
