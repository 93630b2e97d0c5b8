"""The NumPy model of the pruned KV cache (selattn_reference/cache.py) against the spec's buffer rule
(``eviction_mask`` + ``forward``), the golden vectors, and its own invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import selattn_reference as ref
from selattn_reference import attention

from helpers import cache_cases, load_golden
from tolerances import GOLDEN_FLOAT64, REORDERED_FLOAT64

GOLDEN = [g for g in load_golden() if g.meta["budgets"]]


def pruned_attention(q, k, v, visible, *, selector_head, protect_bos, selective, scale):
    """Attention of each query over its visible keys, F subtracted: the spec, written out."""
    _, cache = attention.forward(q, k, v, selector_head=selector_head, protect_bos=protect_bos,
                                 selective=selective, scale=scale)
    logits = np.where(visible[:, None], cache.L - cache.F[:, None], -np.inf)  # (B, H, N, N)
    P = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (P / P.sum(axis=-1, keepdims=True)) @ v, cache                      # (B, H, N, D)


@given(case=cache_cases(max_N=60))
def test_cache_prefill_equals_the_buffer_rule(case):
    """N steps of the model give the spec's pruned attention, and query i sees exactly the keys
    eviction_mask holds for it (with the threshold rule too)."""
    B, H, N, D = case.q.shape
    cache = ref.KVCache(B, H, D, **case.options())
    held_at_query = np.zeros((B, N, N), dtype=bool)
    outs = []
    for i in range(N):
        outs.append(cache.step(case.q[:, :, i], case.k[:, :, i], case.v[:, :, i]))
        # what query i attended to: held now, or dropped by the threshold after attending
        for b in range(B):
            held_at_query[b, i, cache.held(b)[0]] = True
    opts = dict(selector_head=case.selector_head, protect_bos=case.protect_bos,
                selective=case.selective, scale=case.options()["scale"])
    _, full = attention.forward(case.q, case.k, case.v, **opts)
    visible = attention.eviction_mask(full.F if case.selective else np.zeros_like(full.F),
                                      case.budget, protect_bos=case.protect_bos,
                                      evict_threshold=case.evict_threshold)
    expected, _ = pruned_attention(case.q, case.k, case.v, visible, **opts)
    np.testing.assert_allclose(np.stack(outs, axis=2), expected, rtol=0, atol=REORDERED_FLOAT64)
    if case.evict_threshold is None:   # the threshold drops after attending: held is a subset
        np.testing.assert_array_equal(held_at_query, visible)
    else:
        assert not (held_at_query & ~visible).any()


@pytest.mark.parametrize("golden", GOLDEN, ids=[g.name for g in GOLDEN])
def test_cache_matches_golden_pruned_outputs(golden):
    """visible_K and pruned_out_K of every golden file, step by step."""
    meta, a = golden.meta, golden.arrays
    B, H, N, D = a["q"].shape
    for K in meta["budgets"]:
        cache = ref.KVCache(B, H, D, K, selector_head=meta["selector_head"],
                            protect_bos=meta["protect_bos"], scale=meta["scale"])
        for i in range(N):
            out = cache.step(a["q"][:, :, i], a["k"][:, :, i], a["v"][:, :, i])
            err = np.abs(out - a[f"pruned_out_{K}"][:, :, i])
            assert (err <= GOLDEN_FLOAT64 * (1 + np.abs(a[f"pruned_out_{K}"][:, :, i]))).all()
            for b in range(B):
                np.testing.assert_array_equal(cache.held(b)[0],
                                              np.flatnonzero(a[f"visible_{K}"][b, i]))


@given(case=cache_cases(max_N=50, thresholds=False))
def test_cache_rule_invariants(case):
    """At every step: size <= budget; BOS held when protected; the evicted token is the argmax of F
    among the evictable ones (the oldest on ties); F of a held token never decreases; positions
    are distinct."""
    B, H, N, D = case.q.shape
    cache = ref.KVCache(B, H, D, **case.options())
    for i in range(N):
        before = [dict(zip(*cache.held(b))) for b in range(B)]     # position -> F
        cache.step(case.q[:, :, i], case.k[:, :, i], case.v[:, :, i])
        for b in range(B):
            pos, F = cache.held(b)
            assert len(set(pos)) == len(pos) and i in pos
            if case.budget is not None:
                assert len(pos) <= case.budget
            if case.protect_bos:
                assert 0 in pos and F[0] == 0
            evicted = set(before[b]) - set(pos)
            assert len(evicted) <= 1
            if evicted:
                (gone,) = evicted
                candidates = {p: f for p, f in before[b].items()
                              if not (case.protect_bos and p == 0)}
                top = max(candidates.values())
                assert gone == min(p for p, f in candidates.items() if f == top)
            for p, f in zip(pos, F):
                if p in before[b]:
                    assert f >= before[b][p]


@given(case=cache_cases(max_N=60, thresholds=False), t=st.integers(0, 24).map(lambda x: x / 4))
def test_threshold_error_bound(case, t):
    """Without a budget, dropping tokens with F > t changes query i's output by at most
    2 max|v| rho_i, where rho_i is the dropped tokens' share of the unpruned softmax, and
    rho_i < e^-t sum_{dropped j} e^(L_ij - L_ii) (docs/kv-cache.md)."""
    B, H, N, D = case.q.shape
    opts = dict(selector_head=case.selector_head, protect_bos=case.protect_bos,
                selective=True, scale=case.options()["scale"])
    cache = ref.KVCache(B, H, D, evict_threshold=t, **opts)
    pruned = cache.prefill(case.q, case.k, case.v)                          # (B, H, N, D)
    exact, full = attention.forward(case.q, case.k, case.v, **opts)
    dropped = np.tri(N, dtype=bool) & (full.F > t)                          # (B, N, N)
    if case.protect_bos:
        dropped[:, :, 0] = False
    rho = np.where(dropped[:, None], full.P, 0.0).sum(axis=-1)              # (B, H, N)
    vmax = np.abs(case.v).max(axis=(2, 3))[:, :, None]                      # (B, H, 1)
    err = np.abs(pruned - exact).max(axis=-1)                               # (B, H, N)
    assert (err <= 2 * vmax * rho + REORDERED_FLOAT64).all()
    L_self = np.diagonal(full.L, axis1=-2, axis2=-1)[..., None]             # (B, H, N, 1)
    with np.errstate(under="ignore"):
        a_priori = np.exp(-t) * np.where(dropped[:, None], np.exp(full.L - L_self), 0.0).sum(-1)
    assert (rho <= a_priori * (1 + REORDERED_FLOAT64)).all()


def test_reset_and_growth():
    """An unbudgeted cache grows past its initial capacity keeping every slot; reset empties it."""
    rng = np.random.default_rng(0)
    cache = ref.KVCache(1, 2, 3)
    for _ in range(40):
        cache.step(*(rng.standard_normal((1, 2, 3)) for _ in range(3)))
    np.testing.assert_array_equal(cache.held(0)[0], np.arange(40))
    assert cache.capacity >= 40 and cache.length == 40
    cache.reset()
    assert cache.length == 0 and cache.size.tolist() == [0]


@pytest.mark.parametrize("kwargs, error", [
    (dict(budget=1), ValueError),                       # BOS + the newest need 2
    (dict(budget=0, protect_bos=False), ValueError),
    (dict(budget=2.5), TypeError),
    (dict(evict_threshold=-1.0), ValueError),
    (dict(evict_threshold=float("nan")), ValueError),
    (dict(evict_threshold="1"), TypeError),
    (dict(selector_head=3), ValueError),
])
def test_bad_options_raise(kwargs, error):
    with pytest.raises(error):
        ref.KVCache(1, 3, 4, **kwargs)


@pytest.mark.parametrize("dims", [(0, 1, 1), (1, 0, 1), (1, 1, 0), (1.0, 1, 1)])
def test_bad_dimensions_raise(dims):
    with pytest.raises((ValueError, TypeError)):
        ref.KVCache(*dims)


def test_step_checks_shapes():
    cache = ref.KVCache(2, 3, 4)
    with pytest.raises(ValueError, match="shape"):
        cache.step(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), np.zeros((2, 3, 4)))
