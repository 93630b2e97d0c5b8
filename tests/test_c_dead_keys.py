"""Dead keys (docs/kernel-design.md, "Dead keys"): the C forward, backward and prefill skip the key
tiles whose weight the bound proves below e^-t of their row's total, for a query block and every
later one.

On "trained-like" inputs (``selattn_bench.trained_like``: a selector head that kills each key
after a random lifetime, so F grows large far from the diagonal) the results, gradients included,
agree with the float64 reference within the float32 tolerance of the exact kernel, and with the
exact C kernel within its rounding plus the bound; every weight the skipping drops is within the
bound (checked in float64 on the kernels' own F); the results do not depend on the thread count.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import selattn_c
from selattn_bench.trained_like import trained_like
from selattn_reference import attention as ref

from test_c_against_reference import Bounds, as_float32_values
from tolerances import C_FLOAT32_FACTOR, FLOAT32_EPS

T = 64
# the reference runs N x N in float64 per head: a few dozen examples of N <= 520 take seconds
FEW = settings(max_examples=min(settings().max_examples, 15))


@st.composite
def trained_like_cases(draw, min_N: int = 200, max_N: int = 520):
    """q, k, v (float32 values as float64) and the forward's options: a trained-like selector
    head (lifetimes of mean 2 .. 64 tokens, sometimes immortal keys), B <= 2, H <= 3, D <= 12."""
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    N, D = draw(st.integers(min_N, max_N)), draw(st.integers(3, 12))
    s = draw(st.integers(0, H - 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, k, v = trained_like(rng, B, H, N, D, mean_lifetime=draw(st.sampled_from([2.0, 16.0, 64.0])),
                           immortal=draw(st.sampled_from([0.0, 0.01])),
                           rate=draw(st.sampled_from([0.05, 0.5, 2.0])), noise=0.0,
                           selector_head=s)
    options = dict(selector_head=s, protect_bos=draw(st.booleans()))
    return as_float32_values(q, k, v) + (options, rng)


def dead_mask(dead_from: np.ndarray, N: int) -> np.ndarray:
    """(B, N, N) bool: key j is skipped for query i (i's block at or past j's tile's death)."""
    blocks = np.arange(N) // T
    return blocks[None, :, None] >= dead_from[:, blocks][:, None, :]


def kernel_weights(q, k, F32, scale, selector_head, protect_bos):
    """Every head's softmax weights in float64 on the exact logits of q, k minus the kernels' F
    (float32 bits, as the kernels subtract it): (B, H, N, N)."""
    N = q.shape[2]
    L = scale * (q @ k.swapaxes(-1, -2))
    logits = np.where(np.tri(N, dtype=bool), L - F32.astype(np.float64)[:, None], -np.inf)
    logits -= logits.max(-1, keepdims=True)
    P = np.exp(logits)
    return P / P.sum(-1, keepdims=True)


@FEW
@given(trained_like_cases(), st.sampled_from([1.0, 4.0, 16.0, 32.0]))
def test_every_skipped_weight_is_within_the_bound(case, t):
    """The rigorous statement: where a key's tile is dead for a query's block, its weight is
    below e^-t of the row's total in every head (float64 softmax of the kernels' F)."""
    q, k, v, options, _ = case
    scale = 1.0 / math.sqrt(q.shape[-1])
    dead_from = selattn_c.dead_tiles(q, k, dead_key_threshold=t, **options)
    F32 = selattn_c.accumulated_mask(q, k, **options)
    P = kernel_weights(q, k, F32, scale, **options)
    dead = dead_mask(dead_from, q.shape[2])
    assert np.all(P[np.broadcast_to(dead[:, None], P.shape)] <= math.exp(-t))
    # death is forever and never reaches the diagonal tile
    assert np.all(dead_from >= np.arange(dead_from.shape[1]) + 1)


# the bound's margins, as docs/kernel-design.md states them (csrc/dead_keys.c)
BOUND_EPS = 1.0 / 256.0
F_SHRINK = 1.0 - 2.0**-20


def dead_from_by_the_formula(q, k, F32, t, scale, protect_bos):
    """The bound of docs/kernel-design.md written out in NumPy (float64): for each key tile, the
    first query block whose first row's F (the kernels' bits) kills all its keys."""
    B, H, N, D = q.shape
    nqb = -(-N // T)
    qn, kn = np.linalg.norm(q, axis=-1), np.linalg.norm(k, axis=-1)            # (B, H, N)
    anchor, kref = scale * np.einsum("bhnd,bhnd->bhn", q, k), kn
    if protect_bos:
        anchor = np.maximum(anchor, scale * np.einsum("bhnd,bhd->bhn", q, k[:, :, 0]))
        kref = np.maximum(kn, kn[:, :, :1])
    ci = -anchor + BOUND_EPS * abs(scale) * qn * kref
    # suffix maxima over the rows i >= i0 of each block
    a = (1 + BOUND_EPS) * abs(scale) * np.maximum.accumulate(qn[..., ::-1], -1)[..., ::-1][..., ::T]
    c = np.maximum.accumulate(ci[..., ::-1], -1)[..., ::-1][..., ::T]          # (B, H, nqb)
    dead_from = np.full((B, nqb), nqb, dtype=np.int64)
    for b in range(B):
        for kb in range(nqb):
            for qb in range(kb + 1, nqb):
                cols = slice(kb * T, min(N, kb * T + T))
                need = (a[b, :, qb, None] * kn[b, :, cols] + c[b, :, qb, None]).max(0)
                f = F32[b, qb * T, cols].astype(np.float64) * F_SHRINK
                if np.all(f >= t) and np.all(f >= t + need):
                    dead_from[b, kb] = qb
                    break
    return dead_from


@FEW
@given(trained_like_cases(max_N=400), st.sampled_from([1.0, 8.0, 32.0]))
def test_the_kernels_kill_exactly_the_tiles_the_formula_kills(case, t):
    """selattn_c.dead_tiles is the documented bound, decision for decision (so the bound the
    property above checks is the one the kernels use, not a looser one)."""
    q, k, v, options, _ = case
    scale = 1.0 / math.sqrt(q.shape[-1])
    F32 = selattn_c.accumulated_mask(q, k, **options)
    expected = dead_from_by_the_formula(q, k, F32, t, scale, options["protect_bos"])
    np.testing.assert_array_equal(selattn_c.dead_tiles(q, k, dead_key_threshold=t, **options),
                                  expected)


def test_the_trained_like_inputs_have_dead_tiles():
    """The property tests above and below do skip: on these inputs most tiles far from the
    diagonal are dead at the default threshold (so a skipping bug cannot hide)."""
    q, k, v = trained_like(np.random.default_rng(0), 1, 2, 512, 8, mean_lifetime=16.0)
    dead_from = selattn_c.dead_tiles(q, k)
    nqb = dead_from.shape[1]
    skipped = int(np.sum(nqb - dead_from))
    assert skipped >= 10, dead_from                   # of the 28 tiles below the diagonal


@FEW
@given(trained_like_cases(), st.integers(0, 2**32 - 1))
def test_skipping_matches_the_reference_with_gradients(case, seed):
    """out, dq, dk, dv at the default threshold against the float64 reference, within the
    float32 tolerance of the exact kernel."""
    q, k, v, options, _ = case
    dout = as_float32_values(np.random.default_rng(seed).standard_normal(q.shape))[0]
    out_ref, cache = ref.forward(q, k, v, **options)
    bounds = Bounds(cache, q, k, v, dout)
    out, ctx = selattn_c.forward(q, k, v, **options)
    assert ctx.dead_key_threshold == selattn_c.DEFAULT_DEAD_KEY_THRESHOLD
    bounds.assert_close("out", out, out_ref)
    for name, got, want in zip(("dq", "dk", "dv"), selattn_c.backward(dout, ctx),
                               ref.backward(dout, cache)):
        bounds.assert_close(name, got, want)


def rounding_tolerance(magnitude: float, N: int, D: int, dropped: float) -> float:
    """|skipping - exact| of two float32 kernels that make the same operations on the live
    tiles: their rounding (C_FLOAT32_FACTOR eps32 (N + D) of the magnitude: no F or logit term,
    both see the same bits of F and L) plus twice the weight the skipping may drop."""
    return (C_FLOAT32_FACTOR * FLOAT32_EPS * (N + D) + 2.0 * dropped) * magnitude


@FEW
@given(trained_like_cases(min_N=320), st.sampled_from([24.0, 32.0]), st.booleans())
def test_skipping_matches_the_exact_kernel_within_the_bound(case, t, with_dF):
    """Against the exact C kernel (dead_key_threshold=None), with or without an extra gradient
    on rows of F below the dead tiles (the memory loss' path, whose reverse cumsum runs up
    through them, gated by S > 0 there): the difference is the float32 rounding plus N e^-t of
    the magnitude."""
    q, k, v, options, rng = case
    B, H, N, D = q.shape
    dout = rng.standard_normal(q.shape).astype(np.float32)
    out0, ctx0 = selattn_c.forward(q, k, v, dead_key_threshold=None, **options)
    out1, ctx1 = selattn_c.forward(q, k, v, dead_key_threshold=t, **options)
    dropped = N * math.exp(-t)
    assert ctx0.dead_key_threshold == 0.0
    kw = {}
    if with_dF:                        # random gradients on the last row and two late ones
        index = np.concatenate([np.full((B, 1), N - 1), rng.integers(N // 2, N, (B, 2))], 1)
        kw = dict(dF_rows=rng.standard_normal((B, 3, N)).astype(np.float32),
                  dF_row_index=index.astype(np.int64))
    g0 = selattn_c.backward(dout, ctx0, **kw)
    g1 = selattn_c.backward(dout, ctx1, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out0,) + g0, (out1,) + g1):
        magnitude = float(np.abs(a).max())
        err = float(np.abs(a.astype(np.float64) - b).max())
        assert err <= rounding_tolerance(magnitude, N, D, dropped), (name, err, magnitude)


@FEW
@given(trained_like_cases(max_N=400), st.integers(0, 2**32 - 1))
def test_skipping_with_the_rank_penalty_matches_the_reference(case, seed):
    """The rank penalty (soft budgets) subtracts F_soft >= F: the bound holds for it too, and the
    cuts (found on the whole of F before the loop) are the exact kernel's."""
    q, k, v, options, rng = case
    N = q.shape[2]
    budget = int(rng.integers(2, 40))
    dout = as_float32_values(rng.standard_normal(q.shape))[0]
    options = dict(options, soft_budget=budget, soft_strength=10.0)
    out0, ctx0 = selattn_c.forward(q, k, v, dead_key_threshold=None, **options)
    out1, ctx1 = selattn_c.forward(q, k, v, **options)
    np.testing.assert_array_equal(ctx1.soft_cut, ctx0.soft_cut)
    np.testing.assert_array_equal(ctx1.soft_theta, ctx0.soft_theta)
    dropped = N * math.exp(-selattn_c.DEFAULT_DEAD_KEY_THRESHOLD)
    for name, a, b in zip(("out", "dq", "dk", "dv"),
                          (out0,) + selattn_c.backward(dout, ctx0),
                          (out1,) + selattn_c.backward(dout, ctx1)):
        magnitude = float(np.abs(a).max())
        err = float(np.abs(a.astype(np.float64) - b).max())
        assert err <= rounding_tolerance(magnitude, N, q.shape[3], dropped), (name, err)


@pytest.mark.parametrize("N", [520, 4160])
def test_skipping_is_bitwise_the_same_for_any_thread_count(N):
    """1 and 2 threads give the same bits: the wavefront and the filler (N = 520), and the ring
    of Fstart rows that wraps (N = 4160 > 4096: no rows kept, the backward builds its own)."""
    rng = np.random.default_rng(N)
    q, k, v = trained_like(rng, 1, 2, N, 8, mean_lifetime=16.0)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    assert np.sum(selattn_c.dead_tiles(q, k) < -(-N // T)) > 0
    results = []
    before = selattn_c.get_num_threads()
    try:
        for threads in (1, 2):
            selattn_c.set_num_threads(threads)
            out, ctx = selattn_c.forward(q, k, v)
            results.append((out,) + selattn_c.backward(dout, ctx))
    finally:
        selattn_c.set_num_threads(before)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_the_memory_loss_ignores_the_skipped_rows():
    """A skipping forward keeps +inf, not F, on dead tiles of its fstart: the memory loss of its
    Context builds F itself and equals that of the exact forward's Context bit for bit."""
    q, k, v = trained_like(np.random.default_rng(3), 1, 2, 512, 8, mean_lifetime=16.0)
    _, ctx0 = selattn_c.forward(q, k, v, dead_key_threshold=None)
    _, ctx1 = selattn_c.forward(q, k, v)
    assert np.isposinf(ctx1.fstart).any() and not np.isinf(ctx0.fstart).any()
    for tau in (1.0, 1e3):
        np.testing.assert_array_equal(selattn_c.memory_rows(ctx1, tau),
                                      selattn_c.memory_rows(ctx0, tau))
    rows = np.array([[511, 300]], dtype=np.int64)
    np.testing.assert_array_equal(selattn_c.mask_rows(ctx1, rows), selattn_c.mask_rows(ctx0, rows))


def test_the_prefill_skips_and_leaves_the_same_cache():
    """A prefill into an empty cache skips dead keys by default: its outputs agree with the exact
    prefill's within rounding and the bound, and its state is bitwise the same."""
    q, k, v = trained_like(np.random.default_rng(4), 1, 2, 400, 8, mean_lifetime=16.0)
    outs, states = [], []
    for t in (None, selattn_c.DEFAULT_DEAD_KEY_THRESHOLD):
        with selattn_c.KVCache(1, 2, 8, dead_key_threshold=t) as cache:
            outs.append(cache.prefill(q, k, v))
            states.append((cache.F.copy(), cache.positions.copy()))
    np.testing.assert_array_equal(states[0][0], states[1][0])
    np.testing.assert_array_equal(states[0][1], states[1][1])
    tol = rounding_tolerance(float(np.abs(outs[0]).max()), 400, 8,
                             400 * math.exp(-selattn_c.DEFAULT_DEAD_KEY_THRESHOLD))
    assert float(np.abs(outs[0] - outs[1]).max()) <= tol


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (-1.0, ValueError),
                                        (float("inf"), ValueError), (float("nan"), ValueError),
                                        (1e39, ValueError), ("32", TypeError), (True, TypeError)])
def test_a_bad_threshold_is_refused(bad, error):
    q = np.zeros((1, 1, 4, 2), dtype=np.float32)
    with pytest.raises(error, match="dead_key_threshold"):
        selattn_c.forward(q, q, q, dead_key_threshold=bad)
    with pytest.raises(error, match="dead_key_threshold"):
        selattn_c.KVCache(1, 1, 2, dead_key_threshold=bad)
