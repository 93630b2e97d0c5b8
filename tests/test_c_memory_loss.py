"""The memory loss on the C kernels (``selattn_c.memory``) against the float64 reference.

``selattn_c.memory_loss`` and ``memory_loss_backward`` never build F (B, N, N): they take the
kept row sums and single rows of F from the kernels, and the backward takes the gradient as rows
(``backward(..., dF_rows=, dF_row_index=)``). These tests hold each piece to the reference that
does build F: ``selattn_reference.attention.memory_loss`` / ``memory_loss_backward`` on F and
``selattn_reference.attention.backward(..., dF=)`` with the dense gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import selattn_c
from selattn_reference import attention as ref

from helpers import qkv_cases, random_qkv
from test_c_against_reference import Bounds, as_float32_values, near_relu_kink
from tolerances import FLOAT32_EPS, MEMORY_ROW_GAP, c_float32_atol

seeds = st.integers(0, 2**32 - 1)
# tau values that are exact in float32, so the kernels' F < float32(tau) and the reference's
# F < tau draw the same line
taus = st.sampled_from([0.25, 0.5, 1.0, 2.0, 8.0])


def selective_case(max_N: int = 96, min_N: int = 1):
    return qkv_cases(max_B=3, max_H=3, min_N=min_N, max_N=max_N, max_D=16, selective=True)


def kept_reference(F: np.ndarray, tau: float) -> np.ndarray:
    """kept[b, i] = sum_{j <= i} (1 - min(F[b, i, j], tau) / tau) in float64, (B, N)."""
    N = F.shape[-1]
    return np.where(np.tri(N, dtype=bool), 1.0 - np.minimum(F, tau) / tau, 0.0).sum(axis=-1)


def kept_atol(F_ref: np.ndarray, tau: float, cache) -> float:
    """How far the kernels' kept row sums may be from the float64 ones: each of the <= N terms
    moves by at most |F32 - F64| / tau (min(., tau) is 1-Lipschitz), F32 is within the F
    tolerance of c_float32_atol, and the double sum of float32 terms adds N * eps32 per term."""
    B, H, N, D = cache.q.shape
    logit_max = float(np.abs(cache.L[..., np.tri(N, dtype=bool)]).max())
    F_atol = c_float32_atol(max(1.0, float(F_ref.max())), logit_max=logit_max,
                            mask_max=float(F_ref.max()), N=N, D=D)
    return N * (F_atol / tau + 2 * FLOAT32_EPS)


def options(case):
    return dict(selector_head=case.selector_head, protect_bos=case.protect_bos)


@given(case=selective_case(), tau=taus)
def test_memory_rows_and_loss_match_the_reference(case, tau):
    """kept (B, N) and mem (B,) from the kernels vs the float64 sums over the reference's F."""
    q, k, v = as_float32_values(case.q, case.k, case.v)
    _, cache = ref.forward(q, k, v, **options(case))
    kept = selattn_c.memory_rows((q, k), tau, **options(case))
    kept_ref = kept_reference(cache.F, tau)
    atol = kept_atol(cache.F, tau, cache)
    assert kept.dtype == np.float32 and kept.shape == kept_ref.shape
    assert np.abs(kept - kept_ref).max() <= atol
    mem = selattn_c.memory_loss((q, k), tau, **options(case))
    np.testing.assert_allclose(mem, ref.memory_loss(cache.F, tau), rtol=0, atol=atol)


@given(case=selective_case(max_N=150), data=st.data())
def test_mask_rows_are_the_bits_of_accumulated_mask(case, data):
    """Any rows, in any order, repeated or unused (-1): the same bits as the dense C mask."""
    q, k = (np.asarray(x, dtype=np.float32) for x in (case.q, case.k))
    B, H, N, D = q.shape
    R = data.draw(st.integers(0, 5), label="R")
    index = np.array(data.draw(st.lists(st.lists(st.integers(-1, N - 1), min_size=R,
                                                 max_size=R), min_size=B, max_size=B),
                               label="index"), dtype=np.int64).reshape(B, R)
    F = selattn_c.accumulated_mask(q, k, **options(case))                       # (B, N, N)
    rows = selattn_c.mask_rows((q, k), index, **options(case))                  # (B, R, N)
    b = np.arange(B)[:, None]
    expected = np.where((index >= 0)[..., None], F[b, np.maximum(index, 0)], 0.0)
    assert rows.dtype == np.float32
    assert np.array_equal(rows, expected.astype(np.float32))


