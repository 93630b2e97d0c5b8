"""The C kernels (float32) agree with the NumPy reference (float64) and the golden vectors.

Inputs are rounded to float32 first and the reference runs on those same values in float64, so the
only differences are the kernels' float32 arithmetic, bounded by ``tolerances.c_float32_atol``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import selattn_c
from selattn_reference import attention as ref

from helpers import load_golden, qkv_cases
from tolerances import C_SOFTMAX_ULPS, FLOAT32_EPS, c_float32_atol, selector_kink_margin

GOLDEN = load_golden()


def as_float32_values(*arrays):
    """The arrays rounded to float32 and returned as float64: the exact inputs the kernels see."""
    return tuple(np.asarray(a, dtype=np.float32).astype(np.float64) for a in arrays)


def near_relu_kink(q, k, selector_head: int, scale: float) -> bool:
    """True when a selector logit that can enter S is too close to 0 for float32 to get its sign
    right (see tolerances.selector_kink_margin)."""
    N, D = q.shape[2], q.shape[3]
    q_s, k_s = q[:, selector_head], k[:, selector_head]                       # (B, N, D)
    logits = scale * (q_s @ k_s.swapaxes(-1, -2))                             # (B, N, N)
    size = scale * (np.abs(q_s) @ np.abs(k_s).swapaxes(-1, -2))               # (B, N, N)
    below = np.tri(N, k=-1, dtype=bool)                                       # j < i
    return bool((np.abs(logits) <= selector_kink_margin(D) * size)[:, below].any())


class Bounds:
    """The quantities the float32 tolerance depends on, from the reference's cache."""

    def __init__(self, cache, q, k, v, dout):
        N, D = q.shape[2], q.shape[3]
        causal = np.tri(N, dtype=bool)
        self.N, self.D = N, D
        self.logit_max = float(np.abs(cache.L[..., causal]).max())
        self.mask_max = float(cache.F.max())
        self.natural = {
            "out": float(np.abs(v).max()),
            "F": 1.0,
            "dv": float(np.abs(dout).max()),
            "dq": cache.scale * float(np.abs(k).max() * np.abs(dout).max() * np.abs(v).max()),
            "dk": cache.scale * float(np.abs(q).max() * np.abs(dout).max() * np.abs(v).max()),
        }

    def assert_close(self, name: str, actual: np.ndarray, expected: np.ndarray) -> None:
        assert actual.shape == expected.shape, name
        assert actual.dtype == np.float32, name
        magnitude = max(float(np.abs(expected).max(initial=0.0)), self.natural[name])
        atol = c_float32_atol(magnitude, logit_max=self.logit_max, mask_max=self.mask_max,
                              N=self.N, D=self.D)
        err = float(np.abs(actual.astype(np.float64) - expected).max(initial=0.0))
        assert err <= atol, f"{name}: max error {err:.3g} > tolerance {atol:.3g}"


def check_against_reference(q, k, v, dout, *, selector_head, protect_bos, selective, scale=None,
                            check_grads=True):
    q, k, v, dout = as_float32_values(q, k, v, dout)
    out_ref, cache = ref.forward(q, k, v, selector_head=selector_head, protect_bos=protect_bos,
                                 selective=selective, scale=scale)
    bounds = Bounds(cache, q, k, v, dout)

    out, ctx = selattn_c.forward(q, k, v, selector_head=selector_head, protect_bos=protect_bos,
                                 selective=selective, scale=scale)
    bounds.assert_close("out", out, out_ref)

    F = selattn_c.accumulated_mask(q, k, selector_head=selector_head, protect_bos=protect_bos,
                                   scale=scale)
    F_ref = ref.accumulated_mask(q, k, selector_head=selector_head, protect_bos=protect_bos,
                                 scale=scale)
    bounds.assert_close("F", F, F_ref)

    if check_grads:
        dq, dk, dv = selattn_c.backward(dout, ctx)
        dq_ref, dk_ref, dv_ref = ref.backward(dout, cache)
        bounds.assert_close("dv", dv, dv_ref)
        bounds.assert_close("dq", dq, dq_ref)
        bounds.assert_close("dk", dk, dk_ref)


