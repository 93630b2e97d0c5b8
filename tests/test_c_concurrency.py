"""Several Python threads using the C extension at once.

The wrappers release the GIL while C runs, so threads really overlap. forward, backward and
accumulated_mask share nothing between calls: concurrent calls give bitwise the serial results.
A KVCache holds one sequence and refuses concurrent use with a RuntimeError; it is never corrupted:
the calls that succeeded, replayed serially in the order they took effect, give the same outputs
and the same final cache, bitwise.
"""

from __future__ import annotations

import threading
import time

import numpy as np

import selattn_c

from helpers import exact_qkv, random_qkv

THREADS = 4


def run_in_threads(work, n: int = THREADS) -> list:
    """Start ``n`` threads running ``work(i)`` together (a barrier lines them up); return their
    results in thread order, re-raising the first exception."""
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def target(i):
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_concurrent_forward_backward_and_mask_equal_serial_bitwise():
    """Each thread runs forward, backward and accumulated_mask on its own inputs (different
    shapes and options), several times; every result equals the serial one bit for bit."""
    cases = []
    for i in range(THREADS):
        q, k, v = random_qkv(i, (2, 3, 70 + 13 * i, 8 + i), dtype=np.float32)
        dout = np.random.default_rng(100 + i).standard_normal(q.shape).astype(np.float32)
        cases.append((q, k, v, dout, dict(selector_head=i % 3, protect_bos=i % 2 == 0)))

    def compute(i):
        q, k, v, dout, opts = cases[i]
        out, ctx = selattn_c.forward(q, k, v, **opts)
        grads = selattn_c.backward(dout, ctx)
        F = selattn_c.accumulated_mask(q, k, **opts)
        pruned, _ = selattn_c.forward(q, k, v, budget=9, **opts)
        return (out, *grads, F, pruned)

    serial = [compute(i) for i in range(THREADS)]
    for _ in range(5):
        concurrent = run_in_threads(compute)
        for expected, got in zip(serial, concurrent):
            for x, y in zip(expected, got):
                np.testing.assert_array_equal(x, y)


def test_shared_forward_inputs_are_only_read():
    """Threads sharing the same input arrays (kept by reference in their Contexts) do not
    disturb each other: the inputs are const in C."""
    q, k, v = random_qkv(7, (1, 2, 130, 16), dtype=np.float32)
    before = [x.copy() for x in (q, k, v)]
    expected, _ = selattn_c.forward(q, k, v)
    outs = run_in_threads(lambda i: selattn_c.forward(q, k, v)[0])
    for out in outs:
        np.testing.assert_array_equal(out, expected)
    for x, y in zip(before, (q, k, v)):
        np.testing.assert_array_equal(x, y)


def test_a_shared_cache_refuses_concurrent_use_and_is_never_corrupted():
    """Threads step one shared (unbudgeted, so it also grows) cache, retrying each token until
    the cache takes it. Each attempt either succeeds or raises RuntimeError naming the other
    thread. Each token's value vector carries its id, so the stored values give the order in which
    the steps took effect; a fresh cache stepped serially in that order gives the same outputs and
    the same final state, bitwise."""
    B, H, D, tokens = 2, 8, 64, 100                        # steps long enough to overlap
    q, k, v = exact_qkv(3, (B, H, THREADS * tokens, D))
    v[..., 0] = np.arange(THREADS * tokens)                 # the id of token t is v[..., t, 0]
    cache = selattn_c.KVCache(B, H, D, selector_head=1)

    def hammer(i):
        done, refused = {}, 0
        for t in range(i * tokens, (i + 1) * tokens):
            while t not in done:
                try:
                    done[t] = cache.step(q[:, :, t], k[:, :, t], v[:, :, t])
                except RuntimeError as exc:
                    assert "another thread" in str(exc)
                    refused += 1
                    time.sleep(0)                            # let the holder finish
                try:
                    cache.positions                          # readers are refused alike
                except RuntimeError:
                    refused += 1
        return done, refused

    results = run_in_threads(hammer)
    outputs = {t: out for done, _ in results for t, out in done.items()}
    assert cache.length == len(outputs) == THREADS * tokens
    order = cache.values()[0, 0, : cache.length, 0].astype(int)     # slots in insertion order
    assert sorted(order) == sorted(outputs)

    replay = selattn_c.KVCache(B, H, D, selector_head=1)
    for t in order:
        np.testing.assert_array_equal(replay.step(q[:, :, t], k[:, :, t], v[:, :, t]),
                                      outputs[t])
    for name in ("length", "capacity", "size", "evictions", "positions", "F"):
        np.testing.assert_array_equal(getattr(replay, name), getattr(cache, name))
    np.testing.assert_array_equal(replay.keys(), cache.keys())
    np.testing.assert_array_equal(replay.values(), cache.values())
