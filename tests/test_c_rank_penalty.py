"""The rank penalty of pruning-aware training (docs/selective-attention.md § 10) in the C kernels:
``selattn_c.forward(..., soft_budget=, soft_strength=)`` and its backward against the NumPy
reference (float64, on the same float32-rounded inputs), the cases where it must be no penalty
at all (bit for bit), thread-count determinism, bad input, and the tiny LM's gradient step on the
C backend against the NumPy backend.

Ties: the reference takes the cut's column from argpartition, the kernels the lowest column with
F == theta. Where F is tied at theta only the gradient's cut share could land elsewhere, and
F's structural ties are at 0, whose column never reaches S (every S above a zero F is 0), so the
gradients agree there too. Inputs where a key's F is within float32 rounding of its row's cut
(the past set or the cut's column could legitimately differ: the reference's own rule, run on
the kernels' float32 F, decides differently) are skipped.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import selattn_c
from selattn_lm.backends import CAttention, NumpyAttention
from selattn_reference import attention as ref
from selattn_lm import model as M
from selattn_lm.optim import AdamW

from helpers import assert_float32_grads_close, qkv_cases
from tolerances import (
    MODEL_FLOAT32_RTOL,
    TRAINING_CURVE_RTOL,
    c_float32_atol,
    rank_penalty_mask_max,
    selector_kink_margin,
)


def as_float32_values(*arrays):
    """The arrays rounded to float32, as float64: the exact inputs the kernels see."""
    return tuple(np.asarray(a, dtype=np.float32).astype(np.float64) for a in arrays)


def near_relu_kink(q, k, selector_head: int, scale: float) -> bool:
    """A selector logit that can enter S too close to 0 for float32 to get its sign right."""
    N, D = q.shape[2], q.shape[3]
    q_s, k_s = q[:, selector_head], k[:, selector_head]                       # (B, N, D)
    logits = scale * (q_s @ k_s.swapaxes(-1, -2))                             # (B, N, N)
    size = scale * (np.abs(q_s) @ np.abs(k_s).swapaxes(-1, -2))               # (B, N, N)
    below = np.tri(N, k=-1, dtype=bool)
    return bool((np.abs(logits) <= selector_kink_margin(D) * size)[:, below].any())


def cut_decisions_differ(F32: np.ndarray, F: np.ndarray, budget: int) -> bool:
    """True when the reference's rank penalty, run on the kernels' float32 F (as float64) and on
    the float64 F, puts a different set of keys past the cuts, or a different column at a cut
    whose theta is not 0 (F's structural zero ties, which reach no gradient): a key within
    float32 rounding of its row's cut, where the two may legitimately disagree."""
    _, cut32 = ref.rank_penalty(F32.astype(np.float64), budget, 1.0)
    _, cut = ref.rank_penalty(F, budget, 1.0)
    past32, _ = ref.keys_past_the_cut(F32.astype(np.float64), cut32)
    past, theta = ref.keys_past_the_cut(F, cut)
    positive = (cut >= 0) & (theta[..., 0] > 0)
    return bool((past32 != past).any() or (cut32 != cut)[positive].any())


class Bounds:
    """The float32 tolerance of each result (tolerances.c_float32_atol), with F's bound widened
    to F_soft's (tolerances.rank_penalty_mask_max) and the natural size of the gradients grown by
    the penalty's factors on dF."""

    def __init__(self, cache, q, k, v, dout, strength: float, dF_max: float = 0.0):
        N, D = q.shape[2], q.shape[3]
        causal = np.tri(N, dtype=bool)
        self.N, self.D = N, D
        self.logit_max = float(np.abs(cache.L[..., causal]).max())
        self.mask_max = rank_penalty_mask_max(float(cache.F.max()), strength)
        # |dF| <= (1 + strength) |dF_soft| on a key, plus strength * N |dF_soft| at a cut
        upstream = (float(np.abs(dout).max() * np.abs(v).max()) * (1.0 + strength * (N + 1))
                    + N * dF_max)
        self.natural = {
            "out": float(np.abs(v).max()),
            "theta": 1.0,
            "dv": float(np.abs(dout).max()),
            "dq": cache.scale * float(np.abs(k).max()) * upstream,
            "dk": cache.scale * float(np.abs(q).max()) * upstream,
        }

    def atol(self, name: str, expected: np.ndarray) -> float:
        magnitude = max(float(np.abs(expected).max(initial=0.0)), self.natural[name])
        return c_float32_atol(magnitude, logit_max=self.logit_max, mask_max=self.mask_max,
                              N=self.N, D=self.D)

    def assert_close(self, name: str, actual: np.ndarray, expected: np.ndarray) -> None:
        assert actual.shape == expected.shape and actual.dtype == np.float32, name
        err = float(np.abs(actual.astype(np.float64) - expected).max(initial=0.0))
        atol = self.atol(name, expected)
        assert err <= atol, f"{name}: max error {err:.3g} > tolerance {atol:.3g}"


def soft_budgets(N: int, protect_bos: bool):
    """A soft budget from the smallest legal one (2 with BOS protection, 1 without) to N + 1."""
    smallest = 2 if protect_bos else 1
    return st.integers(smallest, max(smallest, N + 1))


strengths = st.one_of(st.sampled_from([0.0, 1.0, 10.0, 20.0]), st.floats(0.0, 20.0))


@st.composite
def soft_cases(draw, max_N: int = 80, min_N: int = 1):
    case = draw(qkv_cases(max_B=2, max_H=3, max_N=max_N, min_N=min_N, max_D=16,
                          selective=True, input_scales=(0.5, 1.0, 2.0, 5.0)))
    budget = draw(soft_budgets(case.shape[2], case.protect_bos))
    strength = draw(strengths)
    return case, budget, strength


def check_soft_against_reference(case, budget: int, strength: float, seed: int,
                                 with_dF: bool = False) -> None:
    q, k, v = as_float32_values(case.q, case.k, case.v)
    B, H, N, D = q.shape
    assume(not near_relu_kink(q, k, case.selector_head, 1.0 / np.sqrt(D)))
    rng = np.random.default_rng(seed)
    dout = as_float32_values(rng.standard_normal(q.shape))[0]             # (B, H, N, D)
    options = dict(case.options(), soft_budget=budget, soft_strength=strength)
    out_ref, cache = ref.forward(q, k, v, **options)
    F32 = selattn_c.accumulated_mask(q, k, selector_head=case.selector_head,
                                     protect_bos=case.protect_bos)   # the kernels' bits of F
    assume(budget >= N or not cut_decisions_differ(F32, cache.F, budget))

    out, ctx = selattn_c.forward(q, k, v, **options)
    bounds = Bounds(cache, q, k, v, dout, strength)
    bounds.assert_close("out", out, out_ref)
    # the cuts: the same rows have one; theta is F's value there; the column is the reference's
    # wherever theta is not a (structural) zero tie
    has_cut = cache.soft_cut >= 0
    np.testing.assert_array_equal(ctx.soft_cut >= 0, has_cut)
    assert np.all(np.isposinf(ctx.soft_theta[~has_cut]))
    theta_ref = np.take_along_axis(cache.F, np.maximum(cache.soft_cut, 0)[..., None], -1)[..., 0]
    bounds.assert_close("theta", np.where(has_cut, ctx.soft_theta, 0).astype(np.float32),
                        np.where(has_cut, theta_ref, 0))
    unique = has_cut & (theta_ref > 0)
    np.testing.assert_array_equal(ctx.soft_cut[unique], cache.soft_cut[unique])

    dF = rng.standard_normal((B, N, N)) if with_dF else None
    if with_dF:
        (dF,) = as_float32_values(dF)
        index = np.broadcast_to(np.arange(N, dtype=np.int64), (B, N))
        grads = selattn_c.backward(dout, ctx, dF_rows=dF, dF_row_index=index)
        bounds = Bounds(cache, q, k, v, dout, strength, dF_max=float(np.abs(dF).max()))
    else:
        grads = selattn_c.backward(dout, ctx)
    grads_ref = ref.backward(dout, cache, dF=dF)
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads_ref):
        bounds.assert_close(name, got, want)