@given(case=qkv_cases(), seed=st.integers(0, 2**32 - 1), check_grads=st.booleans())
def test_c_matches_reference(case, seed, check_grads):
    """Every option, shapes up to (3, 4, 96, 48) with N = 1 and D = 1, logits up to ~1e3."""
    q, k, v = as_float32_values(case.q, case.k, case.v)
    D = q.shape[-1]
    if check_grads and case.selective:
        assume(not near_relu_kink(q, k, case.selector_head, 1.0 / np.sqrt(D)))
    dout = np.random.default_rng(seed).standard_normal(q.shape)
    check_against_reference(q, k, v, dout, **case.options(), check_grads=check_grads)


@given(case=qkv_cases(max_B=2, max_H=3, min_N=129, max_N=330, max_D=20),
       seed=st.integers(0, 2**32 - 1))
def test_c_matches_reference_over_many_query_blocks(case, seed):
    """N from 129 to 330 spans 3 to 6 blocks of 64: the mask carried into each query block
    (Fstart) and the reverse cumulative sum carried out of it (Rstart) cross several block
    boundaries, which N <= 96 never reaches."""
    q, k, v = as_float32_values(case.q, case.k, case.v)
    grads = not (case.selective and near_relu_kink(q, k, case.selector_head,
                                                   1.0 / np.sqrt(q.shape[-1])))
    dout = np.random.default_rng(seed).standard_normal(q.shape)
    check_against_reference(q, k, v, dout, **case.options(), check_grads=grads)


@given(case=qkv_cases(max_N=70, max_D=16), scale=st.sampled_from([0.05, 0.3, 1.0, 3.0]))
def test_c_matches_reference_with_explicit_scale(case, scale):
    q, k, v = as_float32_values(case.q, case.k, case.v)
    grads = not (case.selective and near_relu_kink(q, k, case.selector_head, scale))
    dout = np.random.default_rng(case.seed).standard_normal(q.shape)
    check_against_reference(q, k, v, dout, **case.options(), scale=scale, check_grads=grads)


@pytest.mark.parametrize("golden", GOLDEN, ids=[g.name for g in GOLDEN])
def test_c_matches_golden(golden):
    """out, F, dq, dk, dv of every golden file, within the float32 tolerance."""
    meta, arrays = golden.meta, golden.arrays
    options = dict(selector_head=meta["selector_head"], protect_bos=meta["protect_bos"],
                   scale=meta["scale"])
    q, k, v, dout = (arrays[name] for name in ("q", "k", "v", "dout"))
    # The golden inputs are float64; the kernels see them rounded to float32, which moves the
    # exact answer by up to eps32 * cond. Bound that move with the reference itself:
    q32, k32, v32, dout32 = as_float32_values(q, k, v, dout)
    _, cache = ref.forward(q32, k32, v32, **options)
    bounds = Bounds(cache, q32, k32, v32, dout32)
    assert not near_relu_kink(q32, k32, meta["selector_head"], meta["scale"])

    out, ctx = selattn_c.forward(q, k, v, **options)
    dq, dk, dv = selattn_c.backward(dout, ctx)
    F = selattn_c.accumulated_mask(q, k, **options)
    # Rounding the inputs to float32 is itself a float32 rounding of every term, which the
    # tolerance's eps32 * cond already counts; so the golden float64 answer is compared directly.
    bounds.assert_close("out", out, arrays["out"])
    bounds.assert_close("F", F, arrays["F"])
    bounds.assert_close("dq", dq, arrays["dq"])
    bounds.assert_close("dk", dk, arrays["dk"])
    bounds.assert_close("dv", dv, arrays["dv"])


@given(case=qkv_cases(max_B=2, max_H=3, max_N=80, max_D=24, input_scales=(0.5, 1.0, 5.0)),
       cut=st.integers(0, 79))
def test_c_is_causal_bitwise(case, cut):
    """Changing q, k, v after position `cut` leaves out[..., :cut + 1, :] bitwise unchanged."""
    N = case.q.shape[2]
    assume(cut < N - 1)
    out, _ = selattn_c.forward(case.q, case.k, case.v, **case.options())
    rng = np.random.default_rng(case.seed + 1)
    q2, k2, v2 = (x.copy() for x in (case.q, case.k, case.v))
    for x in (q2, k2, v2):
        x[:, :, cut + 1:] = rng.standard_normal(x[:, :, cut + 1:].shape)
    out2, _ = selattn_c.forward(q2, k2, v2, **case.options())
    np.testing.assert_array_equal(out2[:, :, :cut + 1], out[:, :, :cut + 1])
    F = selattn_c.accumulated_mask(case.q, case.k, selector_head=case.selector_head,
                                   protect_bos=case.protect_bos)
    F2 = selattn_c.accumulated_mask(q2, k2, selector_head=case.selector_head,
                                    protect_bos=case.protect_bos)
    np.testing.assert_array_equal(F2[:, :cut + 1], F[:, :cut + 1])


