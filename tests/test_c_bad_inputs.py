"""Bad input to every public entry point of the C extension: each row of the table in
docs/reliability.md is one case here (same id), and a test checks that the two lists agree.

A row is (id, entry point, call, expected exception, text the message must contain). Every call
on a KVCache must also leave the cache exactly as it was (positions, F, counts, length, capacity,
keys, values): the cache used here is unbudgeted and full, so a call that grew it before failing
would show.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import selattn_c
from selattn_reference import attention as ref

from helpers import exact_qkv, random_qkv

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
B, H, N, D = 1, 2, 5, 4
CACHE_TOKENS = 64            # exactly the initial capacity of an unbudgeted cache


def inputs() -> SimpleNamespace:
    """q, k, v (B, H, N, D) float32, a forward Context, and a full unbudgeted KVCache."""
    q, k, v = random_qkv(0, (B, H, N, D), dtype=np.float32)
    _, ctx = selattn_c.forward(q, k, v)
    cache = selattn_c.KVCache(B, H, D)
    cq, ck, cv = exact_qkv(1, (B, H, CACHE_TOKENS, D))
    cache.prefill(cq, ck, cv)
    one = np.ones((B, H, D), np.float32)
    closed = selattn_c.KVCache(B, H, D)
    closed.close()
    return SimpleNamespace(q=q, k=k, v=v, ctx=ctx, cache=cache, one=one, closed=closed)


def with_nan(x, index=(0, 0, 1, 1), value=np.nan, dtype=None):
    """A copy of x (as ``dtype``, default x's) with ``value`` at ``index``."""
    x = np.array(x, dtype=dtype or x.dtype)
    x[index] = value
    return x


def new(shape=(B, H, D)) -> np.ndarray:
    """A fresh float32 array (an output, or an input of the wrong shape)."""
    return np.zeros(shape, np.float32)


def read_only(x: np.ndarray) -> np.ndarray:
    x.flags.writeable = False
    return x


def f64(*arrays):
    return tuple(x.astype(np.float64) for x in arrays)


def zero_stride(shape):
    """A float32 view of ``shape`` that needs no memory (every element is the same zero)."""
    return np.broadcast_to(np.float32(0.0), shape)


def forward(a, **kw):
    return selattn_c.forward(a.q, a.k, a.v, **kw)


def mask(a, **kw):
    return selattn_c.accumulated_mask(a.q, a.k, **kw)


ROWS = [
    # -- forward (and accumulated_mask, which shares the checks of q, k and the options)
    ("forward-1d", "forward", lambda a: selattn_c.forward(a.q[0, 0, 0], a.k[0, 0, 0],
                                                          a.v[0, 0, 0]), ValueError, "4 dimensions"),
    ("forward-5d", "forward", lambda a: selattn_c.forward(a.q[None], a.k[None], a.v[None]),
     ValueError, "4 dimensions"),
    ("forward-N-mismatch", "forward", lambda a: selattn_c.forward(a.q, a.k[:, :, :3], a.v),
     ValueError, "shape mismatch"),
    ("forward-batch-mismatch", "forward",
     lambda a: selattn_c.forward(a.q, a.k, np.concatenate([a.v, a.v])), ValueError,
     "shape mismatch"),
    ("forward-heads-mismatch", "forward", lambda a: selattn_c.forward(a.q, a.k[:, :1], a.v),
     ValueError, "shape mismatch"),
    ("forward-dtype-mismatch", "forward",
     lambda a: selattn_c.forward(a.q, a.k.astype(np.float64), a.v), TypeError, "dtype mismatch"),
    ("forward-int", "forward", lambda a: selattn_c.forward(*(x.astype(np.int32) for x in
                                                             (a.q, a.k, a.v))),
     TypeError, "q must be a floating-point array"),
    ("forward-bool", "forward", lambda a: selattn_c.forward(a.q > 0, a.k, a.v), TypeError,
     "q must be a floating-point array"),
    ("forward-complex", "forward", lambda a: selattn_c.forward(a.q, a.k.astype(np.complex64),
                                                               a.v), TypeError,
     "k must be a floating-point array"),
    ("forward-object", "forward", lambda a: selattn_c.forward(a.q, a.k, a.v.astype(object)),
     TypeError, "v must be a floating-point array"),
    ("forward-none", "forward", lambda a: selattn_c.forward(None, a.k, a.v), TypeError,
     "q must be a floating-point array"),
    ("forward-zero-N", "forward", lambda a: selattn_c.forward(a.q[:, :, :0], a.k[:, :, :0],
                                                              a.v[:, :, :0]),
     ValueError, "must be >= 1"),
    ("forward-zero-B", "forward", lambda a: selattn_c.forward(a.q[:0], a.k[:0], a.v[:0]),
     ValueError, "must be >= 1"),
    ("forward-zero-D", "forward", lambda a: selattn_c.forward(a.q[..., :0], a.k[..., :0],
                                                              a.v[..., :0]),
     ValueError, "must be >= 1"),
    ("forward-selector-head-too-big", "forward", lambda a: forward(a, selector_head=H),
     ValueError, "out of range"),
    ("forward-selector-head-negative", "forward", lambda a: forward(a, selector_head=-1),
     ValueError, "out of range"),
    ("forward-selector-head-float", "forward", lambda a: forward(a, selector_head=0.0),
     TypeError, "selector_head must be an int"),
    ("forward-budget-below-minimum", "forward", lambda a: forward(a, budget=1), ValueError,
     "too small"),
    ("forward-budget-zero-no-bos", "forward", lambda a: forward(a, budget=0, protect_bos=False),
     ValueError, "too small"),
    ("forward-budget-float", "forward", lambda a: forward(a, budget=2.5), TypeError,
     "budget must be an int"),
    ("forward-scale-nan", "forward", lambda a: forward(a, scale=float("nan")), ValueError,
     "scale must be finite"),
    ("forward-scale-overflows-float32", "forward", lambda a: forward(a, scale=1e39), ValueError,
     "finite as a float32"),
    ("forward-scale-str", "forward", lambda a: forward(a, scale="0.5"), TypeError,
     "scale must be a real number"),
    ("forward-protect-bos-str", "forward", lambda a: forward(a, protect_bos="no"), TypeError,
     "protect_bos must be a bool"),
    ("forward-selective-int", "forward", lambda a: forward(a, selective=1), TypeError,
     "selective must be a bool"),
    ("forward-nan", "forward", lambda a: selattn_c.forward(with_nan(a.q), a.k, a.v), ValueError,
     "q contains NaN or infinity"),
    ("forward-inf", "forward", lambda a: selattn_c.forward(a.q, a.k, with_nan(a.v, value=np.inf)),
     ValueError, "v contains NaN or infinity"),
    ("forward-overflows-float32", "forward",
     lambda a: selattn_c.forward(*f64(a.q, with_nan(a.k, value=1e300, dtype=np.float64), a.v)),
     ValueError,
     "k contains NaN or infinity (after conversion to float32)"),
    ("forward-buffers-too-large", "forward",
     lambda a: selattn_c.forward(*(zero_stride((1, 1, 2 ** 40, 2 ** 20)),) * 3), ValueError,
     "too large"),
    ("forward-soft-budget-below-minimum", "forward", lambda a: forward(a, soft_budget=1),
     ValueError, "soft_budget 1 is too small"),
    ("forward-soft-budget-float", "forward", lambda a: forward(a, soft_budget=2.5), TypeError,
     "soft_budget must be an int"),
    ("forward-soft-budget-with-budget", "forward", lambda a: forward(a, soft_budget=3, budget=3),
     ValueError, "cannot be combined"),
    ("forward-soft-strength-negative", "forward",
     lambda a: forward(a, soft_budget=3, soft_strength=-1.0), ValueError,
     "soft_strength must be a finite number >= 0"),
    ("forward-soft-strength-nan", "forward",
     lambda a: forward(a, soft_budget=3, soft_strength=float("nan")), ValueError,
     "soft_strength must be a finite number >= 0"),
    ("forward-soft-strength-overflows-float32", "forward",
     lambda a: forward(a, soft_budget=3, soft_strength=1e39), ValueError,
     "finite as a float32"),
    ("mask-3d", "accumulated_mask", lambda a: selattn_c.accumulated_mask(a.q[0], a.k[0]),
     ValueError, "4 dimensions"),
    ("mask-complex", "accumulated_mask",
     lambda a: selattn_c.accumulated_mask(a.q.astype(complex), a.k), TypeError,
     "q must be a floating-point array"),
    ("mask-selector-head", "accumulated_mask", lambda a: mask(a, selector_head=7), ValueError,
     "out of range"),
    ("mask-nan", "accumulated_mask", lambda a: selattn_c.accumulated_mask(a.q, with_nan(a.k)),
     ValueError, "k contains NaN or infinity"),
    ("mask-output-too-large", "accumulated_mask",
     lambda a: selattn_c.accumulated_mask(*(zero_stride((16, 1, 2 ** 31, 1)),) * 2), ValueError,
     "too large"),
    # -- backward
    ("backward-ctx-not-context", "backward",
     lambda a: selattn_c.backward(a.q, {"q": a.q}), TypeError, "ctx must be the Context"),
    ("backward-ctx-from-reference", "backward",
     lambda a: selattn_c.backward(a.q, ref.forward(a.q, a.k, a.v)[1]), TypeError,
     "ctx must be the Context"),
    ("backward-ctx-budgeted", "backward",
     lambda a: selattn_c.backward(a.q, forward(a, budget=2)[1]), ValueError, "budget"),
    ("backward-ctx-altered-shape", "backward",
     lambda a: selattn_c.backward(a.q, dataclasses.replace(a.ctx, k=a.ctx.k[:, :, :2].copy())),
     ValueError, "ctx.k must be"),
    ("backward-ctx-altered-dtype", "backward",
     lambda a: selattn_c.backward(a.q, dataclasses.replace(a.ctx, lse=a.ctx.lse.astype(float))),
     ValueError, "ctx.lse must be"),
    ("backward-ctx-altered-fstart", "backward",
     lambda a: selattn_c.backward(a.q, dataclasses.replace(a.ctx, fstart=a.ctx.fstart[:, :, :2])),
     ValueError, "ctx.fstart must be"),
    ("backward-ctx-altered-selector", "backward",
     lambda a: selattn_c.backward(a.q, dataclasses.replace(a.ctx, selector_head=H)), ValueError,
     "out of range"),
    ("backward-ctx-altered-scale-none", "backward",
     lambda a: selattn_c.backward(a.q, dataclasses.replace(a.ctx, scale=None)), ValueError,
     "ctx.scale must be a real number"),
    ("backward-ctx-altered-protect-bos", "backward",
     lambda a: selattn_c.backward(a.q, dataclasses.replace(a.ctx, protect_bos="no")), ValueError,
     "ctx.protect_bos must be a bool"),
    ("backward-ctx-altered-soft-theta", "backward",
     lambda a: selattn_c.backward(a.q, dataclasses.replace(
         forward(a, soft_budget=3)[1], soft_theta=np.zeros((B, N - 1), np.float32))),
     ValueError, "ctx.soft_theta must be"),
    ("backward-ctx-frozen", "backward", lambda a: setattr(a.ctx, "q", a.k),
     dataclasses.FrozenInstanceError, "cannot assign"),
    ("backward-dout-other-shape", "backward",
     lambda a: selattn_c.backward(a.q[:, :, :3], a.ctx), ValueError, "dout must have shape"),
    ("backward-dout-int", "backward",
     lambda a: selattn_c.backward(a.q.astype(np.int64), a.ctx), TypeError,
     "dout must be a floating-point array"),
    ("backward-dout-nan", "backward", lambda a: selattn_c.backward(with_nan(a.q), a.ctx),
     ValueError, "dout contains NaN or infinity"),
    # -- backward with an extra gradient on F as rows (dF_rows, dF_row_index)
    ("backward-dF-rows-without-index", "backward",
     lambda a: selattn_c.backward(a.q, a.ctx, dF_rows=np.zeros((B, 1, N))), ValueError,
     "dF_rows needs dF_row_index"),
    ("backward-dF-index-without-rows", "backward",
     lambda a: selattn_c.backward(a.q, a.ctx, dF_row_index=np.zeros((B, 1), int)), ValueError,
     "dF_row_index needs dF_rows"),
    ("backward-dF-rows-wrong-shape", "backward",
     lambda a: selattn_c.backward(a.q, a.ctx, dF_rows=np.zeros((B, 2, N)),
                                  dF_row_index=np.zeros((B, 1), int)), ValueError,
     "dF_rows must have shape (B, R, N)"),
    ("backward-dF-rows-int", "backward",
     lambda a: selattn_c.backward(a.q, a.ctx, dF_rows=np.zeros((B, 1, N), int),
                                  dF_row_index=np.zeros((B, 1), int)), TypeError,
     "dF_rows must be a floating-point array"),
    ("backward-dF-index-float", "backward",
     lambda a: selattn_c.backward(a.q, a.ctx, dF_rows=np.zeros((B, 1, N)),
                                  dF_row_index=np.zeros((B, 1))), TypeError,
     "dF_row_index must be an integer array"),
    ("backward-dF-index-1d", "backward",
     lambda a: selattn_c.backward(a.q, a.ctx, dF_rows=np.zeros((B, 1, N)),
                                  dF_row_index=np.zeros(B, int)), ValueError,
     "dF_row_index must have shape (B, R)"),
    ("backward-dF-index-out-of-range", "backward",
     lambda a: selattn_c.backward(a.q, a.ctx, dF_rows=np.zeros((B, 1, N)),
                                  dF_row_index=np.full((B, 1), N)), ValueError,
     f"dF_row_index holds {N}: each entry must be a row in [0, {N}) or -1"),
    ("backward-dF-index-below-minus-one", "backward",
     lambda a: selattn_c.backward(a.q, a.ctx, dF_rows=np.zeros((B, 1, N)),
                                  dF_row_index=np.full((B, 1), -2)), ValueError,
     "dF_row_index holds -2"),
    ("backward-dF-rows-nan", "backward",
     lambda a: selattn_c.backward(a.q, a.ctx, dF_rows=with_nan(np.zeros((B, 1, N)), (0, 0, 1)),
                                  dF_row_index=np.zeros((B, 1), int)), ValueError,
     "dF_rows contains NaN or infinity"),
    # -- the memory loss without F: memory_loss, memory_loss_backward, memory_rows, mask_rows
    ("memory-loss-tau-zero", "memory_loss", lambda a: selattn_c.memory_loss(a.ctx, 0.0),
     ValueError, "tau must be a finite number > 0"),
    ("memory-loss-tau-underflows-float32", "memory_loss",
     lambda a: selattn_c.memory_loss(a.ctx, 1e-300), ValueError, "finite positive float32"),
    ("memory-loss-not-a-context", "memory_loss",
     lambda a: selattn_c.memory_loss({"q": a.q}), TypeError,
     "must be the Context of selattn_c.forward or a pair (q, k)"),
    ("memory-loss-options-with-context", "memory_loss",
     lambda a: selattn_c.memory_loss(a.ctx, selector_head=1), ValueError,
     "come from the Context"),
    ("memory-loss-qk-nan", "memory_loss",
     lambda a: selattn_c.memory_loss((with_nan(a.q), a.k)), ValueError,
     "q contains NaN or infinity"),
    ("memory-loss-ignore-rows-shape", "memory_loss",
     lambda a: selattn_c.memory_loss(a.ctx, ignore_rows=np.zeros((B, N + 1), bool)),
     ValueError, "ignore_rows must have shape (B, N)"),
    ("memory-loss-ignore-rows-int", "memory_loss",
     lambda a: selattn_c.memory_loss(a.ctx, ignore_rows=np.zeros((B, N), int)), TypeError,
     "ignore_rows must be a bool array"),
    ("memory-loss-backward-dmem-shape", "memory_loss_backward",
     lambda a: selattn_c.memory_loss_backward(np.ones(B + 1), a.ctx), ValueError,
     "dmem must have shape"),
    ("memory-loss-backward-row-out-of-range", "memory_loss_backward",
     lambda a: selattn_c.memory_loss_backward(np.ones(B), a.ctx, row=np.full(B, N)), ValueError,
     f"row holds {N}"),
    ("memory-loss-backward-row-unused", "memory_loss_backward",
     lambda a: selattn_c.memory_loss_backward(np.ones(B), a.ctx, row=np.full(B, -1)),
     ValueError, "row must hold rows in"),
    ("memory-rows-3d", "memory_rows", lambda a: selattn_c.memory_rows((a.q[0], a.k[0])),
     ValueError, "4 dimensions"),
    ("mask-rows-index-out-of-range", "mask_rows",
     lambda a: selattn_c.mask_rows(a.ctx, np.full((B, 1), N)), ValueError, f"row_index holds {N}"),
    ("mask-rows-index-bool", "mask_rows",
     lambda a: selattn_c.mask_rows(a.ctx, np.zeros((B, 1), bool)), TypeError,
     "row_index must be an integer array"),
    # -- set_num_threads
    ("threads-zero", "set_num_threads", lambda a: selattn_c.set_num_threads(0), ValueError,
     ">= 1"),
    ("threads-negative", "set_num_threads", lambda a: selattn_c.set_num_threads(-2), ValueError,
     ">= 1"),
    ("threads-too-many", "set_num_threads", lambda a: selattn_c.set_num_threads(10 ** 6),
     ValueError, "<= 1024"),
    ("threads-float", "set_num_threads", lambda a: selattn_c.set_num_threads(2.0), TypeError,
     "must be an int"),
    ("threads-bool", "set_num_threads", lambda a: selattn_c.set_num_threads(True), TypeError,
     "must be an int"),
    # -- KVCache(...)
    ("cache-batch-zero", "KVCache", lambda a: selattn_c.KVCache(0, H, D), ValueError,
     "batch must be >= 1"),
    ("cache-heads-str", "KVCache", lambda a: selattn_c.KVCache(1, "2", D), TypeError,
     "heads must be an int"),
    ("cache-head-dim-float", "KVCache", lambda a: selattn_c.KVCache(1, H, 4.0), TypeError,
     "head_dim must be an int"),
    ("cache-budget-below-minimum", "KVCache", lambda a: selattn_c.KVCache(1, H, D, budget=1),
     ValueError, "too small"),
    ("cache-budget-huge", "KVCache", lambda a: selattn_c.KVCache(1, H, D, budget=10 ** 30),
     ValueError, "lower the budget"),
    ("cache-selector-head", "KVCache", lambda a: selattn_c.KVCache(1, H, D, selector_head=H),
     ValueError, "out of range"),
    ("cache-threshold-negative", "KVCache",
     lambda a: selattn_c.KVCache(1, H, D, evict_threshold=-0.5), ValueError, ">= 0"),
    ("cache-threshold-nan", "KVCache",
     lambda a: selattn_c.KVCache(1, H, D, evict_threshold=float("nan")), ValueError, ">= 0"),
    ("cache-protect-bos-str", "KVCache", lambda a: selattn_c.KVCache(1, H, D, protect_bos="no"),
     TypeError, "protect_bos must be a bool"),
    ("cache-copy", "KVCache", lambda a: copy.copy(a.cache), TypeError, "cannot be copied"),
    ("cache-scale-overflows-float32", "KVCache", lambda a: selattn_c.KVCache(1, H, D, scale=1e39),
     ValueError, "finite as a float32"),
    # -- KVCache.step / prefill / held on the full cache, and a closed cache
    ("step-wrong-D", "KVCache.step", lambda a: a.cache.step(np.ones((B, H, D + 1)), a.one, a.one),
     ValueError, "q must have shape"),
    ("step-wrong-batch", "KVCache.step", lambda a: a.cache.step(a.one, np.ones((2, H, D)), a.one),
     ValueError, "k must have shape"),
    ("step-4d", "KVCache.step", lambda a: a.cache.step(a.one, a.one, a.v), ValueError,
     "v must have shape"),
    ("step-int", "KVCache.step", lambda a: a.cache.step(a.one.astype(int), a.one, a.one),
     TypeError, "q must be a floating-point array"),
    ("step-complex", "KVCache.step", lambda a: a.cache.step(a.one, a.one * 1j, a.one), TypeError,
     "k must be a floating-point array"),
    ("step-nan", "KVCache.step",
     lambda a: a.cache.step(a.one, a.one, with_nan(a.one, (0, 1, 2))), ValueError,
     "v contains NaN or infinity"),
    ("step-overflows-float32", "KVCache.step",
     lambda a: a.cache.step(with_nan(a.one, (0, 0, 0), 1e300, np.float64), a.one, a.one),
     ValueError,
     "q contains NaN or infinity"),
    ("prefill-3d", "KVCache.prefill", lambda a: a.cache.prefill(a.one, a.one, a.one), ValueError,
     "4 dimensions"),
    ("prefill-N-mismatch", "KVCache.prefill",
     lambda a: a.cache.prefill(a.q, a.k[:, :, :2], a.v), ValueError, "k must have shape"),
    ("prefill-nan-last-token", "KVCache.prefill",
     lambda a: a.cache.prefill(a.q, a.k, with_nan(a.v, (0, 1, N - 1, 3))), ValueError,
     "v contains NaN or infinity"),
    ("prefill-too-large", "KVCache.prefill",
     lambda a: a.cache.prefill(*(zero_stride((B, H, 2 ** 56, D)),) * 3), ValueError,
     "too large"),
    ("held-out-of-range", "KVCache.held", lambda a: a.cache.held(B), ValueError, "b must be in"),
    ("held-float", "KVCache.held", lambda a: a.cache.held(0.0), TypeError, "b must be an int"),
    ("bind-step-float64", "KVCache.bind_step",
     lambda a: a.cache.bind_step(np.ones((B, H, D)), a.one, a.one, new()), ValueError,
     "q must be a native float32"),
    ("bind-step-wrong-shape", "KVCache.bind_step",
     lambda a: a.cache.bind_step(a.one, new((B, H, D + 1)), a.one, new()), ValueError,
     "k must be a native float32"),
    ("bind-step-strided", "KVCache.bind_step",
     lambda a: a.cache.bind_step(a.one, a.one, new((B, D, H)).transpose(0, 2, 1), new()),
     ValueError, "v must be a native float32"),
    ("bind-step-list", "KVCache.bind_step",
     lambda a: a.cache.bind_step(a.one, a.one, a.one, new().tolist()), TypeError,
     "out must be a numpy.ndarray"),
    ("bind-step-read-only-out", "KVCache.bind_step",
     lambda a: a.cache.bind_step(a.one, a.one, a.one, read_only(new())), ValueError,
     "out must be writable"),
    ("bind-step-out-is-q", "KVCache.bind_step",
     lambda a: a.cache.bind_step(a.one, new(), new(), a.one), ValueError,
     "out must not share memory with q"),
    ("bound-step-nan", "KVCache.bind_step",
     lambda a: a.cache.bind_step(a.one, a.one, with_nan(a.one, (0, 1, 2)), new())(), ValueError,
     "v contains NaN or infinity"),
    ("closed-step", "KVCache (closed)", lambda a: a.closed.step(a.one, a.one, a.one), ValueError,
     "closed"),
    ("closed-prefill", "KVCache (closed)", lambda a: a.closed.prefill(a.q, a.k, a.v), ValueError,
     "closed"),
    ("closed-state", "KVCache (closed)", lambda a: a.closed.positions, ValueError, "closed"),
    ("closed-reset", "KVCache (closed)", lambda a: a.closed.reset(), ValueError, "closed"),
    ("closed-bind-step", "KVCache (closed)", lambda a: a.closed.bind_step(a.one, a.one, a.one,
                                                                          new()),
     ValueError, "closed"),
]


def cache_state(cache) -> tuple:
    return (cache.length, cache.capacity, cache.size, cache.evictions, cache.positions, cache.F,
            cache.keys(), cache.values(), cache.nbytes)


def assert_same_state(before: tuple, after: tuple) -> None:
    assert len(before) == len(after)
    for x, y in zip(before, after):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input(row):
    """Each bad input raises the documented exception, its message names the argument, and the
    KVCache it was given (if any) is exactly as before."""
    _, _, call, error, match = row
    a = inputs()
    threads = selattn_c.get_num_threads()
    before = cache_state(a.cache)
    with pytest.raises(error, match=re.escape(match)):
        call(a)
    assert_same_state(before, cache_state(a.cache))
    assert selattn_c.get_num_threads() == threads


def test_every_row_is_in_the_documented_table():
    """docs/reliability.md's table lists exactly these rows, by id."""
    if not DOC.exists():
        pytest.skip("docs/reliability.md is not next to the tests (installed elsewhere)")
    documented = re.findall(r"^\| `([A-Za-z0-9-]+)` \|", DOC.read_text(encoding="utf-8"), flags=re.M)
    assert sorted(documented) == sorted(row[0] for row in ROWS)
    assert len(set(documented)) == len(documented)


# ----------------------------------------------------------------------------------------------
# What is accepted: edge values that are legal, and check_finite=False


def test_accepted_edge_inputs():
    a = inputs()
    out, _ = selattn_c.forward(a.q, a.k, a.v, budget=10 ** 30)       # budget >= N: no pruning
    np.testing.assert_array_equal(out, selattn_c.forward(a.q, a.k, a.v)[0])
    selattn_c.set_num_threads(selattn_c.get_num_threads())
    assert a.cache.prefill(a.q[:, :, :0], a.k[:, :, :0], a.v[:, :, :0]).shape == (B, H, 0, D)
    with selattn_c.KVCache(B, H, D, budget=3) as cache:
        cache.step(a.one, a.one, a.one)
    assert cache.closed and cache.nbytes == 0
    cache.close()                                                    # twice is fine


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e300])
def test_check_finite_false_skips_the_scan_and_never_crashes(bad):
    """With check_finite=False a non-finite input is not refused: the outputs may be NaN or inf,
    but every call returns arrays of the right shape (and the sanitizer build sees no bad access)."""
    a = inputs()
    q, k, v = f64(a.q, a.k, a.v)
    q[0, 0, 1, 1] = bad
    out, ctx = selattn_c.forward(q, k, v, check_finite=False)
    assert out.shape == a.q.shape and out.dtype == np.float32
    dq, dk, dv = selattn_c.backward(q, ctx, check_finite=False)
    assert dq.shape == dk.shape == dv.shape == a.q.shape
    F = selattn_c.accumulated_mask(q, k, check_finite=False)
    assert F.shape == (B, N, N)
    mem, row = selattn_c.memory_loss((q, k), return_row=True, check_finite=False)
    assert mem.shape == row.shape == (B,)
    grad = selattn_c.memory_loss_backward(np.ones(B), (q, k), check_finite=False)
    assert grad.rows.shape == (B, 1, N)
    dq, _, _ = selattn_c.backward(q, ctx, dF_rows=with_nan(grad.rows, (0, 0, 0), bad, np.float64),
                                  dF_row_index=grad.index, check_finite=False)
    assert dq.shape == a.q.shape
    out, _ = selattn_c.forward(q, k, v, budget=2, check_finite=False)
    assert out.shape == a.q.shape
    a.cache.prefill(q, k, v, check_finite=False)
    assert a.cache.step(with_nan(a.one, (0, 0, 0), bad, np.float64), a.one, a.one,
                        check_finite=False).shape == (B, H, D)
    assert a.cache.length == CACHE_TOKENS + N + 1