@given(soft_cases(), st.integers(0, 2**32 - 1))
def test_c_rank_penalty_matches_reference(sc, seed):
    """Shapes up to (2, 3, 80, 16), every soft budget from the smallest to N + 1, strength 0..20:
    out, the cuts and dq, dk, dv within the float32 bound."""
    case, budget, strength = sc
    check_soft_against_reference(case, budget, strength, seed)


@given(soft_cases(max_N=330, min_N=65), st.integers(0, 2**32 - 1))
def test_c_rank_penalty_matches_reference_over_several_blocks(sc, seed):
    """N from 65 to 330 (2 to 6 query blocks of 64): rows whose keys span several tiles, cuts in
    other key blocks than the row's, the cut's share carried across block boundaries, and rows
    long enough for the selection's sampled pivots (more than 256 keys)."""
    case, budget, strength = sc
    check_soft_against_reference(case, budget, strength, seed)


@given(soft_cases(max_N=140), st.integers(0, 2**32 - 1))
def test_c_rank_penalty_with_an_extra_gradient_on_F(sc, seed):
    """backward(..., dF_rows=) through the penalty: the extra gradient is on F, not on F_soft
    (the reference adds it after rank_penalty_backward), so the kernels must add it after too."""
    case, budget, strength = sc
    check_soft_against_reference(case, budget, strength, seed, with_dF=True)


