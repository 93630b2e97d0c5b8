"""``KVCache.bind_step``: a prepared step on caller-owned arrays gives exactly ``step``'s results
and refuses what ``step`` refuses."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given

import selattn_c

from helpers import cache_cases, exact_qkv


def bound_arrays(B: int, H: int, D: int):
    """q, k, v, out: float32 (B, H, D) each, as a decoding loop would own them."""
    return [np.zeros((B, H, D), np.float32) for _ in range(4)]


@given(case=cache_cases())
def test_bound_step_is_step_bitwise(case):
    """Token by token, the bound function (inputs written in place) and ``step`` give the same
    output bits and leave the same state; an unbudgeted cache grows under the bound function."""
    B, H, N, D = case.q.shape
    plain, bound = (selattn_c.KVCache(B, H, D, **case.options()) for _ in range(2))
    q, k, v, out = bound_arrays(B, H, D)
    step = bound.bind_step(q, k, v, out)
    for i in range(N):
        want = plain.step(case.q[:, :, i], case.k[:, :, i], case.v[:, :, i])
        q[...], k[...], v[...] = case.q[:, :, i], case.k[:, :, i], case.v[:, :, i]
        got = step()
        assert got is out
        np.testing.assert_array_equal(got, want)
    for name in ("length", "capacity"):
        assert getattr(plain, name) == getattr(bound, name)
    for name in ("size", "evictions", "positions", "F"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(bound, name))
    np.testing.assert_array_equal(plain.keys(), bound.keys())
    np.testing.assert_array_equal(plain.values(), bound.values())


def test_bound_step_survives_reset_and_growth():
    q0, k0, v0 = exact_qkv(7, (1, 2, 150, 4))
    cache = selattn_c.KVCache(1, 2, 4)                       # unbudgeted: grows 64 -> 256
    q, k, v, out = bound_arrays(1, 2, 4)
    step = cache.bind_step(q, k, v, out)
    outs = []
    for _ in range(2):                                       # the same tokens after a reset
        cache.reset()
        run = []
        for i in range(150):
            q[...], k[...], v[...] = q0[:, :, i], k0[:, :, i], v0[:, :, i]
            run.append(step().copy())
        outs.append(np.stack(run, axis=2))
    assert cache.capacity == 256 and cache.length == 150
    np.testing.assert_array_equal(outs[0], outs[1])
    fresh = selattn_c.KVCache(1, 2, 4)
    np.testing.assert_array_equal(
        outs[0], np.stack([fresh.step(q0[:, :, i], k0[:, :, i], v0[:, :, i])
                           for i in range(150)], axis=2))


@pytest.mark.parametrize("which, array, error, match", [
    ("q", np.zeros((1, 2, 4)), ValueError, "float32"),                     # float64
    ("k", np.zeros((1, 2, 5), np.float32), ValueError, "shape"),
    ("v", np.zeros((1, 4, 2), np.float32).transpose(0, 2, 1), ValueError, "contiguous"),
    ("out", np.zeros((1, 2, 4), np.float32).tolist(), TypeError, "ndarray"),
    ("out", np.zeros((1, 2, 4), np.float32).view(np.int32), ValueError, "float32"),
])
def test_bind_step_refuses_arrays_step_could_not_read(which, array, error, match):
    cache = selattn_c.KVCache(1, 2, 4, budget=4)
    arrays = dict(zip("q k v out".split(), bound_arrays(1, 2, 4)))
    arrays[which] = array
    with pytest.raises(error, match=match):
        cache.bind_step(**arrays)


def test_bind_step_refuses_read_only_or_overlapping_out():
    cache = selattn_c.KVCache(1, 2, 4, budget=4)
    q, k, v, out = bound_arrays(1, 2, 4)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        cache.bind_step(q, k, v, out)
    with pytest.raises(ValueError, match="share memory with k"):
        cache.bind_step(q, k, v, k)


def test_bound_step_refuses_non_finite_input_and_leaves_the_cache_unchanged():
    q0, k0, v0 = exact_qkv(8, (1, 2, 10, 4))
    cache = selattn_c.KVCache(1, 2, 4, budget=4)
    cache.prefill(q0, k0, v0)
    state = (cache.positions, cache.F, cache.size, cache.length, cache.keys(), cache.values())
    q, k, v, out = bound_arrays(1, 2, 4)
    v[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="v contains NaN"):
        cache.bind_step(q, k, v, out)()
    for x, y in zip(state, (cache.positions, cache.F, cache.size, cache.length, cache.keys(),
                            cache.values())):
        np.testing.assert_array_equal(x, y)
    cache.bind_step(q, k, v, out, check_finite=False)()     # skips the check: no error
    assert cache.length == 11


def test_bound_step_refuses_a_closed_cache_and_concurrent_use():
    cache = selattn_c.KVCache(1, 1, 2)
    step = cache.bind_step(*bound_arrays(1, 1, 2))
    with cache._exclusive():                          # another thread is inside a call
        errors = []

        def other():
            try:
                step()
            except RuntimeError as exc:
                errors.append(exc)
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert errors and "another thread" in str(errors[0])
    step()
    assert cache.length == 1
    cache.close()
    with pytest.raises(ValueError, match="closed"):
        step()


@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_bound_arrays_cannot_be_resized_while_bound(which):
    """Issue 27, item 5: ``q.resize(..., refcheck=False)`` freed the memory the bound function
    reads (a use-after-free under ASan and valgrind). While the function lives, resizing a bound
    array, or the array whose memory a bound view shares, raises; the step still reads the same
    memory and gives ``step``'s result. Once the function is gone, the arrays are free again."""
    B, H, D = 1, 2, 4
    base = np.zeros((2, B, H, D), np.float32)
    arrays = bound_arrays(B, H, D)
    arrays[which] = base[1]                         # a view: its base owns the memory
    cache, plain = selattn_c.KVCache(B, H, D), selattn_c.KVCache(B, H, D)
    step = cache.bind_step(*arrays)
    rng = np.random.default_rng(which)
    for victim in (arrays[(which + 1) % 4], base):
        with pytest.raises(ValueError, match="resize"):
            victim.resize((B, H, 4096), refcheck=False)
    x = rng.standard_normal((3, B, H, D)).astype(np.float32)
    arrays[0][...], arrays[1][...], arrays[2][...] = x
    np.testing.assert_array_equal(step(), plain.step(*x))
    del step
    base.resize((4, B, H, D), refcheck=False)       # nothing bound any more
    assert base.shape == (4, B, H, D)