@given(case=qkv_cases(max_N=96, max_D=16))
def test_c_mask_invariants(case):
    """F >= 0, zero on and above the diagonal and one below it, BOS column zero when protected,
    non-decreasing down each column: the structure the KV-cache pruning relies on."""
    F = selattn_c.accumulated_mask(case.q, case.k, selector_head=case.selector_head,
                                   protect_bos=case.protect_bos)
    N = F.shape[-1]
    assert (F >= 0).all()
    assert (F[:, ~np.tri(N, k=-2, dtype=bool)] == 0).all()     # j >= i - 1: F[i, i] = F[i, i-1] = 0
    if case.protect_bos:
        assert (F[:, :, 0] == 0).all()
    assert (np.diff(F, axis=1) >= 0).all()


def test_softmax_weights_are_accurate_to_a_few_ulp():
    """Two keys, one dimension, standard attention, v = (1, 0): out[1] is exactly the softmax weight
    of key 0, p = 1 / (1 + exp(L11 - L10)). The general tolerance above scales with N + D + |L| and
    would let a 1e-5 relative error in the exponential through; this one would not."""
    rng = np.random.default_rng(5)
    B = 4000
    q = np.zeros((B, 1, 2, 1), dtype=np.float32)
    k = np.zeros((B, 1, 2, 1), dtype=np.float32)
    q[:, 0, 1, 0] = rng.uniform(-4, 4, B)
    k[:, 0, :, 0] = rng.uniform(-4, 4, (B, 2))
    v = np.zeros((B, 1, 2, 1), dtype=np.float32)
    v[:, 0, 0, 0] = 1.0
    out, _ = selattn_c.forward(q, k, v, selective=False, scale=1.0)
    logits = q[:, 0, 1, 0].astype(np.float64)[:, None] * k[:, 0, :, 0].astype(np.float64)
    p = 1.0 / (1.0 + np.exp(logits[:, 1] - logits[:, 0]))                  # (B,)
    bound = C_SOFTMAX_ULPS * FLOAT32_EPS * (1.0 + np.abs(logits).max(axis=1)) * p
    err = np.abs(out[:, 0, 1, 0].astype(np.float64) - p)
    assert (err <= bound).all(), f"worst error {(err / bound).max():.2f} x the bound"


@pytest.mark.parametrize("N", [64 * 64 + 70, 64 * 20 + 7])
def test_forward_across_the_fstart_ring_and_the_filler(N):
    """The forward keeps the Fstart rows in a ring (at most 65 rows, and at most 1 MiB per batch
    element: 62 rows at N = 64 * 64 + 70), each block's row written by the block above it; from
    block 62 on, blocks reuse the slots of blocks 0-3. When the ring holds every row
    (N = 64 * 20 + 7, 21 blocks), the first 4 blocks take their rows from the two-pass prefix
    instead and run last. Rows sampled across all blocks must be softmax(L - F) v with F from
    accumulated_mask (which builds Fstart for all blocks at once, in two passes), computed here
    in float64 for those rows only."""
    D = 8
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((1, 2, N, D)).astype(np.float32) for _ in range(3))
    q[:, 0] *= 2.0                                 # a selector with some large logits: F grows
    out, _ = selattn_c.forward(q, k, v, selector_head=0)
    rows = np.unique(np.concatenate([np.arange(0, N, 37), np.arange(N - 70, N)]))
    F = selattn_c.accumulated_mask(q, k, selector_head=0)[0, rows].astype(np.float64)
    assert F[rows >= N - 4 * 64].max() > 1.0       # the mask is at work in the last blocks
    scale = 1.0 / np.sqrt(D)
    future = np.arange(N)[None, :] > rows[:, None]
    for h in range(2):
        L = scale * (q[0, h, rows].astype(np.float64) @ k[0, h].astype(np.float64).T)
        logits = np.where(future, -np.inf, L - F)
        P = np.exp(logits - logits.max(axis=1, keepdims=True))
        want = (P / P.sum(axis=1, keepdims=True)) @ v[0, h].astype(np.float64)
        np.testing.assert_allclose(out[0, h, rows], want, rtol=1e-4, atol=1e-5)
