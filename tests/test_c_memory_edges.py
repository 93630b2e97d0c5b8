"""Every C entry point at the sizes where tiled code reads past its buffers if it is wrong.

The kernels cut N into tiles of 64. A partial last tile (N not a multiple of 64), a single token,
exactly one or two full tiles, and the last batch element (whose buffers end at the allocation's
end) are where an off-by-a-tile read or write happens. Such a read usually returns garbage that a
mask then hides, so the results here can be right while the memory access is wrong: these tests
are meant to run under the sanitizer build too (``.ci/sanitize``), which turns any such access
into a failure. An earlier forward read up to 63 floats past the end of its Fstart buffer in the
last key tile; these sizes catch it there.
"""

from __future__ import annotations

import numpy as np
import pytest

import selattn_c
from selattn_reference import attention as ref

from helpers import exact_qkv, EXACT_SCALE, random_qkv
from test_c_against_reference import as_float32_values, check_against_reference, near_relu_kink
from test_c_kv_cache import out_atol

EDGE_N = [1, 2, 63, 64, 65, 127, 128, 129, 191]


@pytest.mark.parametrize("N", EDGE_N)
@pytest.mark.parametrize("B", [1, 3])
def test_forward_backward_mask_at_tile_edges(B, N):
    q, k, v = as_float32_values(*random_qkv(N + B, (B, 2, N, 3)))
    dout = np.random.default_rng(N).standard_normal(q.shape)
    for selective in (True, False):
        grads = not (selective and near_relu_kink(q, k, 1, 1.0 / np.sqrt(3)))
        check_against_reference(q, k, v, dout, selector_head=1, protect_bos=True,
                                selective=selective, check_grads=grads)


@pytest.mark.parametrize("N", EDGE_N)
@pytest.mark.parametrize("budget", [2, 63, 64, 65])
def test_budgeted_forward_and_cache_at_tile_edges(N, budget):
    """The budgeted forward, a prefill and steps, with budgets around one tile of slots (the
    cache's capacity is rounded up to tiles); exactly representable inputs make the C eviction
    decisions equal the reference's, so the outputs agree to float32 rounding."""
    B, H, D = 2, 2, 3
    q, k, v = exact_qkv(N * budget, (B, H, N, D))
    options = dict(selector_head=1, protect_bos=True, scale=EXACT_SCALE)
    out_ref, _ = ref.forward(q, k, v, budget=budget, **options)
    atol = out_atol(q, k, v, **options)
    out, _ = selattn_c.forward(q, k, v, budget=budget, **options)
    assert np.abs(out - out_ref).max() <= atol

    cache = selattn_c.KVCache(B, H, D, budget, **options)
    half = N // 2
    first = cache.prefill(q[:, :, :half], k[:, :, :half], v[:, :, :half])
    rest = [cache.step(q[:, :, i], k[:, :, i], v[:, :, i]) for i in range(half, N)]
    decoded = np.concatenate([first] + [r[:, :, None] for r in rest], axis=2)   # (B, H, N, D)
    assert np.abs(decoded - out_ref).max() <= atol
    assert (cache.size == min(N, budget)).all()