@pytest.mark.parametrize("N, budget, input_scale", [
    (300, 2, 1.0), (300, 40, 0.1), (520, 7, 2.0), (520, 260, 1.0), (700, 699, 0.5),
    (700, 64, 5.0), (1000, 3, 1.0), (1000, 500, 0.3),
])
def test_the_cuts_are_the_kth_smallest_of_the_kernels_F_exactly(N, budget, input_scale):
    """theta is exactly the budget-th smallest of the kernels' own float32 F row (np.partition
    of selattn_c.accumulated_mask, the same bits), and the cut the lowest column holding it: the
    selection (sampled pivots on rows over 256 keys, quickselect) has no rounding to hide in."""
    rng = np.random.default_rng(N + budget)
    q, k, v = (input_scale * rng.standard_normal((1, 2, N, 8))).astype(np.float32), \
        (input_scale * rng.standard_normal((1, 2, N, 8))).astype(np.float32), \
        rng.standard_normal((1, 2, N, 8)).astype(np.float32)
    _, ctx = selattn_c.forward(q, k, v, soft_budget=budget)
    F = selattn_c.accumulated_mask(q, k)[0]                              # (N, N) float32
    for i in range(N):
        if i < budget:
            assert ctx.soft_cut[0, i] == -1 and np.isposinf(ctx.soft_theta[0, i])
            continue
        theta = np.partition(F[i, :i + 1], budget - 1)[budget - 1]
        assert ctx.soft_theta[0, i] == theta, i
        assert ctx.soft_cut[0, i] == np.flatnonzero(F[i, :i + 1] == theta)[0], i


