"""The C extension's Python API: input handling, errors, threads, determinism, the GIL."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import selattn_c

from helpers import QKVCase, qkv_cases, random_qkv


def forward_backward(q, k, v, dout, **options):
    out, ctx = selattn_c.forward(q, k, v, **options)
    return (out, *selattn_c.backward(dout, ctx))


# ----------------------------------------------------------------------------------------------
# Inputs: dtypes and strides


@given(case=qkv_cases(max_N=80, max_D=24), layout=st.sampled_from(["transposed", "strided",
                                                                   "fortran", "float64"]))
def test_any_strides_and_float64_equal_contiguous_float32(case, layout):
    """Views with any strides, and float64 arrays, give bitwise the same results as the same
    values passed as contiguous float32 (the wrapper converts; the kernels see identical data)."""
    q32, k32, v32 = (x.astype(np.float32) for x in (case.q, case.k, case.v))
    dout32 = np.random.default_rng(case.seed).standard_normal(q32.shape).astype(np.float32)
    expected = forward_backward(q32, k32, v32, dout32, **case.options())

    def relayout(x):
        if layout == "float64":
            return x.astype(np.float64)
        if layout == "fortran":
            return np.asfortranarray(x)
        if layout == "transposed":        # stored as (B, N, H, D), viewed as (B, H, N, D)
            return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        padded = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=np.float32)
        padded[..., ::2] = x              # every other element of the last axis
        return padded[..., ::2]

    got = forward_backward(*(relayout(x) for x in (q32, k32, v32, dout32)), **case.options())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        assert a.dtype == np.float32 and a.flags.c_contiguous, name
        np.testing.assert_array_equal(a, b, err_msg=name)


# ----------------------------------------------------------------------------------------------
# Errors


def small_qkv():
    return random_qkv(0, (1, 2, 5, 4), dtype=np.float32)


@pytest.mark.parametrize("function", ["forward", "accumulated_mask"])
def test_bad_inputs_raise_clear_errors(function):
    q, k, v = small_qkv()
    call = (lambda *a, **kw: selattn_c.forward(*a, **kw)) if function == "forward" else \
        (lambda q, k, v, **kw: selattn_c.accumulated_mask(q, k, **kw))
    with pytest.raises(ValueError, match="4 dimensions"):
        call(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="shape mismatch"):
        call(q, k[:, :, :4], v)
    with pytest.raises(TypeError, match="floating-point"):
        call(q.astype(np.int32), k.astype(np.int32), v.astype(np.int32))
    with pytest.raises(ValueError, match="out of range"):
        call(q, k, v, selector_head=2)
    with pytest.raises(ValueError, match="out of range"):
        call(q, k, v, selector_head=-1)
    with pytest.raises(TypeError, match="selector_head must be an int"):
        call(q, k, v, selector_head=0.0)
    with pytest.raises(ValueError, match=">= 1"):
        call(q[:, :, :0], k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="finite"):
        call(q, k, v, scale=float("nan"))
    bad = q.copy()
    bad[0, 0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        call(bad, k, v)
    with pytest.raises(ValueError, match="NaN or infinity"):   # finite in float64, inf in float32
        call(*(x.astype(np.float64) * 1e300 for x in (q, k, v)))


def test_backward_checks_its_arguments():
    q, k, v = small_qkv()
    out, ctx = selattn_c.forward(q, k, v)
    with pytest.raises(ValueError, match="dout must have shape"):
        selattn_c.backward(out[:, :1], ctx)
    with pytest.raises(TypeError, match="Context"):
        selattn_c.backward(out, {"q": q})
    with pytest.raises(TypeError, match="floating-point"):
        selattn_c.backward(out.astype(np.int64), ctx)
    with pytest.raises(ValueError, match="dout contains NaN or infinity"):
        selattn_c.backward(np.full_like(out, np.inf), ctx)


def test_thread_setting_is_validated():
    with pytest.raises(ValueError, match=">= 1"):
        selattn_c.set_num_threads(0)
    with pytest.raises(TypeError):
        selattn_c.set_num_threads(2.0)
    assert isinstance(selattn_c.openmp_enabled(), bool)
    assert selattn_c.kernel_name() in ("avx512", "avx2", "generic")
    before = selattn_c.get_num_threads()
    try:
        selattn_c.set_num_threads(3)
        assert selattn_c.get_num_threads() == (3 if selattn_c.openmp_enabled() else 1)
    finally:
        selattn_c.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Determinism


@given(case=qkv_cases(max_N=200, max_D=40, min_N=60))
def test_one_and_two_threads_give_identical_bits(case):
    """Every value has a single owner task with a fixed order of operations, so the thread count
    cannot change a bit (N >= 60 gives several query blocks to share)."""
    dout = np.random.default_rng(case.seed).standard_normal(case.q.shape)
    before = selattn_c.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 2):
            selattn_c.set_num_threads(threads)
            results.append(forward_backward(case.q, case.k, case.v, dout, **case.options()))
    finally:
        selattn_c.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("N", [64 * 64 + 70, 64 * 20 + 7])
def test_forward_wavefront_gives_identical_bits_on_more_threads_than_cores(N):
    """The selective forward's tasks wait for the task above them (block qb reads the Fstart row
    block qb - 1 writes) and reuse slots of a ring of Fstart rows (62 rows at N = 64 * 64 + 70,
    for 66 blocks); when the ring holds every row (N = 64 * 20 + 7), the first 4 blocks run last,
    from rows computed before the loop. On 5 threads, more than CI's 2 cores, the waiting tasks
    must still finish and give the bits of 1 thread, for each of 2 batch elements and with an
    eviction schedule too."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 2, N, 8)).astype(np.float32) for _ in range(3))
    q[:, 0] *= 2.0                                 # a selector with some large logits: F grows
    before = selattn_c.get_num_threads()
    try:
        results = []
        for threads in (1, 5):
            selattn_c.set_num_threads(threads)
            results.append([selattn_c.forward(q, k, v, budget=budget)[0]
                            for budget in (None, 300)])
    finally:
        selattn_c.set_num_threads(before)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