@given(case=selective_case(max_N=150))
def test_a_context_and_its_q_k_give_the_same_bits(case):
    """With a Context the kernels reuse the forward's Fstart rows; from (q, k) they rebuild
    them: the results must not differ by a bit."""
    q, k, v = (np.asarray(x, dtype=np.float32) for x in (case.q, case.k, case.v))
    _, ctx = selattn_c.forward(q, k, v, **options(case))
    assert np.array_equal(selattn_c.memory_rows(ctx, 0.5), selattn_c.memory_rows(
        (q, k), 0.5, **options(case)))
    index = np.arange(q.shape[2], dtype=np.int64)[None].repeat(q.shape[0], axis=0)
    assert np.array_equal(selattn_c.mask_rows(ctx, index),
                          selattn_c.mask_rows((q, k), index, **options(case)))


@given(case=selective_case(), tau=taus, seed=seeds)
def test_memory_loss_backward_is_the_reference_gradient_as_a_row(case, tau, seed):
    """The DFRows of the kernels, spread into (B, N, N), equal the reference's dense dF on the
    kernels' own F (the same argmax row, the same F < tau), up to the float32 rounding of
    -dmem / tau."""
    q, k = (np.asarray(x, dtype=np.float32) for x in (case.q, case.k))
    B, H, N, D = q.shape
    F = selattn_c.accumulated_mask(q, k, **options(case)).astype(np.float64)
    kept = kept_reference(F, tau)
    top = np.sort(kept, axis=-1)
    if N > 1:      # a near tie for the max row may go either way between float32 and float64
        assume(np.all(top[:, -1] - top[:, -2] > MEMORY_ROW_GAP * N))
    dmem = np.random.default_rng(seed).standard_normal(B)
    grad = selattn_c.memory_loss_backward(dmem, (q, k), tau, **options(case))
    assert grad.rows.shape == (B, 1, N) and grad.index.shape == (B, 1)
    dense = np.zeros((B, N, N))
    dense[np.arange(B), grad.index[:, 0]] = grad.rows[:, 0]
    dF_ref = ref.memory_loss_backward(dmem, F, tau)
    np.testing.assert_allclose(dense, dF_ref, rtol=FLOAT32_EPS, atol=0)
    _, row = selattn_c.memory_loss((q, k), tau, return_row=True, **options(case))
    assert np.array_equal(row, grad.index[:, 0])


@given(case=selective_case(), seed=seeds, n_rows=st.integers(1, 4))
def test_backward_with_df_rows_matches_the_reference_with_dense_dF(case, seed, n_rows):
    """backward(dout, ctx, dF_rows=rows) vs the reference backward with the same gradient
    spread into a dense dF (random rows, some named twice, which must add up)."""
    q, k, v = as_float32_values(case.q, case.k, case.v)
    assume(not near_relu_kink(q, k, case.selector_head, 1.0 / np.sqrt(q.shape[-1])))
    B, H, N, D = q.shape
    rng = np.random.default_rng(seed)
    dout = as_float32_values(rng.standard_normal(q.shape))[0]
    index = rng.integers(-1, N, size=(B, n_rows))
    rows = as_float32_values(rng.standard_normal((B, n_rows, N)))[0]
    dF = np.zeros((B, N, N))
    for b in range(B):
        for e in range(n_rows):
            if index[b, e] >= 0:
                dF[b, index[b, e]] += rows[b, e]

    _, cache = ref.forward(q, k, v, **options(case))
    dq_ref, dk_ref, dv_ref = ref.backward(dout, cache, dF=dF)
    _, ctx = selattn_c.forward(q, k, v, **options(case))
    dq, dk, dv = selattn_c.backward(dout, ctx, dF_rows=rows, dF_row_index=index)

    bounds = Bounds(cache, q, k, v, dout)
    # the path through F adds scale * sum_j |dF| |k| (|q| for dk) per entry: N rows of it at most
    through_F = cache.scale * N * float(np.abs(rows).max(initial=0.0))
    bounds.natural["dq"] += through_F * float(np.abs(k).max())
    bounds.natural["dk"] += through_F * float(np.abs(q).max())
    bounds.assert_close("dv", dv, dv_ref)
    bounds.assert_close("dq", dq, dq_ref)
    bounds.assert_close("dk", dk, dk_ref)


def test_df_rows_of_every_row_equal_the_dense_route():
    """Handing backward all N rows of a dense dF is the dense route (CAttention does this)."""
    q, k, v = (x.astype(np.float32) for x in random_qkv(3, (2, 3, 70, 8)))
    rng = np.random.default_rng(4)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    dF = rng.standard_normal((2, 70, 70)).astype(np.float32)
    _, ctx = selattn_c.forward(q, k, v)
    every = np.broadcast_to(np.arange(70, dtype=np.int64), (2, 70))
    by_rows = selattn_c.backward(dout, ctx, dF_rows=dF, dF_row_index=every)
    # the same rows in reverse order, and split over two slots each: sums, so equal within rounding
    twice = np.concatenate([dF[:, ::-1] * 0.5, dF[:, ::-1] * 0.5], axis=1)
    index = np.concatenate([every[:, ::-1]] * 2, axis=1)
    split = selattn_c.backward(dout, ctx, dF_rows=twice, dF_row_index=index)
    for a, b_ in zip(by_rows, split):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))


