"""Dead keys in the backward, key by key (docs/kernel-design.md, "Dead keys"): in a partly dead key
tile (some of its 64 keys dead for a query block, some alive) the backward packs the live keys and
works on them alone, as the forward does; the selector head's path through F (the reverse cumsum
of dF, the memory loss' rows, the rank penalty's cuts) still runs up every column, dead or not.

Checked here: ``selattn_c.dead_keys`` is the documented bound key for key (and the tiles'
decision is the largest of their keys'); every weight a skipped key would have had is below e^-t
of its row's total; on trained-like inputs, at N not a multiple of 64, with most tiles below the
diagonal partly dead, the gradients agree with the float64 reference and with the exact C kernel
within float32 rounding plus the bound, with the memory loss' dF rows (through dead keys too) and
the rank penalty; and 1 and 2 threads give the same bits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import selattn_c
from selattn_bench.trained_like import trained_like
from selattn_reference import attention as ref

from test_c_against_reference import Bounds, as_float32_values
from test_c_dead_keys import (BOUND_EPS, F_SHRINK, FEW, T, kernel_weights, rounding_tolerance,
                              trained_like_cases)


def key_dead_from_by_the_formula(q, k, F32, t, scale, protect_bos):
    """The bound of docs/kernel-design.md in NumPy (float64), per key: the first query block whose
    first row's F (the kernels' bits) kills the key, (B, N); ceil(N / 64) where none does."""
    B, H, N, D = q.shape
    nqb = -(-N // T)
    qn, kn = np.linalg.norm(q, axis=-1), np.linalg.norm(k, axis=-1)            # (B, H, N)
    anchor, kref = scale * np.einsum("bhnd,bhnd->bhn", q, k), kn
    if protect_bos:
        anchor = np.maximum(anchor, scale * np.einsum("bhnd,bhd->bhn", q, k[:, :, 0]))
        kref = np.maximum(kn, kn[:, :, :1])
    ci = -anchor + BOUND_EPS * abs(scale) * qn * kref
    a = (1 + BOUND_EPS) * abs(scale) * np.maximum.accumulate(qn[..., ::-1], -1)[..., ::-1][..., ::T]
    c = np.maximum.accumulate(ci[..., ::-1], -1)[..., ::-1][..., ::T]          # (B, H, nqb)
    key_dead_from = np.full((B, N), nqb, dtype=np.int64)
    for qb in range(nqb - 1, 0, -1):                 # the lowest block that kills wins
        i0 = qb * T
        need = (a[:, :, qb, None] * kn[:, :, :i0] + c[:, :, qb, None]).max(1)   # (B, i0)
        f = F32[:, i0, :i0].astype(np.float64) * F_SHRINK
        dead = (f >= t) & (f >= t + need)
        key_dead_from[:, :i0][dead] = qb
    return key_dead_from


def tile_counts(key_dead_from: np.ndarray):
    """(partly dead, wholly dead, all) (query block, key tile below the diagonal) pairs, and the
    share of the keys before each block's first row that are skipped."""
    B, N = key_dead_from.shape
    nqb = -(-N // T)
    partly = whole = pairs = dead_keys = keys = 0
    for qb in range(1, nqb):
        dead = key_dead_from[:, :qb * T] <= qb                                  # (B, qb T)
        per_tile = dead.reshape(B, qb, T).sum(-1)
        partly += int(np.sum((per_tile > 0) & (per_tile < T)))
        whole += int(np.sum(per_tile == T))
        pairs += B * qb
        dead_keys += int(dead.sum())
        keys += dead.size
    return partly, whole, pairs, dead_keys / max(keys, 1)


@FEW
@given(trained_like_cases(max_N=400), st.sampled_from([1.0, 8.0, 32.0]))
def test_the_kernels_kill_exactly_the_keys_the_formula_kills(case, t):
    """selattn_c.dead_keys is the documented bound, key for key, and a tile is dead from the
    block its last key dies in (selattn_c.dead_tiles)."""
    q, k, v, options, _ = case
    B, H, N, D = q.shape
    scale = 1.0 / math.sqrt(D)
    F32 = selattn_c.accumulated_mask(q, k, **options)
    key_dead_from = selattn_c.dead_keys(q, k, dead_key_threshold=t, **options)
    np.testing.assert_array_equal(
        key_dead_from, key_dead_from_by_the_formula(q, k, F32, t, scale, options["protect_bos"]))
    nqb = -(-N // T)
    padded = np.zeros((B, nqb * T), dtype=np.int64)
    padded[:, :N] = key_dead_from
    np.testing.assert_array_equal(padded.reshape(B, nqb, T).max(-1),
                                  selattn_c.dead_tiles(q, k, dead_key_threshold=t, **options))
    # a key is never dead in its own block (the diagonal tile is never packed)
    assert np.all(key_dead_from >= np.arange(N) // T + 1)


@FEW
@given(trained_like_cases(), st.sampled_from([1.0, 4.0, 16.0, 32.0]))
def test_every_skipped_key_is_within_the_bound(case, t):
    """Where a key is dead for a query's block (the backward skips its P, G, dv, dk and its share
    of dq there), its weight is below e^-t of the row's total in every head (float64 softmax of
    the exact logits minus the kernels' F)."""
    q, k, v, options, _ = case
    N = q.shape[2]
    key_dead_from = selattn_c.dead_keys(q, k, dead_key_threshold=t, **options)
    F32 = selattn_c.accumulated_mask(q, k, **options)
    P = kernel_weights(q, k, F32, 1.0 / math.sqrt(q.shape[-1]), **options)
    dead = (np.arange(N) // T)[None, :, None] >= key_dead_from[:, None, :]        # (B, i, j)
    assert np.all(P[np.broadcast_to(dead[:, None], P.shape)] <= math.exp(-t))


def partly_dead_input(seed: int = 0, B: int = 1, H: int = 3, N: int = 333, D: int = 8):
    rng = np.random.default_rng(seed)
    q, k, v = trained_like(rng, B, H, N, D, mean_lifetime=16.0, selector_head=1)
    return rng, q, k, v


def test_the_inputs_have_partly_dead_tiles():
    """The trained-like inputs the tests below use do exercise the packs: at N = 333 (the last
    query block has 13 rows) most tiles below the diagonal are partly dead, the last block has
    some, and most keys before a block's first row are skipped (so a packing bug cannot hide)."""
    _, q, k, _ = partly_dead_input()
    key_dead_from = selattn_c.dead_keys(q, k, selector_head=1)
    partly, whole, pairs, share = tile_counts(key_dead_from)
    assert partly >= pairs // 3 and share >= 0.5, (partly, whole, pairs, share)
    last = key_dead_from[:, :(333 // T) * T] <= 333 // T                       # the last block
    per_tile = last.reshape(1, -1, T).sum(-1)
    assert np.any((per_tile > 0) & (per_tile < T)), per_tile


def dense_dF(rows: np.ndarray, index: np.ndarray, N: int) -> np.ndarray:
    """(B, N, N) float64 dF from rows (B, R, N) of F named by index (B, R), -1: unused."""
    B = rows.shape[0]
    dF = np.zeros((B, N, N))
    for b in range(B):
        for e, i in enumerate(index[b]):
            if i >= 0:
                dF[b, i] += rows[b, e]
    return dF


@FEW
@given(trained_like_cases(min_N=130, max_N=400), st.integers(0, 2**32 - 1),
       st.sampled_from(["none", "memory", "random"]), st.booleans())
def test_packed_gradients_match_the_reference(case, seed, dF_kind, soft):
    """dq, dk, dv at the default threshold against the float64 reference, with an extra gradient
    on rows of F: the memory loss' (tau = 1e3: F < tau on many dead keys too, so their columns
    carry it up through the packed tiles) or random rows low in the sequence; with and without
    the rank penalty (its F_soft and cuts in the packed tiles; where float32 puts a cut on another
    key than float64 does, against the exact C kernel, as test_c_dead_keys does)."""
    q, k, v, options, _ = case
    B, H, N, D = q.shape
    rng = np.random.default_rng(seed)
    dout = as_float32_values(rng.standard_normal(q.shape))[0]
    if soft:
        options = dict(options, soft_budget=int(rng.integers(2, 40)), soft_strength=10.0)
    out_ref, cache = ref.forward(q, k, v, **options)
    out, ctx = selattn_c.forward(q, k, v, **options)
    bounds = Bounds(cache, q, k, v, dout)
    bounds.assert_close("out", out, out_ref)
    kw, dF = {}, None
    if dF_kind == "memory":
        d = selattn_c.memory_loss_backward(np.ones(B), ctx, 1e3)
        kw = dict(dF_rows=d.rows, dF_row_index=d.index)
    elif dF_kind == "random":
        index = rng.integers(N // 2, N, (B, 3)).astype(np.int64)
        kw = dict(dF_rows=rng.standard_normal((B, 3, N)).astype(np.float32), dF_row_index=index)
    if kw:
        dF = dense_dF(kw["dF_rows"].astype(np.float64), kw["dF_row_index"], N)
    grads = selattn_c.backward(dout, ctx, **kw)
    if soft and not np.array_equal(ctx.soft_cut, cache.soft_cut):
        # F in float32 and in float64 can order a row's keys differently (F's entries in the
        # hundreds, a few apart), so a cut can fall on another key than the reference's and the
        # rank penalty's gradient with it, in the exact kernel too: then the exact C kernel,
        # whose cuts the skipping one shares, is the reference
        _, ctx0 = selattn_c.forward(q, k, v, dead_key_threshold=None, **options)
        np.testing.assert_array_equal(ctx.soft_cut, ctx0.soft_cut)
        dropped = N * math.exp(-selattn_c.DEFAULT_DEAD_KEY_THRESHOLD)
        for name, got, want in zip(("dq", "dk", "dv"), grads, selattn_c.backward(dout, ctx0, **kw)):
            magnitude = float(np.abs(want).max())
            err = float(np.abs(want.astype(np.float64) - got).max())
            assert err <= rounding_tolerance(magnitude, N, D, dropped), (name, err, magnitude)
        return
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref.backward(dout, cache, dF=dF)):
        bounds.assert_close(name, got, want)


def key_rows_close(name, exact, skip, tol_scale):
    """Per key (or query) row: |skip - exact| <= tol_scale * (the row's own largest entry + the
    array's largest entry * 2^-10), so an error on a small row (a key that is nearly dead, whose
    gradient is small) is not hidden by the large rows."""
    exact64 = exact.astype(np.float64)
    row_mag = np.abs(exact64).max(-1, keepdims=True) + np.abs(exact64).max() * 2.0**-10
    err = np.abs(skip - exact64)
    worst = float((err / row_mag).max())
    assert worst <= tol_scale, (name, worst, tol_scale)


@pytest.mark.parametrize("dF_kind", ["none", "memory", "random"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("N", [333, 448])
def test_packed_gradients_match_the_exact_kernel_row_by_row(N, soft, dF_kind):
    """Against the exact C kernel (dead_key_threshold=None), key row by key row: on these inputs
    every skipped weight underflows (F is in the hundreds), so the packed tiles must give the
    exact kernel's values up to float32 rounding in each row, small rows included; a packing
    that mixes up keys, loses the selector head's dS on a packed or dead column, or drops the dF
    rows' path through a dead column is off by far more. N = 448 is a multiple of 64, 333 not."""
    rng, q, k, v = partly_dead_input(seed=N, B=2, N=N)
    options = dict(selector_head=1)
    if soft:
        options.update(soft_budget=24, soft_strength=10.0)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    _, ctx0 = selattn_c.forward(q, k, v, dead_key_threshold=None, **options)
    _, ctx1 = selattn_c.forward(q, k, v, **options)
    partly, _, pairs, _ = tile_counts(selattn_c.dead_keys(q, k, selector_head=1))
    assert partly >= pairs // 3
    kw = {}
    if dF_kind == "memory":
        d = selattn_c.memory_loss_backward(np.ones(2), ctx0, 1e3)
        kw = dict(dF_rows=d.rows, dF_row_index=d.index)
    elif dF_kind == "random":
        index = np.stack([rng.permutation(np.arange(N // 2, N))[:4] for _ in range(2)])
        kw = dict(dF_rows=rng.standard_normal((2, 4, N)).astype(np.float32),
                  dF_row_index=index.astype(np.int64))
    g0 = selattn_c.backward(dout, ctx0, **kw)
    g1 = selattn_c.backward(dout, ctx1, **kw)
    # float32 rounding of the sums that differ in order (dq over the live keys only; the dense
    # tile's over all 64): N + D terms of eps32, times the tolerance factor of the exact kernel
    tol = rounding_tolerance(1.0, N, q.shape[3], N * math.exp(-selattn_c.DEFAULT_DEAD_KEY_THRESHOLD))
    for name, a, b in zip(("dq", "dk", "dv"), g0, g1):
        key_rows_close(name, a, b, tol)


@pytest.mark.parametrize("soft", [False, True])
def test_packed_backward_is_bitwise_the_same_for_any_thread_count(soft):
    """1 and 2 threads give the same bits with the packs, dF rows through dead columns and the
    rank penalty, at N = 1000 (not a multiple of 64)."""
    rng, q, k, v = partly_dead_input(seed=7, B=2, H=3, N=1000, D=16)
    options = dict(selector_head=1)
    if soft:
        options.update(soft_budget=40, soft_strength=10.0)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    index = rng.integers(500, 1000, (2, 3)).astype(np.int64)
    rows = rng.standard_normal((2, 3, 1000)).astype(np.float32)
    results = []
    before = selattn_c.get_num_threads()
    try:
        for threads in (1, 2):
            selattn_c.set_num_threads(threads)
            out, ctx = selattn_c.forward(q, k, v, **options)
            results.append((out,) + selattn_c.backward(dout, ctx)
                           + selattn_c.backward(dout, ctx, dF_rows=rows, dF_row_index=index))
    finally:
        selattn_c.set_num_threads(before)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