DETERMINISM_SCRIPT = r"""
import hashlib, json, sys
import numpy as np
import selattn_c
selattn_c.set_num_threads(int(sys.argv[1]))
rng = np.random.default_rng(7)
digests = {}
for selective in (True, False):
    q, k, v, dout = (rng.standard_normal((2, 3, 333, 40)).astype(np.float32) for _ in range(4))
    out, ctx = selattn_c.forward(q, k, v, selector_head=1, selective=selective)
    dq, dk, dv = selattn_c.backward(dout, ctx)
    F = selattn_c.accumulated_mask(q, k, selector_head=1)
    for name, x in zip(("out", "dq", "dk", "dv", "F"), (out, dq, dk, dv, F)):
        digests[f"{name}-{selective}"] = hashlib.sha256(x.tobytes()).hexdigest()
print(json.dumps({"openmp": selattn_c.openmp_enabled(), "digests": digests}))
"""


def run_python(args, cwd, env=None, **kwargs):
    """Run a fresh interpreter in ``cwd``: a directory outside the source tree, so that
    ``import selattn_c`` finds the installed package, not the uncompiled source folder."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, timeout=600, check=True,
                          **kwargs)


def run_determinism_script(threads: int, cwd) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = run_python(["-c", DETERMINISM_SCRIPT, str(threads)], cwd, env=env,
                      capture_output=True, text=True)
    return json.loads(done.stdout)


def test_thread_counts_and_runs_agree_bitwise_in_fresh_processes(tmp_path):
    """1 thread, 2 threads, 2 threads again and 3 threads (an odd team: other schedules of the
    query blocks and of the backward's dq chunks), each in its own interpreter."""
    one, two, again, three = (run_determinism_script(n, tmp_path) for n in (1, 2, 2, 3))
    assert one["digests"] == two["digests"] == again["digests"] == three["digests"]


# ----------------------------------------------------------------------------------------------
# The GIL


def test_gil_is_released_during_c_calls():
    """While a long backward runs in a worker thread, the main thread keeps executing Python.

    The check is about concurrency, not speed: the main thread records when each of its loop
    iterations ran, and some must fall strictly inside the C call (which lasts ~0.1 s or more).
    With the GIL held for the whole call, none could.
    """
    q, k, v = random_qkv(3, (1, 4, 1024, 64), dtype=np.float32)
    out, ctx = selattn_c.forward(q, k, v)
    window = {}
    before = selattn_c.get_num_threads()
    selattn_c.set_num_threads(1)

    def worker():
        window["start"] = time.perf_counter()
        selattn_c.backward(out, ctx)
        window["end"] = time.perf_counter()

    thread = threading.Thread(target=worker)
    stamps = []
    try:
        thread.start()
        while thread.is_alive():
            stamps.append(time.perf_counter())
        thread.join()
    finally:
        selattn_c.set_num_threads(before)
    start, end = window["start"], window["end"]
    assert end - start > 0.02, "the call was too short to tell"
    margin = 0.25 * (end - start)
    inside = [t for t in stamps if start + margin < t < end - margin]
    assert len(inside) > 100, f"main thread ran {len(inside)} iterations during the C call"


def test_float32_outputs_and_context_keep_no_n_by_n_arrays():
    q, k, v = random_qkv(0, (2, 3, 70, 8), dtype=np.float64)
    out, ctx = selattn_c.forward(q, k, v)
    assert out.dtype == np.float32
    N = q.shape[2]
    for name, value in vars(ctx).items():
        if isinstance(value, np.ndarray):
            assert value.size <= q.size, f"ctx.{name} has {value.size} values"
    assert ctx.lse.shape == (2, 3, N)


# ----------------------------------------------------------------------------------------------
# The forward's Fstart rows, handed to the backward


# 13 query blocks: the first 2 are the forward's filler (rows from the two-pass prefix)
FILLER_CASE = QKVCase(*random_qkv(3, (2, 2, 64 * 12 + 5, 4)), selector_head=1, protect_bos=True,
                      selective=True, input_scale=1.0, seed=3)


@example(case=FILLER_CASE)
@given(case=qkv_cases(max_N=200, max_D=24, selective=True))
def test_context_fstart_holds_f_at_each_block_start(case):
    """ctx.fstart[b, qb] is F[b, 64 qb, :] up to its block's diagonal (bit for bit: F there is
    Fstart plus an empty in-block sum) and 0 beyond it; the example has 13 blocks, the first 2
    of which take their rows from the two-pass prefix (the forward's filler). The exact forward:
    one that skips dead keys keeps +inf on their tiles (tests/test_c_dead_keys.py)."""
    out, ctx = selattn_c.forward(case.q, case.k, case.v, dead_key_threshold=None,
                                 **case.options())
    F = selattn_c.accumulated_mask(case.q, case.k, selector_head=case.selector_head,
                                   protect_bos=case.protect_bos)
    B, _, N, _ = case.q.shape
    assert ctx.fstart.shape == (B, -(-N // 64), N)
    for qb in range(ctx.fstart.shape[1]):
        edge = min(64 * (qb + 1), N)
        np.testing.assert_array_equal(ctx.fstart[:, qb, :edge], F[:, 64 * qb, :edge])
        assert not ctx.fstart[:, qb, edge:].any()


@given(case=qkv_cases(max_N=200, max_D=24))
def test_backward_with_and_without_the_forwards_fstart_agree_bitwise(case):
    """The backward builds Fstart itself when the Context has none, with the same sums in the
    same order: the gradients are the same bits either way."""
    dout = np.random.default_rng(case.seed).standard_normal(case.q.shape)
    out, ctx = selattn_c.forward(case.q, case.k, case.v, **case.options())
    assert (ctx.fstart is not None) == case.selective
    kept = selattn_c.backward(dout, ctx)
    rebuilt = selattn_c.backward(dout, dataclasses.replace(ctx, fstart=None))
    for a, b in zip(kept, rebuilt):
        np.testing.assert_array_equal(a, b)


def test_context_keeps_fstart_only_up_to_one_mib_per_batch_element():
    """Up to N = 4096 the forward keeps its Fstart rows (1 MiB per batch element at 4096);
    beyond, the Context has none and the forward's memory stays O(N) per head; a standard or a
    budgeted forward keeps none."""
    for N, kept in ((4096, True), (4097, False)):
        q = np.zeros((2, 1, N, 1), np.float32)
        _, ctx = selattn_c.forward(q, q, q)
        assert (ctx.fstart is not None) == kept
        if kept:
            assert ctx.fstart.nbytes == 2 << 20
    q = np.zeros((1, 1, 100, 1), np.float32)
    assert selattn_c.forward(q, q, q, selective=False)[1].fstart is None
    assert selattn_c.forward(q, q, q, budget=10)[1].fstart is None


# ----------------------------------------------------------------------------------------------
# Every kernel set, not only the one this CPU picks


KERNEL_SET_SCRIPT = r"""
import sys
import numpy as np
import selattn_c
out_path = sys.argv[1]
rng = np.random.default_rng(11)
results = {"kernels": np.array(selattn_c.kernel_name())}
for name, (B, H, N, D, s, bos, sel) in {
    "a": (2, 3, 150, 40, 1, True, True),      # partial last tile, D not a multiple of 16
    "b": (1, 2, 64, 64, 0, False, True),      # exactly one tile
    "c": (1, 2, 97, 5, 1, True, False),       # standard attention, tiny D
}.items():
    q, k, v, dout = (rng.standard_normal((B, H, N, D)) for _ in range(4))
    out, ctx = selattn_c.forward(q, k, v, selector_head=s, protect_bos=bos, selective=sel)
    dq, dk, dv = selattn_c.backward(dout, ctx)
    F = selattn_c.accumulated_mask(q, k, selector_head=s, protect_bos=bos)
    for key, x in zip(("q", "k", "v", "dout", "out", "dq", "dk", "dv", "F"),
                      (q, k, v, dout, out, dq, dk, dv, F)):
        results[f"{name}_{key}"] = x
results["options"] = np.array([[2, 3, 150, 40, 1, 1, 1], [1, 2, 64, 64, 0, 0, 1],
                               [1, 2, 97, 5, 1, 1, 0]])
np.savez(out_path, **results)
"""


@pytest.mark.parametrize("kernels", ["generic", "avx2", "avx512"])
def test_every_kernel_set_matches_the_reference(kernels, tmp_path):
    """SELATTN_KERNELS forces a kernel set (when the CPU has it; otherwise the best it has runs,
    and the test checks that instead)."""
    from selattn_reference import attention as ref
    from test_c_against_reference import Bounds, as_float32_values, near_relu_kink

    path = tmp_path / "results.npz"
    env = dict(os.environ, SELATTN_KERNELS=kernels)
    run_python(["-c", KERNEL_SET_SCRIPT, str(path)], tmp_path, env=env)
    z = np.load(path)
    if kernels == "generic":
        assert str(z["kernels"]) == "generic"
    for name, (B, H, N, D, s, bos, sel) in zip("abc", z["options"]):
        q, k, v, dout = as_float32_values(*(z[f"{name}_{key}"] for key in ("q", "k", "v", "dout")))
        options = dict(selector_head=int(s), protect_bos=bool(bos), selective=bool(sel))
        out_ref, cache = ref.forward(q, k, v, **options)
        dq_ref, dk_ref, dv_ref = ref.backward(dout, cache)
        F_ref = ref.accumulated_mask(q, k, selector_head=int(s), protect_bos=bool(bos))
        bounds = Bounds(cache, q, k, v, dout)
        bounds.assert_close("out", z[f"{name}_out"], out_ref)
        bounds.assert_close("F", z[f"{name}_F"], F_ref)
        if not (sel and near_relu_kink(q, k, int(s), 1.0 / np.sqrt(int(D)))):
            bounds.assert_close("dq", z[f"{name}_dq"], dq_ref)
            bounds.assert_close("dk", z[f"{name}_dk"], dk_ref)
            bounds.assert_close("dv", z[f"{name}_dv"], dv_ref)


# ----------------------------------------------------------------------------------------------
# The build


def load_build_script():
    """The cffi build script from the source tree (it reads csrc/, so it is a build-time file:
    the copy installed next to the extension is not meant to be imported)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "selattn_c" / "build_ffi.py"
    spec = importlib.util.spec_from_file_location("selattn_build_ffi", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_openmp_probe_falls_back_to_a_serial_build(monkeypatch):
    build_ffi = load_build_script()

    monkeypatch.delenv("SELATTN_NO_OPENMP", raising=False)
    with pytest.warns(UserWarning, match="cannot build OpenMP programs"):
        flags = build_ffi.openmp_flags(cc="selattn-no-such-compiler")
    assert flags == ([], [], "no OpenMP in selattn-no-such-compiler")
    monkeypatch.setenv("SELATTN_NO_OPENMP", "1")
    assert build_ffi.openmp_flags() == ([], [], "SELATTN_NO_OPENMP")


def test_build_info_describes_this_build():
    info = selattn_c.build_info()
    assert info["openmp"] == selattn_c.openmp_enabled()
    assert (info["serial_reason"] == "") == info["openmp"]
    assert info["kernels"] == selattn_c.kernel_name()
    assert info["default_threads"] >= 1