def test_memory_loss_gradient_end_to_end_against_the_reference():
    """The whole route (mem -> DFRows -> backward) against the reference's dense route
    (memory_loss_backward on F -> backward(dF=)), at N = 200 (several tiles of 64)."""
    q, k, v = as_float32_values(*random_qkv(11, (2, 2, 200, 8)))
    assume_ok = not near_relu_kink(q, k, 0, 1.0 / np.sqrt(8))
    assert assume_ok, "pick another seed: a selector logit sits on the relu kink"
    dout = np.zeros(q.shape)                      # only the memory loss' gradient
    _, cache = ref.forward(q, k, v)
    dq_ref, dk_ref, _ = ref.backward(dout, cache, dF=ref.memory_loss_backward(np.ones(2),
                                                                             cache.F, 1.0))
    _, ctx = selattn_c.forward(q, k, v)
    mem, row = selattn_c.memory_loss(ctx, 1.0, return_row=True)
    np.testing.assert_allclose(mem, ref.memory_loss(cache.F, 1.0), rtol=1e-5)
    grad = selattn_c.memory_loss_backward(np.ones(2), ctx, 1.0, row=row)
    dq, dk, dv = selattn_c.backward(dout, ctx, dF_rows=grad.rows, dF_row_index=grad.index)
    assert np.abs(dq_ref).max() > 0.1           # the gradient reaches the selector head
    for name, got, want in (("dq", dq, dq_ref), ("dk", dk, dk_ref)):
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-4, f"{name}: relative error {err:.2g}"
    assert not dv.any()                          # dout = 0 and F does not touch v


def test_ignored_rows_keep_nothing_and_get_no_gradient():
    q, k, _ = (x.astype(np.float32) for x in random_qkv(5, (2, 2, 40, 4)))
    ignore = np.zeros((2, 40), dtype=bool)
    ignore[:, 30:] = True                         # PAD rows of the tiny LM
    kept = selattn_c.memory_rows((q, k), 1.0, ignore_rows=ignore)
    assert not kept[ignore].any()
    np.testing.assert_array_equal(kept[~ignore], selattn_c.memory_rows((q, k), 1.0)[~ignore])
    grad = selattn_c.memory_loss_backward(np.ones(2), (q, k), 1.0, ignore_rows=ignore)
    assert (grad.index[:, 0] < 30).all()          # the max row is never an ignored one
    every = np.ones((2, 40), dtype=bool)
    kept_none = selattn_c.memory_rows((q, k), 1.0, ignore_rows=every)
    assert not kept_none.any()
    g = selattn_c.memory_loss_backward(np.ones(2), (q, k), 1.0, ignore_rows=every)
    assert not g.rows.any()


def test_a_standard_context_keeps_every_key():
    """Not selective: F = 0, so row i keeps i + 1 keys and its rows of F are zeros."""
    q, k, v = (x.astype(np.float32) for x in random_qkv(6, (2, 2, 33, 4)))
    _, ctx = selattn_c.forward(q, k, v, selective=False)
    kept = selattn_c.memory_rows(ctx, 1.0)
    assert np.array_equal(kept, np.broadcast_to(np.arange(1, 34, dtype=np.float32), (2, 33)))
    index = np.full((2, 2), 5, dtype=np.int64)
    assert not selattn_c.mask_rows(ctx, index).any()


@pytest.fixture
def restore_threads():
    before = selattn_c.get_num_threads()
    yield
    selattn_c.set_num_threads(before)


@pytest.mark.parametrize("N", [65, 300])
def test_one_and_two_threads_give_the_same_bits(N, restore_threads):
    q, k, v = (x.astype(np.float32) for x in random_qkv(N, (3, 2, N, 8)))
    dout = np.random.default_rng(N).standard_normal(q.shape).astype(np.float32)
    results = []
    for threads in (1, 2):
        selattn_c.set_num_threads(threads)
        _, ctx = selattn_c.forward(q, k, v)
        mem, row = selattn_c.memory_loss(ctx, 0.5, return_row=True)
        grad = selattn_c.memory_loss_backward(np.ones(3), ctx, 0.5, row=row)
        index = np.array([[0, N - 1], [N // 2, -1], [1, 1]], dtype=np.int64)
        results.append((selattn_c.memory_rows(ctx, 0.5), selattn_c.mask_rows(ctx, index),
                        grad.rows, *selattn_c.backward(dout, ctx, dF_rows=grad.rows,
                                                       dF_row_index=grad.index)))
    for one, two in zip(*results):
        assert np.array_equal(one, two)