def test_checking_finiteness_is_what_raises():
    """The same NaN input that check_finite=False lets through raises by default."""
    a = inputs()
    with pytest.raises(ValueError, match="NaN"):
        selattn_c.forward(with_nan(a.q), a.k, a.v)
    out, _ = selattn_c.forward(with_nan(a.q), a.k, a.v, check_finite=False)
    assert np.isnan(out).any()


# ----------------------------------------------------------------------------------------------
# Nothing is lost: a failed step or prefill leaves the cache exactly as it was


@given(data=st.data(), budget=st.one_of(st.none(), st.none(), st.integers(2, 70)),
       held=st.one_of(st.sampled_from([0, 63, 64, 127, 128]), st.integers(0, 140)),
       new=st.integers(1, 70),
       bad=st.sampled_from([np.nan, np.inf, -np.inf, 1e300]),
       method=st.sampled_from(["step", "prefill"]))
def test_a_failed_call_leaves_the_cache_exactly_as_it_was(data, budget, held, new, bad, method):
    """Any cache (budgeted or growing, empty or holding tokens; 64 and 128 held tokens fill an
    unbudgeted cache, so the call needs it to grow), any position of one non-finite value in q, k
    or v: the call raises ValueError and every observable part of the cache, and its later
    behaviour, equals that of a cache that never saw the call."""
    Bc, Hc, Dc = 2, 2, 3
    q, k, v = exact_qkv(held + new, (Bc, Hc, held + new, Dc))
    cache, twin = (selattn_c.KVCache(Bc, Hc, Dc, budget, selector_head=1) for _ in range(2))
    for c in (cache, twin):
        if held:
            c.prefill(q[:, :, :held], k[:, :, :held], v[:, :, :held])
    x = [q[:, :, held:], k[:, :, held:], v[:, :, held:]]                 # (B, H, new, D)
    if method == "step":
        x = [y[:, :, 0] for y in x]                                     # (B, H, D)
    which = data.draw(st.integers(0, 2), label="which of q, k, v")
    index = tuple(data.draw(st.integers(0, n - 1)) for n in x[which].shape)
    bad_x = list(x)
    bad_x[which] = x[which].copy()
    bad_x[which][index] = bad
    before = cache_state(cache)
    with pytest.raises(ValueError, match="NaN or infinity"):
        getattr(cache, method)(*bad_x)
    assert_same_state(before, cache_state(cache))
    out, twin_out = getattr(cache, method)(*x), getattr(twin, method)(*x)
    np.testing.assert_array_equal(out, twin_out)
    assert_same_state(cache_state(twin), cache_state(cache))
