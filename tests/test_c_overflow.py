"""Finite inputs never give NaN silently (issue 27, item 4): every C entry point either returns
finite outputs or refuses the inputs with a ValueError saying they are too large for float32
(the bounds of ``selattn_c.overflow``), with the default ``check_finite=True``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import selattn_c

pytestmark = pytest.mark.skipif(not selattn_c.extension_built(), reason="needs the C extension")

TOO_LARGE = "too large"
FLT_MAX = float(np.finfo(np.float32).max)


def scaled(rng, shape, exponent: float) -> np.ndarray:
    """Standard normal values times 10**exponent, kept finite in float32."""
    x = rng.standard_normal(shape) * 10.0 ** exponent
    return np.clip(x, -FLT_MAX, FLT_MAX).astype(np.float32)


def finite_or_refused(call):
    """The call's result when every array in it is finite; None when it raised the overflow
    ValueError; anything else fails."""
    try:
        result = call()
    except ValueError as exc:
        assert TOO_LARGE in str(exc), exc
        return None
    arrays = result if isinstance(result, tuple) else (result,)
    for x in arrays:
        if isinstance(x, np.ndarray) and x.dtype == np.float32:
            assert np.isfinite(x).all(), "finite inputs gave NaN or infinity"
    return result


exponents = st.floats(-30.0, 38.5)


@given(seed=st.integers(0, 2**32 - 1), N=st.integers(1, 33), D=st.integers(1, 8),
       e=st.tuples(exponents, exponents, exponents, exponents),
       scale_exp=st.one_of(st.none(), st.floats(-30.0, 38.5)),
       soft=st.sampled_from([None, (2, 1.0), (3, 1e20)]), selective=st.booleans(),
       protect_bos=st.booleans())
def test_finite_inputs_give_finite_outputs_or_a_clear_refusal(seed, N, D, e, scale_exp, soft,
                                                             selective, protect_bos):
    """forward, backward, accumulated_mask and the memory rows on q, k, v, dout of any finite
    float32 magnitudes (1e-30 to 3e38) and any scale from 1e-30 to 3e38."""
    rng = np.random.default_rng(seed)
    shape = (1, 2, N, D)
    q, k, v, dout = (scaled(rng, shape, x) for x in e)
    scale = None if scale_exp is None else min(10.0 ** scale_exp, FLT_MAX)
    options = dict(scale=scale, selective=selective, protect_bos=protect_bos)
    if soft is not None and selective and N > 1:
        options.update(soft_budget=soft[0] if protect_bos or soft[0] > 1 else 2,
                       soft_strength=soft[1])
    result = finite_or_refused(lambda: selattn_c.forward(q, k, v, **options))
    if result is not None:
        finite_or_refused(lambda: selattn_c.backward(dout, result[1]))
    finite_or_refused(lambda: selattn_c.accumulated_mask(q, k, scale=scale,
                                                         protect_bos=protect_bos))
    finite_or_refused(lambda: selattn_c.memory_rows((q, k), 1.0, scale=scale,
                                                    protect_bos=protect_bos))


@given(seed=st.integers(0, 2**32 - 1), N=st.integers(1, 40), D=st.integers(1, 8),
       e=st.lists(st.tuples(exponents, exponents, exponents), min_size=1, max_size=4),
       budget=st.sampled_from([None, 4]), prefill=st.booleans())
def test_kv_cache_steps_give_finite_outputs_or_refuse_and_change_nothing(seed, N, D, e, budget,
                                                                       prefill):
    """A KVCache fed tokens of changing magnitudes (each group of tokens its own): a step or
    prefill either gives finite outputs or is refused with the overflow ValueError and leaves
    the cache as it was."""
    rng = np.random.default_rng(seed)
    cache = selattn_c.KVCache(1, 2, D, budget=budget)
    for eq, ek, ev in e:
        q, k, v = (scaled(rng, (1, 2, N, D), x) for x in (eq, ek, ev))
        before = (cache.length, cache.positions, cache.F)
        if prefill:
            done = finite_or_refused(lambda: cache.prefill(q, k, v)) is not None
        else:
            done = all(finite_or_refused(lambda i=i: cache.step(q[:, :, i], k[:, :, i],
                                                                v[:, :, i])) is not None
                       for i in range(N))
        if not done and prefill:
            assert cache.length == before[0]
            np.testing.assert_array_equal(cache.positions, before[1])
            np.testing.assert_array_equal(cache.F, before[2])
        assert np.isfinite(cache.F).all()


def test_the_issues_cases_are_refused():
    """q = k = 1e20 at one position (the float32 dot product overflows; float64 stays finite),
    scale = 1e38, and a dout that makes the backward's dout.v overflow: ValueError, not NaN."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 16, 8)).astype(np.float32) for _ in range(3))
    big_q, big_k = q.copy(), k.copy()
    big_q[0, 0, 5], big_k[0, 0, 5] = 1e20, 1e20
    with pytest.raises(ValueError, match="q and k are too large"):
        selattn_c.forward(big_q, big_k, v)
    with pytest.raises(ValueError, match="q and k are too large"):
        selattn_c.forward(q, k, v, scale=1e38)
    with pytest.raises(ValueError, match="q and k are too large"):
        selattn_c.accumulated_mask(q, k, scale=1e38)
    _, ctx = selattn_c.forward(q, k, v)
    with pytest.raises(ValueError, match="dout .* too large"):
        selattn_c.backward(np.full(q.shape, 1e37, np.float32), ctx)
    with pytest.raises(ValueError, match="v are too large"):
        selattn_c.forward(q, k, np.full(q.shape, 1e35, np.float32))
    cache = selattn_c.KVCache(1, 2, 8)
    cache.step(q[:, :, 0], k[:, :, 0], v[:, :, 0])
    with pytest.raises(ValueError, match="too large"):
        cache.step(big_q[:, :, 5], big_k[:, :, 5], v[:, :, 5])
    assert cache.length == 1
    # check_finite=False skips the scan: the NaN comes back, as documented, and nothing crashes
    out, _ = selattn_c.forward(big_q, big_k, v, check_finite=False)
    assert not np.isfinite(out).all()


@given(seed=st.integers(0, 2**32 - 1), N=st.integers(1, 130), D=st.integers(1, 64),
       e=st.floats(-30.0, 6.0))
def test_inputs_of_any_realistic_size_are_never_refused(seed, N, D, e):
    """The bounds refuse nothing of a size real inputs have: entries up to 1e6 in magnitude,
    the default scale, N up to 130 and D up to 64 always run."""
    rng = np.random.default_rng(seed)
    q, k, v = (scaled(rng, (1, 2, N, D), e) for _ in range(3))
    out, ctx = selattn_c.forward(q, k, v)
    dq, dk, dv = selattn_c.backward(out, ctx)
    for x in (out, dq, dk, dv):
        assert np.isfinite(x).all()
