"""Call every public entry point of selattn_c once or twice, on small inputs, for valgrind.

Run under memcheck as docs/reliability.md shows (tools/memcheck runs it): the C code must make no
invalid read or write, use no uninitialised value, and leak nothing. Sizes are small (valgrind
runs code ~50x slower) but cross the tile edges (N = 70: a full and a partial tile of 64), and the
error paths run too (a call that raises must free what it allocated).
"""

from __future__ import annotations

import numpy as np

import selattn_c
from selattn_bench.trained_like import trained_like


def expect_error(call, error) -> None:
    try:
        call()
    except error:
        return
    raise AssertionError(f"expected {error.__name__}")


def main() -> None:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 70, 8)).astype(np.float32) for _ in range(3))
    dout = rng.standard_normal(q.shape).astype(np.float32)
    for threads in (1, 2):
        selattn_c.set_num_threads(threads)
        for selective in (True, False):
            out, ctx = selattn_c.forward(q, k, v, selector_head=1, selective=selective)
            selattn_c.backward(dout, ctx)
        selattn_c.forward(q, k, v, budget=5)
        selattn_c.forward(*(x.astype(np.float64)[:, :, ::-1] for x in (q, k, v)),
                          protect_bos=False, budget=1)
        selattn_c.accumulated_mask(q, k, selector_head=2)
        selattn_c.build_info()

        # the memory loss without F: row sums, rows of F, and the backward that takes dF as rows
        out, ctx = selattn_c.forward(q, k, v)
        mem, row = selattn_c.memory_loss(ctx, 0.5, return_row=True)
        grad = selattn_c.memory_loss_backward(np.ones(2), ctx, 0.5, row=row)
        selattn_c.backward(dout, ctx, dF_rows=grad.rows, dF_row_index=grad.index)
        selattn_c.memory_rows((q, k), 1.0, selector_head=2, protect_bos=False)
        selattn_c.mask_rows(ctx, np.array([[0, 69, -1], [35, 35, 64]], dtype=np.int64))
        # the rank penalty of pruning-aware training (soft budgets), with and without dF rows
        out, ctx = selattn_c.forward(q, k, v, soft_budget=9, soft_strength=10.0)
        selattn_c.backward(dout, ctx)
        selattn_c.backward(dout, ctx, dF_rows=grad.rows, dF_row_index=grad.index)
        every = np.broadcast_to(np.arange(70, dtype=np.int64), (2, 70))
        selattn_c.backward(dout, ctx, dF_rows=rng.standard_normal((2, 70, 70)),
                           dF_row_index=every)

        with selattn_c.KVCache(2, 3, 8, budget=6, evict_threshold=1.0) as cache:
            cache.prefill(q[:, :, :40], k[:, :, :40], v[:, :, :40])
            for i in range(40, 70):
                cache.step(q[:, :, i], k[:, :, i], v[:, :, i])
            cache.held(1), cache.keys(), cache.values(), cache.positions, cache.F
            cache.reset()
            cache.prefill(q, k, v)
        growing = selattn_c.KVCache(2, 3, 8)                # unbudgeted: grows from 64 slots
        growing.prefill(q[:, :, :60], k[:, :, :60], v[:, :, :60])
        for i in range(60, 70):
            growing.step(q[:, :, i], k[:, :, i], v[:, :, i])
        growing.close()

        # dead keys: trained-like inputs whose key tiles die (N = 200: a partial last tile),
        # skipped by the forward, the backward (with dF rows below dead tiles), the rank
        # penalty and the prefill; and the exact mode
        qd, kd, vd = trained_like(rng, 2, 3, 200, 8, mean_lifetime=4.0, rate=2.0)
        doutd = rng.standard_normal(qd.shape).astype(np.float32)
        for protect_bos in (True, False):
            selattn_c.dead_tiles(qd, kd, protect_bos=protect_bos)
            selattn_c.dead_keys(qd, kd, protect_bos=protect_bos)
            _, ctxd = selattn_c.forward(qd, kd, vd, protect_bos=protect_bos)
            selattn_c.backward(doutd, ctxd)
            rows = np.broadcast_to(np.array([199, 150], dtype=np.int64), (2, 2))
            selattn_c.backward(doutd, ctxd, dF_rows=rng.standard_normal((2, 2, 200)),
                               dF_row_index=rows)
            selattn_c.memory_loss(ctxd, 0.5)
        _, ctxd = selattn_c.forward(qd, kd, vd, soft_budget=9, dead_key_threshold=4.0)
        selattn_c.backward(doutd, ctxd)
        selattn_c.forward(qd, kd, vd, dead_key_threshold=None)
        with selattn_c.KVCache(2, 3, 8) as cache:
            cache.prefill(qd, kd, vd)

        # error paths and unchecked non-finite input
        bad = q.copy()
        bad[0, 1, 3, 2] = np.nan
        expect_error(lambda: selattn_c.forward(bad, k, v), ValueError)
        selattn_c.forward(bad, k, v, check_finite=False)
        selattn_c.backward(bad, ctx, check_finite=False)
        expect_error(lambda: selattn_c.backward(dout[:, :1], ctx), ValueError)
        expect_error(lambda: selattn_c.backward(dout, ctx, dF_rows=grad.rows,
                                                dF_row_index=grad.index + 70), ValueError)
        expect_error(lambda: selattn_c.mask_rows(ctx, np.array([[70], [0]])), ValueError)
        cache = selattn_c.KVCache(2, 3, 8)
        cache.prefill(q[:, :, :64], k[:, :, :64], v[:, :, :64])
        expect_error(lambda: cache.step(bad[:, :, 3], k[:, :, 0], v[:, :, 0]), ValueError)
        expect_error(lambda: cache.prefill(bad, k, v), ValueError)
        cache.step(bad[:, :, 3], k[:, :, 0], v[:, :, 0], check_finite=False)
        # a bound step whose arrays someone tries to reallocate (refused while bound)
        bq, bk, bv, bout = (np.zeros((2, 3, 8), np.float32) for _ in range(4))
        bound = cache.bind_step(bq, bk, bv, bout)
        bound()
        expect_error(lambda: bq.resize((2, 3, 4096), refcheck=False), ValueError)
        bq[...] = q[:, :, 5]
        bound()
    print("memcheck script: every entry point ran")


if __name__ == "__main__":
    main()
