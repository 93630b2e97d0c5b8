"""The C pruned KV cache and the budgeted forward, against the NumPy model (selattn_reference/cache.py),
the golden vectors, and themselves: decode equals prefill equals the reference."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import selattn_c
import selattn_reference as ref
from selattn_reference import attention

from helpers import EXACT_SCALE, cache_cases, exact_qkv, load_golden, qkv_cases
from tolerances import c_float32_atol

GOLDEN = [g for g in load_golden() if g.meta["budgets"]]


def out_atol(q, k, v, *, selector_head, protect_bos, scale) -> float:
    """Float32 tolerance of an attention output (tolerances.c_float32_atol), from the unpruned
    reference: pruning only removes keys, so its logits and F bound the pruned ones."""
    _, cache = attention.forward(q, k, v, selector_head=selector_head, protect_bos=protect_bos,
                                 scale=scale)
    N, D = q.shape[2], q.shape[3]
    logit_max = float(np.abs(cache.L[..., np.tri(N, dtype=bool)]).max())
    return c_float32_atol(float(np.abs(v).max()), logit_max=logit_max,
                          mask_max=float(cache.F.max()), N=N, D=D)


def common(a: np.ndarray, b: np.ndarray):
    """The first min(capacity) slots of two (B, capacity) arrays: capacities may differ (the C
    cache rounds up to 64 slots and grows by doubling from 64, the model from 16), but a slot's
    index does not depend on the capacity."""
    n = min(a.shape[1], b.shape[1])
    return a[:, :n], b[:, :n]


def assert_same_state(c, r, *, exact: bool = True) -> None:
    """Slot layout, counts and F of two caches (C or model) agree (F bitwise when ``exact``)."""
    assert c.length == r.length
    np.testing.assert_array_equal(c.size, r.size)
    np.testing.assert_array_equal(c.evictions, r.evictions)
    np.testing.assert_array_equal(*common(c.positions, r.positions))
    Fc, Fr = common(c.F, r.F)
    if exact:
        np.testing.assert_array_equal(Fc.astype(np.float64), Fr.astype(np.float64))
    else:
        np.testing.assert_allclose(Fc, Fr, rtol=1e-5, atol=1e-5)


def steps(cache, q, k, v) -> np.ndarray:
    """N calls of ``step``: (B, H, N, D) in, (B, H, N, D) out."""
    return np.stack([cache.step(q[:, :, i], k[:, :, i], v[:, :, i]) for i in range(q.shape[2])],
                    axis=2)


# ----------------------------------------------------------------------------------------------
# decode == prefill == reference


@given(case=cache_cases())
def test_decode_equals_prefill_equals_reference(case):
    """Exactly representable inputs (helpers.exact_qkv): the C cache makes the reference's eviction
    decisions, ties included, so positions, counts and F agree bitwise and the outputs within
    float32 rounding; prefill and decode agree with each other bitwise in state."""
    B, H, N, D = case.q.shape
    model = ref.KVCache(B, H, D, **case.options())
    expected = model.prefill(case.q, case.k, case.v)
    atol = out_atol(case.q, case.k, case.v, selector_head=case.selector_head,
                    protect_bos=case.protect_bos, scale=EXACT_SCALE)

    prefilled = selattn_c.KVCache(B, H, D, **case.options())
    out_prefill = prefilled.prefill(case.q, case.k, case.v)
    decoded = selattn_c.KVCache(B, H, D, **case.options())
    out_decode = steps(decoded, case.q, case.k, case.v)

    assert_same_state(prefilled, model)
    assert_same_state(decoded, model)
    assert np.abs(out_prefill - expected).max() <= atol
    assert np.abs(out_decode - expected).max() <= atol


@given(case=qkv_cases(max_N=150, max_D=24, input_scales=(0.5, 1.0, 2.0, 5.0)),
       data=st.data())
def test_decode_and_prefill_agree_on_any_input(case, data):
    """Random (not exactly representable) inputs: the eviction decisions of prefill and decode come
    from the same code on the same bits, so their states agree bitwise; the outputs differ only by
    the blocked kernel's order of summation. The budgeted forward is the prefill's output."""
    B, H, N, D = case.q.shape
    budget = data.draw(st.none() | st.integers(2 if case.protect_bos else 1, N + 2), "budget")
    threshold = data.draw(st.none() | st.floats(0.0, 8.0), "threshold")
    opts = dict(budget=budget, evict_threshold=threshold, **case.options())
    prefilled = selattn_c.KVCache(B, H, D, **opts)
    out_prefill = prefilled.prefill(case.q, case.k, case.v)
    decoded = selattn_c.KVCache(B, H, D, **opts)
    out_decode = steps(decoded, case.q, case.k, case.v)
    assert_same_state(prefilled, decoded)
    atol = out_atol(*(x.astype(np.float32).astype(np.float64) for x in (case.q, case.k, case.v)),
                    selector_head=case.selector_head, protect_bos=case.protect_bos,
                    scale=1 / np.sqrt(D))
    assert np.abs(out_prefill - out_decode).max() <= atol
    if threshold is None:
        out_forward, _ = selattn_c.forward(case.q, case.k, case.v, budget=budget,
                                           **case.options())
        np.testing.assert_array_equal(out_forward, out_prefill)


@given(case=cache_cases(max_N=200, max_D=12, thresholds=False))
@settings(max_examples=max(5, settings().max_examples // 4))
def test_budgeted_forward_matches_the_reference(case):
    """selattn_c.forward(budget=K) against the spec's pruned attention, over several query blocks
    (N up to 200: key tiles wholly evicted are skipped, partly evicted ones masked)."""
    opts = dict(selector_head=case.selector_head, protect_bos=case.protect_bos,
                selective=case.selective, scale=EXACT_SCALE)
    expected, _ = attention.forward(case.q, case.k, case.v, budget=case.budget, **opts)
    out, ctx = selattn_c.forward(case.q, case.k, case.v, budget=case.budget, **opts)
    atol = out_atol(case.q, case.k, case.v, selector_head=case.selector_head,
                    protect_bos=case.protect_bos, scale=EXACT_SCALE)
    assert np.abs(out - expected).max() <= atol


@pytest.mark.parametrize("budget", [2, 3, 4, 63, 64, 65, 66, 130])
@pytest.mark.parametrize("selective", [False, True])
def test_budgeted_forward_at_tile_boundaries(budget, selective):
    """Standard attention under a budget is a sliding window that keeps BOS, so key j leaves at
    query j + budget - 1 exactly; these budgets put whole key tiles' last visible query on the
    first, second or last row of a query block (the tile-skipping and masking edge cases)."""
    q, k, v = exact_qkv(9, (1, 2, 260, 8))
    opts = dict(selective=selective, scale=EXACT_SCALE)
    expected, _ = attention.forward(q, k, v, budget=budget, **opts)
    out, _ = selattn_c.forward(q, k, v, budget=budget, **opts)
    atol = out_atol(q, k, v, selector_head=0, protect_bos=True, scale=EXACT_SCALE)
    assert np.abs(out - expected).max() <= atol


@given(case=qkv_cases(max_N=140, max_D=16), extra=st.integers(0, 70))
def test_budget_at_least_n_is_no_budget_bitwise(case, extra):
    """A budget that is never reached changes nothing, bit for bit: forward and prefill."""
    B, H, N, D = case.q.shape
    budget = max(N + extra, 2)           # 2: the smallest legal budget with BOS protection
    out, _ = selattn_c.forward(case.q, case.k, case.v, **case.options())
    out_budget, _ = selattn_c.forward(case.q, case.k, case.v, budget=budget, **case.options())
    cache = selattn_c.KVCache(B, H, D, budget=budget, **case.options())
    np.testing.assert_array_equal(out_budget, out)
    np.testing.assert_array_equal(cache.prefill(case.q, case.k, case.v), out)


@pytest.mark.parametrize("golden", GOLDEN, ids=[g.name for g in GOLDEN])
def test_golden_visible_and_pruned_out(golden):
    """visible_K and pruned_out_K of every golden file: the budgeted forward, the prefill, and
    decoding step by step (held set after each step = the golden visible row)."""
    meta, a = golden.meta, golden.arrays
    B, H, N, D = a["q"].shape
    opts = dict(selector_head=meta["selector_head"], protect_bos=meta["protect_bos"],
                scale=meta["scale"])
    q, k, v = (a[n].astype(np.float32).astype(np.float64) for n in "qkv")
    atol = out_atol(q, k, v, **opts)
    for K in meta["budgets"]:
        expected = a[f"pruned_out_{K}"]
        out, _ = selattn_c.forward(a["q"], a["k"], a["v"], budget=K, **opts)
        assert np.abs(out - expected).max() <= atol
        cache = selattn_c.KVCache(B, H, D, K, **opts)
        assert np.abs(cache.prefill(a["q"], a["k"], a["v"]) - expected).max() <= atol
        cache = selattn_c.KVCache(B, H, D, K, **opts)
        for i in range(N):
            out_i = cache.step(a["q"][:, :, i], a["k"][:, :, i], a["v"][:, :, i])
            assert np.abs(out_i - expected[:, :, i]).max() <= atol
            for b in range(B):
                np.testing.assert_array_equal(cache.held(b)[0],
                                              np.flatnonzero(a[f"visible_{K}"][b, i]))


# ----------------------------------------------------------------------------------------------
# the rule's invariants, on the C cache


@given(case=cache_cases(max_N=100, thresholds=False))
def test_c_rule_invariants(case):
    """Each step: size <= budget, BOS held when protected (F = 0), at most one eviction and the
    evicted token was the argmax of F among the evictable (oldest on ties), held F never
    decreases, the newest token is held with F = 0."""
    B, H, N, D = case.q.shape
    cache = selattn_c.KVCache(B, H, D, **case.options())
    for i in range(N):
        before = [dict(zip(*cache.held(b))) for b in range(B)]
        cache.step(case.q[:, :, i], case.k[:, :, i], case.v[:, :, i])
        for b in range(B):
            pos, F = cache.held(b)
            held = dict(zip(pos, F))
            assert held[i] == 0
            if case.budget is not None:
                assert len(pos) <= case.budget
            if case.protect_bos:
                assert held.get(0) == 0
            gone = set(before[b]) - set(held)
            assert len(gone) <= 1
            if gone:
                candidates = {p: f for p, f in before[b].items()
                              if not (case.protect_bos and p == 0)}
                top = max(candidates.values())
                assert gone == {min(p for p, f in candidates.items() if f == top)}
            assert all(held[p] >= f for p, f in before[b].items() if p in held)
        assert cache.evictions.sum() == (i + 1) * B - cache.size.sum()


@given(case=cache_cases(max_N=60, thresholds=False), t=st.integers(0, 24).map(lambda x: x / 4))
def test_c_threshold_drops_exactly_the_tokens_above_it(case, t):
    """Without a budget, the held set after each step is every token with F <= t (BOS kept when
    protected): F only grows, so this is all the threshold rule does."""
    B, H, N, D = case.q.shape
    opts = dict(case.options(), budget=None, evict_threshold=t, selective=True)
    cache = selattn_c.KVCache(B, H, D, **opts)
    cache.prefill(case.q, case.k, case.v)
    F = attention.accumulated_mask(case.q, case.k, selector_head=case.selector_head,
                                   protect_bos=case.protect_bos, scale=EXACT_SCALE)  # (B, N, N)
    model = ref.KVCache(B, H, D, **opts)
    model.prefill(case.q, case.k, case.v)
    assert_same_state(cache, model)
    for b in range(B):
        pos, Fh = cache.held(b)
        assert (Fh <= t).all()
        if N > 1:   # every token still held has F[N-1, j] <= t as well (F grows)
            assert (F[b, N - 1, pos] <= t).all()


# ----------------------------------------------------------------------------------------------
# a stateful test: random sequences of prefill, step and reset against the NumPy model


class CacheAgainstModel(RuleBasedStateMachine):
    """The C cache and the NumPy model driven by the same random calls stay in the same state."""

    @initialize(case=cache_cases(max_B=2, max_H=3, max_N=1, max_D=8))
    def start(self, case):
        B, H, _, D = case.q.shape
        self.case = case
        self.shape = (B, H, D)
        self.c = selattn_c.KVCache(B, H, D, **case.options())
        self.model = ref.KVCache(B, H, D, **case.options())
        self.seed = case.seed

    def _tokens(self, n):
        B, H, D = self.shape
        self.seed += 1
        return exact_qkv(self.seed, (B, H, n, D))

    def _check_out(self, out_c, out_model):
        B, H, D = self.shape
        # a loose float32 bound: F and logits of these inputs stay below ~2^11 (helpers.exact_qkv)
        atol = c_float32_atol(4.0 * max(1.0, float(np.abs(out_model).max())), logit_max=16.0,
                              mask_max=float(max(self.model.F.max(), 1.0)),
                              N=self.model.length + 1, D=D)
        assert np.abs(out_c - out_model).max() <= atol

    @rule(n=st.integers(1, 70))
    def prefill(self, n):
        q, k, v = self._tokens(n)
        self._check_out(self.c.prefill(q, k, v), self.model.prefill(q, k, v))

    @rule()
    def step(self):
        q, k, v = (x[:, :, 0] for x in self._tokens(1))
        self._check_out(self.c.step(q, k, v), self.model.step(q, k, v))

    @precondition(lambda self: self.model.length > 0)
    @rule()
    def reset(self):
        self.c.reset()
        self.model.reset()

    @invariant()
    def same_state(self):
        if hasattr(self, "c"):
            assert_same_state(self.c, self.model)


TestCacheAgainstModel = CacheAgainstModel.TestCase
TestCacheAgainstModel.settings = settings(
    max_examples=max(5, settings().max_examples // 4), stateful_step_count=12,
    deadline=None)


# ----------------------------------------------------------------------------------------------
# threads, growth, memory


def test_one_and_two_threads_give_identical_bits():
    """Steps big enough to run in parallel (B H slots D >= 2^16), and a prefill."""
    q, k, v = exact_qkv(3, (2, 8, 300, 64))
    q = q + np.random.default_rng(0).standard_normal(q.shape)   # not exact: rounding matters
    results = []
    old = selattn_c.get_num_threads()
    try:
        for n in (1, 2):
            selattn_c.set_num_threads(n)
            cache = selattn_c.KVCache(2, 8, 64, budget=200, evict_threshold=30.0)
            pre = cache.prefill(q[:, :, :250], k[:, :, :250], v[:, :, :250])
            dec = steps(cache, q[:, :, 250:], k[:, :, 250:], v[:, :, 250:])
            results.append((pre, dec, cache.positions, cache.F))
    finally:
        selattn_c.set_num_threads(old)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_unbudgeted_cache_grows_and_keeps_every_slot():
    q, k, v = exact_qkv(4, (1, 2, 300, 4))
    cache = selattn_c.KVCache(1, 2, 4)
    assert cache.capacity == 64
    out = steps(cache, q[:, :, :100], k[:, :, :100], v[:, :, :100])   # grows 64 -> 128
    out2 = cache.prefill(q[:, :, 100:], k[:, :, 100:], v[:, :, 100:])  # grows to 512
    assert cache.capacity == 512
    np.testing.assert_array_equal(cache.held(0)[0], np.arange(300))
    fresh = selattn_c.KVCache(1, 2, 4)
    expected = fresh.prefill(q, k, v)
    atol = out_atol(q, k, v, selector_head=0, protect_bos=True, scale=0.5)
    assert np.abs(np.concatenate([out, out2], axis=2) - expected).max() <= atol
    np.testing.assert_array_equal(cache.keys()[0, :, :300], k[0].astype(np.float32))
    np.testing.assert_array_equal(cache.values()[0, :, :300], v[0].astype(np.float32))


def full_cache_nbytes(K: int) -> int:
    """nbytes of a (1, 8, 64) cache of budget K once it holds K tokens (it grows up to K)."""
    cache = selattn_c.KVCache(1, 8, 64, budget=K)
    x = np.zeros((1, 8, K, 64), np.float32)
    cache.prefill(x, x, x)
    return cache.nbytes


def test_nbytes_scales_with_the_budget():
    """The memory of a full cache is O(budget x H x D): keys and values dominate."""
    sizes = {K: full_cache_nbytes(K) for K in (64, 256, 1024)}
    for K, n in sizes.items():
        kv = 2 * K * 8 * 64 * 4
        assert kv <= n <= 1.1 * kv
    assert 15.9 <= sizes[1024] / sizes[64] <= 16.0      # only a few counters do not scale


def test_reset_forgets_everything():
    q, k, v = exact_qkv(5, (2, 2, 40, 4))
    cache = selattn_c.KVCache(2, 2, 4, budget=8)
    first = cache.prefill(q, k, v)
    cache.reset()
    assert cache.length == 0 and cache.size.tolist() == [0, 0]
    assert (cache.positions == -1).all() and (cache.F == 0).all()
    assert cache.evictions.tolist() == [0, 0]
    np.testing.assert_array_equal(cache.prefill(q, k, v), first)


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs, error", [
    (dict(budget=1), ValueError),
    (dict(budget=0, protect_bos=False), ValueError),
    (dict(budget=True), TypeError),
    (dict(evict_threshold=-0.5), ValueError),
    (dict(evict_threshold=float("inf")), ValueError),
    (dict(selector_head=-1), ValueError),
    (dict(scale=float("nan")), ValueError),
])
def test_bad_options_raise(kwargs, error):
    with pytest.raises(error):
        selattn_c.KVCache(1, 2, 4, **kwargs)


def test_bad_step_inputs_raise_and_leave_the_cache_unchanged():
    q, k, v = exact_qkv(6, (1, 2, 10, 4))
    cache = selattn_c.KVCache(1, 2, 4, budget=4)
    cache.prefill(q, k, v)
    state = (cache.positions, cache.F, cache.size, cache.evictions, cache.length,
             cache.keys(), cache.values())
    good = np.zeros((1, 2, 4))
    bad_calls = [
        (lambda: cache.step(np.zeros((1, 2, 5)), good, good), ValueError, "shape"),
        (lambda: cache.step(good, np.zeros((2, 2, 4)), good), ValueError, "shape"),
        (lambda: cache.step(good, good, np.zeros((1, 2, 4), dtype=np.int64)), TypeError, "float"),
        (lambda: cache.step(good, good, np.full((1, 2, 4), np.nan)), ValueError, "NaN"),
        (lambda: cache.step(np.full((1, 2, 4), 1e300), good, good), ValueError, "infinity"),
        (lambda: cache.prefill(np.zeros((1, 2, 4)), good, good), ValueError, "4 dimensions"),
        (lambda: cache.prefill(np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 2, 4)),
                               np.zeros((1, 2, 3, 4))), ValueError, "shape"),
    ]
    for call, error, match in bad_calls:
        with pytest.raises(error, match=match):
            call()
        after = (cache.positions, cache.F, cache.size, cache.evictions, cache.length,
                 cache.keys(), cache.values())
        for x, y in zip(state, after):
            np.testing.assert_array_equal(x, y)


def test_check_finite_false_skips_the_check():
    cache = selattn_c.KVCache(1, 1, 2)
    out = cache.step(np.ones((1, 1, 2)), np.ones((1, 1, 2)), np.full((1, 1, 2), np.inf),
                     check_finite=False)
    assert not np.isfinite(out).all()        # garbage in, garbage out, but no crash


def test_concurrent_use_is_refused():
    """A cache holds one sequence: a second thread stepping it while a call runs gets a clear
    RuntimeError instead of corrupting it (simulated by holding the cache's lock)."""
    cache = selattn_c.KVCache(1, 1, 2)
    x = np.ones((1, 1, 2))
    with cache._exclusive():
        errors = []
        t = threading.Thread(target=lambda: errors.append(_raises(lambda: cache.step(x, x, x))))
        t.start()
        t.join()
        assert isinstance(errors[0], RuntimeError) and "another thread" in str(errors[0])
    cache.step(x, x, x)                      # usable again afterwards
    assert cache.length == 1


def _raises(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
    return None


def test_backward_refuses_a_budgeted_context():
    q, k, v = exact_qkv(7, (1, 2, 8, 4))
    out, ctx = selattn_c.forward(q, k, v, budget=3)
    with pytest.raises(ValueError, match="budget"):
        selattn_c.backward(np.ones_like(out), ctx)


def test_forward_budget_is_validated():
    q, k, v = exact_qkv(8, (1, 2, 8, 4))
    with pytest.raises(ValueError, match="too small"):
        selattn_c.forward(q, k, v, budget=1)
    with pytest.raises(TypeError):
        selattn_c.forward(q, k, v, budget=2.0)
    out, _ = selattn_c.forward(q, k, v, budget=1, protect_bos=False)
    assert out.shape == q.shape and np.isfinite(out).all()


def test_a_budgeted_cache_grows_on_demand_up_to_its_budget():
    """Issue 27, item 6: ``KVCache(3, 4, 1, budget=2 * 10**8)`` allocated all 2e8 slots (4.5 GB)
    up front. The capacity now starts at 64 and doubles as tokens arrive, capped at the budget
    rounded up to 64; the state equals bitwise that of one prefill of every token (which
    reaches the cap at once), the outputs within the step-versus-prefill tolerance."""
    huge = selattn_c.KVCache(3, 4, 1, budget=2 * 10**8)
    assert huge.capacity == 64 and huge.nbytes < 1 << 20
    q, k, v = exact_qkv(5, (1, 2, 400, 4))
    grown, whole = selattn_c.KVCache(1, 2, 4, budget=150), selattn_c.KVCache(1, 2, 4, budget=150)
    assert grown.capacity == 64
    out = steps(grown, q[:, :, :100], k[:, :, :100], v[:, :, :100])          # 64 -> 128
    assert grown.capacity == 128
    out2 = grown.prefill(q[:, :, 100:], k[:, :, 100:], v[:, :, 100:])        # -> 192, not 256
    assert grown.capacity == 192
    expected = whole.prefill(q, k, v)                                        # 192 at once
    assert whole.capacity == 192
    atol = out_atol(q, k, v, selector_head=0, protect_bos=True, scale=0.5)
    assert np.abs(np.concatenate([out, out2], axis=2) - expected).max() <= atol
    np.testing.assert_array_equal(grown.positions, whole.positions)
    np.testing.assert_array_equal(grown.F, whole.F)
