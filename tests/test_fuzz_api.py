"""Fuzzing the public API of the C extension with Hypothesis.

Random shapes (0-D to 5-D, zero-sized and mismatched), dtypes (float16/32/64, byte-swapped,
integer, bool, complex, object), layouts (transposed, strided, reversed, zero-stride broadcasts,
unaligned), values (NaN, inf, 1e38, denormals, exact zeros) and options (selector heads, budgets,
scales, check_finite) drive forward, backward, accumulated_mask and the KVCache. The property:
every call either raises ValueError or TypeError, or returns float32 arrays of the right shape; a
KVCache call that raises leaves the cache as it was. A crash of the interpreter fails the run, and
under the sanitizer build (.ci/sanitize) so does any out-of-bounds access.

The bounded run is the profile's example count (``ci``: 200 per test); docs/reliability.md gives
the longer run (HYPOTHESIS_PROFILE=thorough) and its result.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import selattn_c

from test_c_bad_inputs import assert_same_state, cache_state

DTYPES = [np.float32, np.float64, np.float16, np.dtype(">f4"), np.int32, np.int64, np.bool_,
          np.complex64, object]
LAYOUTS = ["contiguous", "transposed", "strided", "reversed", "broadcast", "unaligned"]
# Magnitudes: denormal float32, tiny, order one, large enough that logits overflow float32, and
# beyond float32 (inf after conversion).
MAGNITUDES = [0.0, 1e-42, 1e-20, 1.0, 3.0, 1e19, 1e38, 1e300]
SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45]
SCALES = [None] * 6 + [0.0, -1.0, 1e-45, 0.125, 0.125, 1e38, 2, 1e39, float("nan"),
                        float("inf"), True, "1"]
FUZZ_SETTINGS = settings(suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.filter_too_much])


@st.composite
def shapes(draw, base=None):
    """Mostly 4-D shapes near ``base`` (B, H, N, D); sometimes another ndim or a zero size."""
    if base is None:
        base = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 70)),
                draw(st.integers(1, 8)))
    kind = draw(st.sampled_from(["same"] * 6 + ["other-ndim", "zero", "changed"]))
    if kind == "same" or (len(base) == 0 and kind != "other-ndim"):
        return tuple(base)
    if kind == "other-ndim":
        return tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=5)))
    shape = list(base)
    i = draw(st.integers(0, len(shape) - 1))
    shape[i] = 0 if kind == "zero" else draw(st.integers(1, 5))
    return tuple(shape)


def dtypes():
    return st.sampled_from(DTYPES[:4] * 6 + DTYPES[4:])             # floats most of the time


@st.composite
def arrays(draw, shape, dtype=None):
    """An array of ``shape`` with a drawn layout and values (and dtype, unless given)."""
    dtype = draw(dtypes()) if dtype is None else dtype
    layout = draw(st.sampled_from(LAYOUTS))
    magnitude = draw(st.sampled_from(MAGNITUDES))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    values = magnitude * rng.standard_normal(shape)
    if values.size and draw(st.booleans()):                         # a few special values
        for _ in range(draw(st.integers(1, 3))):
            values.flat[rng.integers(values.size)] = draw(st.sampled_from(SPECIALS))
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.asarray(values.astype(dtype))                        # 0-D stays an array
    if layout == "transposed" and x.ndim >= 2:
        x = np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)     # same values
    elif layout == "strided" and x.ndim >= 1:
        wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
    elif layout == "reversed" and x.ndim >= 1:
        x = np.ascontiguousarray(x[..., ::-1])[..., ::-1]
    elif layout == "broadcast" and x.ndim >= 1 and x.shape[0] > 0:
        x = np.broadcast_to(x[:1], x.shape)
    elif layout == "unaligned" and x.dtype != object and x.dtype.itemsize > 1:
        x = unaligned_copy(x)
    return x


def unaligned_copy(x: np.ndarray) -> np.ndarray:
    """A copy of x whose data starts one byte past an aligned address."""
    raw = np.zeros(x.nbytes + 1, dtype=np.uint8)
    view = raw[1:].view(x.dtype).reshape(x.shape)
    view[...] = x
    return view


def expect_clean(call, expected_shapes):
    """Run ``call``: it may raise ValueError or TypeError; otherwise every result is a float32
    array of the expected shape. Any other exception fails the test."""
    try:
        results = call()
    except (ValueError, TypeError) as exc:
        event(f"refused: {type(exc).__name__}")
        return None
    event("returned")
    results = results if isinstance(results, tuple) else (results,)
    for result, shape in zip(results, expected_shapes):
        assert isinstance(result, np.ndarray) and result.dtype == np.float32
        assert result.shape == shape
    return results


@st.composite
def options(draw, H: int, N: int):
    return dict(
        selector_head=draw(st.sampled_from([0, 0, 0, H - 1, H - 1, H, -1, 0.0])),
        protect_bos=draw(st.booleans()),
        selective=draw(st.booleans()),
        scale=draw(st.sampled_from(SCALES)),
        budget=draw(st.sampled_from([None] * 6 + [0, 1, 2, 3, max(N - 1, 0), N, 2 ** 70, 2.0])),
        check_finite=draw(st.booleans()),
    )


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_forward_backward_and_mask(data):
    base = data.draw(shapes(), label="shape of q")
    dtype = data.draw(dtypes(), label="dtype of q")

    def like_q(name):
        """Mostly q's shape and dtype, sometimes another (then the call must refuse)."""
        shape = data.draw(shapes(base)) if data.draw(st.integers(0, 3)) == 0 else base
        other = data.draw(dtypes()) if data.draw(st.integers(0, 5)) == 0 else dtype
        return data.draw(arrays(shape, other), label=name)

    q = data.draw(arrays(base, dtype), label="q")
    k, v = like_q("k"), like_q("v")
    if data.draw(st.booleans(), label="unaligned float32 q") and q.dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            q = unaligned_copy(q.astype(np.float32))
    H = base[1] if len(base) == 4 else 1
    N = base[2] if len(base) == 4 else 1
    opts = data.draw(options(H, N), label="options")
    results = expect_clean(lambda: selattn_c.forward(q, k, v, **opts), [np.shape(q)])
    if results is not None:
        out, ctx = results
        dout = data.draw(arrays(data.draw(shapes(out.shape)), data.draw(
            st.sampled_from([np.float32, np.float64, dtype]))), label="dout")
        expect_clean(lambda: selattn_c.backward(dout, ctx, check_finite=opts["check_finite"]),
                     [out.shape] * 3)
    mask_opts = {name: opts[name] for name in ("selector_head", "protect_bos", "scale",
                                               "check_finite")}
    B = np.shape(q)[0] if np.ndim(q) == 4 else 0
    expect_clean(lambda: selattn_c.accumulated_mask(q, k, **mask_opts), [(B, N, N)])


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_kv_cache(data):
    B, H, D = (data.draw(st.integers(1, 3), label=name) for name in ("B", "H", "D"))
    try:
        cache = selattn_c.KVCache(
            B, H, D, budget=data.draw(st.sampled_from([None, 1, 2, 3, 5, 64, 65, 2 ** 70])),
            selector_head=data.draw(st.sampled_from([0, H - 1, H])),
            protect_bos=data.draw(st.booleans()), selective=data.draw(st.booleans()),
            scale=data.draw(st.sampled_from(SCALES)),
            evict_threshold=data.draw(st.sampled_from([None, 0.0, 0.5, 1e39, -1.0, np.nan])))
    except (ValueError, TypeError):
        return
    for _ in range(data.draw(st.integers(1, 4), label="calls")):
        check_finite = data.draw(st.booleans())
        before = cache_state(cache)
        if data.draw(st.booleans(), label="prefill"):
            N = data.draw(st.integers(0, 70))
            shape = data.draw(shapes((B, H, N, D)))
            xs = [data.draw(arrays(shape if data.draw(st.integers(0, 3)) else
                                   data.draw(shapes(shape)))) for _ in range(3)]
            q_N = np.shape(xs[0])[2] if np.ndim(xs[0]) == 4 else N      # q sets the length
            result = expect_clean(lambda: cache.prefill(*xs, check_finite=check_finite),
                                  [(B, H, q_N, D)])
        else:
            xs = [data.draw(arrays((B, H, D) if data.draw(st.integers(0, 3)) else
                                   data.draw(shapes((B, H, D))))) for _ in range(3)]
            result = expect_clean(lambda: cache.step(*xs, check_finite=check_finite), [(B, H, D)])
        if result is None:
            assert_same_state(before, cache_state(cache))
        assert (cache.size <= (cache.budget or cache.length)).all()