def random_inputs(seed: int, shape, input_scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return tuple((input_scale * rng.standard_normal(shape)).astype(np.float32)
                 for _ in range(4))


@pytest.mark.parametrize("N", [1, 5, 64, 130])
def test_zero_strength_is_no_penalty(N):
    """strength 0: F_soft = F + 0 (F - theta) = F exactly, and the backward's factors are 1 and
    0: out and the gradients equal the plain forward's and backward's, value for value."""
    q, k, v, dout = random_inputs(N, (2, 3, N, 8), 2.0)
    out0, ctx0 = selattn_c.forward(q, k, v)
    grads0 = selattn_c.backward(dout, ctx0)
    out, ctx = selattn_c.forward(q, k, v, soft_budget=2, soft_strength=0.0)
    assert N < 3 or (ctx.soft_cut >= 0).any()        # there are cuts: the penalty code ran
    np.testing.assert_array_equal(out, out0)
    for got, want in zip(selattn_c.backward(dout, ctx), grads0):
        np.testing.assert_array_equal(got, want)


def test_a_penalty_changes_the_result():
    """The counterpart of the tests above: with strength > 0 and cuts, out and the selector head's
    gradients differ from the plain layer's by far more than float32 noise."""
    q, k, v, dout = random_inputs(3, (1, 2, 100, 8), 2.0)
    out0, ctx0 = selattn_c.forward(q, k, v)
    out, ctx = selattn_c.forward(q, k, v, soft_budget=4, soft_strength=10.0)
    assert np.abs(out - out0).max() > 1e-2
    dq0 = selattn_c.backward(dout, ctx0)[0]
    dq = selattn_c.backward(dout, ctx)[0]
    assert np.abs(dq - dq0)[:, 0].max() > 1e-2


@pytest.mark.parametrize("N", [1, 7, 64, 100])
@pytest.mark.parametrize("extra", [0, 1, 10**30])
def test_a_budget_of_N_or_more_is_no_penalty_bitwise(N, extra):
    """No row has more than N keys: no cut anywhere (theta +inf, cut -1), and the forward and the
    backward are the plain ones bit for bit."""
    q, k, v, dout = random_inputs(N + 11, (2, 2, N, 4), 2.0)
    out0, ctx0 = selattn_c.forward(q, k, v)
    grads0 = selattn_c.backward(dout, ctx0)
    budget = max(N + extra, 2)
    out, ctx = selattn_c.forward(q, k, v, soft_budget=budget, soft_strength=10.0)
    assert np.all(ctx.soft_cut == -1) and np.all(np.isposinf(ctx.soft_theta))
    assert out.tobytes() == out0.tobytes()
    for got, want in zip(selattn_c.backward(dout, ctx), grads0):
        assert got.tobytes() == want.tobytes()


def test_not_selective_has_no_penalty():
    """A standard layer's F is 0: nothing is past a cut, as in the reference."""
    q, k, v, dout = random_inputs(8, (1, 2, 30, 4))
    out0, _ = selattn_c.forward(q, k, v, selective=False)
    out, ctx = selattn_c.forward(q, k, v, selective=False, soft_budget=3)
    ref_out, _ = ref.forward(*as_float32_values(q, k, v), selective=False, soft_budget=3)
    assert out.tobytes() == out0.tobytes()
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    assert np.all(ctx.soft_cut == -1)


@pytest.mark.parametrize("N", [60, 200, 333])
def test_one_and_two_threads_give_the_same_bits(N):
    """The cuts are found per row and the penalty's gradient summed in an order fixed by the
    problem (one partial sum per dq chunk), so any thread count gives the same bits."""
    q, k, v, dout = random_inputs(N, (2, 3, N, 8), 2.0)
    before = selattn_c.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            selattn_c.set_num_threads(threads)
            out, ctx = selattn_c.forward(q, k, v, soft_budget=9, soft_strength=7.0)
            grads = selattn_c.backward(dout, ctx)
            results.append([out, ctx.soft_theta, ctx.soft_cut, *grads])
    finally:
        selattn_c.set_num_threads(before)
    for one, two in zip(*results):
        assert one.tobytes() == two.tobytes()


def test_backward_without_the_kept_rows():
    """A Context without Fstart rows (as beyond N = 4096, where the forward keeps none): the
    backward builds its own, and F, hence the penalty's past keys, has the same bits."""
    q, k, v, dout = random_inputs(5, (1, 1, 300, 4), 2.0)
    out, ctx = selattn_c.forward(q, k, v, soft_budget=6)
    grads = selattn_c.backward(dout, ctx)
    grads_no_rows = selattn_c.backward(dout, dataclasses.replace(ctx, fstart=None))
    for got, want in zip(grads_no_rows, grads):
        assert got.tobytes() == want.tobytes()


# ----------------------------------------------------------------------------------------------
# Bad input (the rows of docs/reliability.md's table are in tests/test_c_bad_inputs.py)


@pytest.mark.parametrize("kwargs, error, text", [
    (dict(soft_budget=1), ValueError, "soft_budget 1 is too small"),
    (dict(soft_budget=0, protect_bos=False), ValueError, "soft_budget 0 is too small"),
    (dict(soft_budget=-3), ValueError, "too small"),
    (dict(soft_budget=2.5), TypeError, "soft_budget must be an int"),
    (dict(soft_budget=True), TypeError, "soft_budget must be an int"),
    (dict(soft_budget=4, soft_strength=-1.0), ValueError, "soft_strength must be a finite"),
    (dict(soft_budget=4, soft_strength=float("nan")), ValueError, "soft_strength"),
    (dict(soft_budget=4, soft_strength=float("inf")), ValueError, "soft_strength"),
    (dict(soft_budget=4, soft_strength=1e39), ValueError, "finite as a float32"),
    (dict(soft_budget=4, soft_strength="1"), TypeError, "soft_strength must be a number"),
    (dict(soft_budget=4, budget=4), ValueError, "cannot be combined"),
])
def test_bad_soft_arguments(kwargs, error, text):
    q, k, v, _ = random_inputs(0, (1, 2, 6, 4))
    with pytest.raises(error, match=text):
        selattn_c.forward(q, k, v, **kwargs)


@pytest.mark.parametrize("field, value, text", [
    ("soft_theta", np.zeros((1, 5), np.float32), "ctx.soft_theta must be"),
    ("soft_theta", np.zeros((1, 6), np.float64), "ctx.soft_theta must be"),
    ("soft_cut", np.zeros((1, 6), np.int32), "ctx.soft_cut must be"),
    ("soft_cut", None, "ctx.soft_cut must be"),
    ("soft_strength", -2.0, "soft_strength"),
])
def test_backward_refuses_an_altered_soft_context(field, value, text):
    q, k, v, dout = random_inputs(0, (1, 2, 6, 4))
    _, ctx = selattn_c.forward(q, k, v, soft_budget=3)
    with pytest.raises(ValueError, match=text):
        selattn_c.backward(dout, dataclasses.replace(ctx, **{field: value}))


# ----------------------------------------------------------------------------------------------
# The tiny LM: a gradient step with soft budgets on the C backend and on the NumPy backend

CFG = M.ModelConfig(vocab_size=20, context=32, n_layers=2, n_heads=4, d_model=32, eps=1.0)
SOFT_BUDGETS = [5, 8]


def model_inputs(seed: int):
    rng = np.random.default_rng(seed)
    params = M.init_params(CFG, seed=seed)
    for p in params.values():             # larger weights than at init: a live selector
        p += (0.2 * rng.standard_normal(p.shape)).astype(np.float32)
    tokens = rng.integers(1, CFG.vocab_size, (8, CFG.context + 1))
    mask = np.ones((8, CFG.context), dtype=bool)
    return params, tokens[:, :-1], tokens[:, 1:], mask


def gradient_step(params, tokens, targets, mask, attention, soft_budgets):
    """One forward, backward and AdamW step; returns the losses, the gradients and the new
    parameters."""
    params = {n: p.copy() for n, p in params.items()}
    _, losses, cache = M.forward(params, CFG, tokens, targets, mask, attention=attention,
                                 soft_budgets=soft_budgets, soft_strength=10.0)
    grads = M.backward(cache)
    AdamW(params, lr=1e-3).step(params, grads)
    return losses, grads, params


def test_model_gradient_step_with_soft_budgets_matches_the_numpy_backend():
    """The losses and every gradient tensor agree between the backends within float32 noise, and
    so does the loss after the AdamW step, each backend on its own updated weights (the weights
    themselves are not compared: see test_model_backend's training curve for why). And the
    penalty matters: the gradient without it differs by far more."""
    params, tokens, targets, mask = model_inputs(2)
    losses, grads, new = gradient_step(params, tokens, targets, mask, NumpyAttention(),
                                       SOFT_BUDGETS)
    losses_c, grads_c, new_c = gradient_step(params, tokens, targets, mask, CAttention(),
                                             SOFT_BUDGETS)
    for key in losses:
        assert losses_c[key] == pytest.approx(losses[key], rel=MODEL_FLOAT32_RTOL, abs=1e-6)
    assert_float32_grads_close(grads_c, grads, MODEL_FLOAT32_RTOL)
    after, _, _ = gradient_step(new, tokens, targets, mask, NumpyAttention(), SOFT_BUDGETS)
    after_c, _, _ = gradient_step(new_c, tokens, targets, mask, CAttention(), SOFT_BUDGETS)
    assert after["total"] < losses["total"]           # the step went downhill
    assert after_c["total"] == pytest.approx(after["total"], rel=TRAINING_CURVE_RTOL)
    _, plain, _ = gradient_step(params, tokens, targets, mask, CAttention(), None)
    selector = "h0.attn.wqkv"
    assert np.linalg.norm(plain[selector] - grads[selector]) > \
        100 * MODEL_FLOAT32_RTOL * np.linalg.norm(grads[selector])
