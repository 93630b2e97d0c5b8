"""Benchmark: the C selective-attention kernels against the NumPy reference and PyTorch.

Run it as a script (it is not a test)::

    python -m selattn_bench.kernels                # B=1, H=8, D=64, N in 512..4096, all cores
    python -m selattn_bench.kernels --threads 2    # the setting the performance targets use
    python -m selattn_bench.kernels --threads 1,2  # both counts, and the 2-thread speed-up
    python -m selattn_bench.kernels --sizes 256,512 --repeats 3 --no-torch    # quick look
    python -m selattn_bench.kernels --markdown     # the same tables as Markdown
    python -m selattn_bench.kernels --memory       # peak resident memory at N = 16384 instead

PyTorch is optional (``pip install 'selattn[bench]'``); without it the torch rows are left out.

What one run prints
-------------------
Header: versions, CPU model, thread counts of every library in the process (the C kernels,
OpenBLAS under NumPy, PyTorch) and NumPy's float32 matrix-multiply rate ("sgemm GFLOP/s"),
measured here, as the machine's practical limit: in a fresh process with OpenBLAS's own choice of
kernel (``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` removed from that process' environment
only; ``selattn_bench.sgemm_reference``), on the benchmark's BLAS thread count; the header names
the BLAS kernel it ran (threadpoolctl).

Timing table, one block of rows per N, every operation on the same float32 inputs:

``C fwd``                   ``selattn_c.forward`` (selective attention, the paper's defaults:
                            selector head 0, BOS protected)
``C fwd, selective=False``  the same kernel with F = 0: standard causal attention, the math
                            SDPA computes
``C bwd``                   ``selattn_c.backward`` only; its context comes from a forward run
                            outside the timed region
``torch SDPA fwd/bwd``      ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``:
                            standard causal attention, PyTorch's fused CPU kernel (the bwd row
                            times ``out.backward`` only)
``torch eager sel. fwd``    the paper's listing (Figure 2) written eagerly in PyTorch, under
                            ``torch.no_grad``; checked against the NumPy reference at start-up
                            (the (N, N) masks are built once per N, outside the timing)
``torch eager sel. bwd``    its backward by autograd (``out.backward`` only; the graph is built
                            outside the timed region)
``NumPy ref fwd/bwd``       ``selattn_reference.attention`` on float32 inputs (it keeps the full
                            (B, H, N, N) matrices; rows above ``--ref-max-n`` say "skipped")

Columns: median and minimum wall time (``time.perf_counter``) over the timed runs after the
warm-up runs; the number of timed runs (at least ``--repeats``; fast operations run until
``--min-time`` seconds are collected); the attention GFLOP/s the median reaches; and that rate as
a percentage of the sgemm rate. For one N, the C rows and the SDPA rows are timed in interleaved
rounds (each round runs each of them once), so a slow spell of the machine hits them alike and
their ratios stay honest; the slow baselines (eager PyTorch, NumPy) are then timed one after
another. The header and footer print the load average: on a small shared machine other
processes move every row, so compare rows of one run, not across runs.

FLOP convention (the same for every row, so rows compare): causal attention forward is credited
with its two matrix products over the causal half, QK^T and PV: 2 * (2*B*H*N*N*D) / 2 =
2*B*H*N^2*D flops. Backward is credited 2.5x that (five products instead of two). Softmax, the
selection mask and masking are not counted. Implementations that compute the full N x N (the
NumPy reference, eager PyTorch) are credited with the same causal count.

Ratio table (of medians), per N: C fwd / SDPA fwd, eager fwd / C fwd (the speed-up over the
eager listing), C bwd / C fwd, C bwd / SDPA bwd, eager bwd / C bwd, C fwd / C fwd std (the cost
of selectivity), ref fwd / C fwd, ref bwd / C bwd. Then the speed targets of issue 7 (specified
for 2 threads) are checked, PASS or MISS: C fwd <= 1.0x SDPA fwd at N = 2048 and 4096, >= 10x
faster than the eager listing at N = 2048, >= 50 % of the sgemm rate at N = 2048 and 4096;
C bwd <= 2.5x C fwd at N = 2048 and 4096, >= 10x faster than eager autograd at N = 2048.

``--threads 1,2`` runs everything once per thread count, each in a fresh process (so OpenBLAS and
PyTorch start with that count), prints each run's tables, then a speed-up table (medians of the
first count over the others) and target 6: the C forward at N = 2048 on 2 threads >= 1.7x
faster than on 1.

``--memory`` instead runs one forward (and, in a second fresh process, forward + backward) at
B=1, H=8, N=16384, D=64 (``selattn_bench.memory_probe``: a process holding only the
interpreter, NumPy and selattn_c) and reports the whole process's peak resident set size
(interpreter and NumPy included) against the bytes of the tensors the call must hold: q, k, v,
out for the forward; q, k, v, out, dout, dq, dk, dv for forward + backward. The target (issue 7, for the
forward) is peak <= 1.3x those bytes, judged twice: for the whole process and net of the resident
set after the imports (interpreter, NumPy, the extension); ``--memory-n`` changes N.

Threads: ``--threads T`` (default: all cores) goes to the C library
(``selattn_c.set_num_threads``), to PyTorch (``torch.set_num_threads``) and to OpenBLAS through
``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS``; OpenBLAS reads those only when it is loaded, so
if NumPy is already loaded with another count the script re-runs itself once with them set.
``--flush-denormal`` calls ``torch.set_flush_denormal(True)`` first (main thread only): the eager
listing's softmax produces float32 denormals, which are slow on x86.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from .common import (
    Result,
    blas_thread_report,
    cpu_flags,
    cpu_model,
    import_torch,
    load_average,
    render,
    strip_option,
    time_op,
    time_ops_interleaved,
    verdict,
)
from .peak_memory import memory_report
from .sgemm_reference import SgemmReference, measure_sgemm

if TYPE_CHECKING:  # numpy is imported in main(), after the thread variables are set
    import numpy as np

TARGET_NS = (2048, 4096)       # the sizes issue 7's speed targets name
TARGET_THREADS = 2
SGEMM_N = 2048
VERIFY_N = 256
_REEXEC_GUARD = "SELATTN_BENCH_REEXEC"
_BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

# Row labels (also the keys of the ratio table).
C_FWD = "C fwd"
C_FWD_STD = "C fwd, selective=False"
C_BWD = "C bwd"
SDPA_FWD = "torch SDPA fwd (causal)"
SDPA_BWD = "torch SDPA bwd (causal)"
EAGER_FWD = "torch eager sel. fwd"
EAGER_BWD = "torch eager sel. bwd (autograd)"
REF_FWD = "NumPy ref fwd (float32)"
REF_BWD = "NumPy ref bwd (float32)"
# Timed in interleaved rounds (see time_ops_interleaved): the rows the targets compare.
PAIRED = (C_FWD, C_FWD_STD, C_BWD, SDPA_FWD, SDPA_BWD)


# ----------------------------------------------------------------------------------------------
# Command line and threads


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m selattn_bench.kernels",
                                description="Benchmark selective attention: C, NumPy, PyTorch.")
    p.add_argument("--sizes", default="512,1024,2048,4096", help="comma-separated N values")
    p.add_argument("--heads", type=int, default=8, help="H (default 8)")
    p.add_argument("--dim", type=int, default=64, help="D, head size (default 64)")
    p.add_argument("--batch", type=int, default=1, help="B (default 1)")
    p.add_argument("--threads", default=str(os.cpu_count() or 1),
                   help="threads for every library (default: all cores); a comma-separated "
                        "list such as 1,2 runs the benchmark once per count, each in a fresh "
                        "process, and adds the speed-up table")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per operation (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--min-time", type=float, default=0.5,
                   help="keep timing fast operations until this many seconds (default 0.5)")
    p.add_argument("--ref-max-n", type=int, default=2048,
                   help="largest N for the NumPy reference, which keeps (B,H,N,N) matrices")
    p.add_argument("--no-torch", action="store_true", help="leave out the PyTorch rows")
    p.add_argument("--flush-denormal", action="store_true",
                   help="torch.set_flush_denormal(True) first: FTZ/DAZ on the main thread, for "
                        "every row (worker threads keep their mode)")
    p.add_argument("--skip-verify", action="store_true",
                   help="skip the start-up correctness checks")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument("--memory", action="store_true",
                   help="report peak resident memory of a forward (and forward+backward) at "
                        "--memory-n instead of timing")
    p.add_argument("--memory-n", type=int, default=16384, help="N for --memory (default 16384)")
    p.add_argument("--results-json", help=argparse.SUPPRESS)   # a child of --threads 1,2
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    try:
        args.thread_counts = [int(t) for t in str(args.threads).split(",") if t.strip()]
    except ValueError:
        p.error(f"--threads must be an integer or comma-separated integers, got {args.threads!r}")
    if not args.thread_counts or min(args.thread_counts) < 1:
        p.error("--threads must be >= 1")
    args.threads = args.thread_counts[-1]
    for name in ("heads", "dim", "batch", "repeats", "memory_n"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.min_time < 0:
        p.error("--warmup and --min-time must be >= 0")
    if not args.sizes or min(args.sizes) < 1:
        p.error("--sizes needs at least one N >= 1")
    return args


def _blas_threads_from_env() -> Optional[int]:
    """The thread count OpenBLAS picks up from the environment when it loads (None: all cores)."""
    for key in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(key, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def pin_blas_threads(threads: int, allow_reexec: bool) -> None:
    """Make OpenBLAS use ``threads`` threads: set the variables, re-running if it is loaded."""
    effective = _blas_threads_from_env() or os.cpu_count()
    for key in _BLAS_ENV:
        os.environ[key] = str(threads)
    if "numpy" in sys.modules and effective != threads and allow_reexec \
            and not os.environ.get(_REEXEC_GUARD):
        # `python -m selattn_bench.kernels` imports the package (and NumPy) before this module runs.
        os.environ[_REEXEC_GUARD] = "1"
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "selattn_bench.kernels", *sys.argv[1:]])


# ----------------------------------------------------------------------------------------------
# Timing


def attention_flops(B: int, H: int, N: int, D: int, backward: bool = False) -> float:
    """Causal attention flops: 2*B*H*N^2*D forward (QK^T and PV over the causal half), 2.5x that
    backward."""
    fwd = 2.0 * B * H * N * N * D
    return 2.5 * fwd if backward else fwd


def torch_sgemm_gflops(torch: Any, n: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    times = time_op(lambda _: a @ b, None, warmup=2, repeats=repeats, min_time=0.5)
    return 2.0 * n ** 3 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------------------------
# The paper's listing, eagerly in PyTorch (the baseline the C kernel must beat 10x)


_MASKS: Dict[Tuple[int, bool], Tuple[Any, Any]] = {}


def torch_masks(torch: Any, N: int, protect_bos: bool) -> Tuple[Any, Any]:
    """(future, not_selectable): (N, N) bool masks, built once per N (not timed).

    future[i, j] = j > i. not_selectable[m, j] is True where S must be zero: j >= m (the
    diagonal, no self-masking, and the future) and, with BOS protected, column 0."""
    key = (N, protect_bos)
    if key not in _MASKS:
        future = torch.ones(N, N, dtype=torch.bool).triu(1)
        not_selectable = torch.ones(N, N, dtype=torch.bool).triu(0)
        if protect_bos:
            not_selectable[:, 0] = True
        _MASKS[key] = (future, not_selectable)
    return _MASKS[key]


def torch_selective_attention(q: Any, k: Any, v: Any, *, selector_head: int = 0,
                              protect_bos: bool = True, scale: Optional[float] = None) -> Any:
    """Selective attention as in the paper's Figure 2, eager PyTorch; q, k, v (B, H, N, D)."""
    import torch
    N, D = q.shape[-2], q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    future, not_selectable = torch_masks(torch, N, protect_bos)
    logits = (q @ k.transpose(-1, -2)) * scale                  # (B, H, N, N)
    logits = logits.masked_fill(future, float("-inf"))          # causal
    S = torch.relu(logits[:, selector_head])                    # (B, N, N) selector head
    S = S.masked_fill(not_selectable, 0.0)                      # BOS column, no self-masking
    S = torch.roll(S, 1, -2)                                    # a choice acts on later queries
    S[..., 0, :] = 0
    F = torch.cumsum(S, dim=-2)                                 # (B, N, N) accumulated mask
    logits = logits - F[:, None]
    return torch.softmax(logits, dim=-1) @ v                    # (B, H, N, D)


# ----------------------------------------------------------------------------------------------
# Start-up checks


def random_qkv(np_mod: Any, shape: Tuple[int, ...], dtype: Any, seed: int = 0,
               count: int = 3) -> List["np.ndarray"]:
    rng = np_mod.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=dtype) for _ in range(count)]


def rel_err(np_mod: Any, got: Any, want: Any) -> float:
    got = np_mod.asarray(got, dtype=np_mod.float64)
    want = np_mod.asarray(want, dtype=np_mod.float64)
    return float(np_mod.max(np_mod.abs(got - want)) / max(np_mod.max(np_mod.abs(want)), 1e-300))


def verify_torch_eager(np_mod: Any, torch: Any, ref: Any) -> str:
    """The eager listing equals the NumPy reference in float64, forward and autograd backward."""
    q, k, v, dout = random_qkv(np_mod, (2, 3, 48, 8), np_mod.float64, seed=7, count=4)
    q *= 2.0  # larger logits: some selections are strong, some relu inputs negative
    out_ref, cache = ref.forward(q, k, v)
    grads_ref = ref.backward(dout, cache)
    qt, kt, vt = (torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))
    out_t = torch_selective_attention(qt, kt, vt)
    out_t.backward(torch.from_numpy(dout))
    got = [out_t.detach().numpy(), qt.grad.numpy(), kt.grad.numpy(), vt.grad.numpy()]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, (out_ref, *grads_ref)):
        if not np_mod.allclose(g, w, rtol=1e-9, atol=1e-11):
            raise AssertionError(f"eager PyTorch listing disagrees with the reference on {name}: "
                                 f"relative error {rel_err(np_mod, g, w):.2e}")
    worst = max(rel_err(np_mod, g, w) for g, w in zip(got, (out_ref, *grads_ref)))
    return ("eager PyTorch listing == NumPy reference (float64, out and grads): "
            f"max rel err {worst:.1e}")


def verify_c(np_mod: Any, sc: Any, ref: Any, H: int, D: int) -> str:
    """The C kernels agree with the float64 reference on float32 inputs at a small N."""
    q, k, v, dout = random_qkv(np_mod, (1, H, VERIFY_N, D), np_mod.float32, seed=3, count=4)
    out_c, ctx = sc.forward(q, k, v)
    grads_c = sc.backward(dout, ctx)
    q64, k64, v64, d64 = (x.astype(np_mod.float64) for x in (q, k, v, dout))
    out_ref, cache = ref.forward(q64, k64, v64)
    grads_ref = ref.backward(d64, cache)
    errs = {"out": rel_err(np_mod, out_c, out_ref)}
    for name, g, w in zip(("dq", "dk", "dv"), grads_c, grads_ref):
        errs[name] = rel_err(np_mod, g, w)
    limits = {"out": 1e-4, "dq": 2e-3, "dk": 2e-3, "dv": 2e-3}
    bad = [f"{n} {e:.2e} > {limits[n]:.0e}" for n, e in errs.items() if not e <= limits[n]]
    if bad:
        raise AssertionError("C kernels disagree with the reference at N = "
                             f"{VERIFY_N}: " + ", ".join(bad))
    shown = ", ".join(f"{n} {e:.1e}" for n, e in errs.items())
    return f"C == NumPy reference at B=1, H={H}, N={VERIFY_N}, D={D} (max rel err: {shown})"


# ----------------------------------------------------------------------------------------------
# The operations timed at one N


@dataclass
class Op:
    name: str
    flops: float
    run: Optional[Callable[[Any], Any]] = None      # None: skipped, see note
    setup: Optional[Callable[[], Any]] = None
    note: str = ""


def c_ops(sc: Any, q: Any, k: Any, v: Any, dout: Any, fwd_flops: float,
          bwd_flops: float) -> List[Op]:
    holder: Dict[str, Any] = {}

    def setup_bwd() -> Any:  # one forward, outside the timed region, reused by every run
        if "ctx" not in holder:
            holder["ctx"] = sc.forward(q, k, v)[1]
        return holder["ctx"]

    return [
        Op(C_FWD, fwd_flops, lambda _: sc.forward(q, k, v)),
        Op(C_FWD_STD, fwd_flops, lambda _: sc.forward(q, k, v, selective=False)),
        Op(C_BWD, bwd_flops, lambda ctx: sc.backward(dout, ctx), setup_bwd),
    ]


def torch_ops(torch: Any, q: Any, k: Any, v: Any, dout: Any, fwd_flops: float,
              bwd_flops: float) -> List[Op]:
    qt, kt, vt, dt = (torch.from_numpy(x) for x in (q, k, v, dout))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def no_grad(fn: Callable[[], Any]) -> Callable[[Any], Any]:
        def run(_: Any) -> Any:
            with torch.no_grad():
                return fn()
        return run

    def graph(fn: Callable[[Any, Any, Any], Any]) -> Callable[[], Any]:
        def setup() -> Any:  # forward with autograd, not timed; the run is out.backward only
            leaves = [x.detach().requires_grad_(True) for x in (qt, kt, vt)]
            return fn(*leaves)
        return setup

    def backward(out: Any) -> None:
        out.backward(dt)

    def sdpa_causal(a: Any, b: Any, c: Any) -> Any:
        return sdpa(a, b, c, is_causal=True)

    return [
        Op(SDPA_FWD, fwd_flops, no_grad(lambda: sdpa_causal(qt, kt, vt))),
        Op(SDPA_BWD, bwd_flops, backward, graph(sdpa_causal)),
        Op(EAGER_FWD, fwd_flops, no_grad(lambda: torch_selective_attention(qt, kt, vt))),
        Op(EAGER_BWD, bwd_flops, backward, graph(torch_selective_attention)),
    ]


def ref_ops(ref: Any, q: Any, k: Any, v: Any, dout: Any, N: int, ref_max_n: int,
            fwd_flops: float, bwd_flops: float) -> List[Op]:
    if N > ref_max_n:
        note = f"NumPy reference rows above N = {ref_max_n} skipped (--ref-max-n)"
        return [Op(REF_FWD, fwd_flops, note=note), Op(REF_BWD, bwd_flops, note=note)]
    holder: Dict[str, Any] = {}

    def setup_bwd() -> Any:
        if "cache" not in holder:
            holder["cache"] = ref.forward(q, k, v)[1]
        return holder["cache"]

    return [
        Op(REF_FWD, fwd_flops, lambda _: ref.forward(q, k, v)),
        Op(REF_BWD, bwd_flops, lambda cache: ref.backward(dout, cache), setup_bwd),
    ]


def bench_one_n(np_mod: Any, sc: Any, ref: Any, torch: Any, args: argparse.Namespace,
                N: int) -> List[Result]:
    B, H, D = args.batch, args.heads, args.dim
    q, k, v, dout = random_qkv(np_mod, (B, H, N, D), np_mod.float32, seed=N, count=4)
    fwd, bwd = attention_flops(B, H, N, D), attention_flops(B, H, N, D, backward=True)
    ops = c_ops(sc, q, k, v, dout, fwd, bwd)
    if torch is not None:
        ops += torch_ops(torch, q, k, v, dout, fwd, bwd)
    ops += ref_ops(ref, q, k, v, dout, N, args.ref_max_n, fwd, bwd)
    # The C kernels and SDPA, the rows the targets compare, are timed in interleaved rounds;
    # the slow baselines (eager PyTorch, the NumPy reference) one after another.
    paired = [op for op in ops if op.run is not None and op.name in PAIRED]
    timed = dict(zip((op.name for op in paired),
                     time_ops_interleaved([(op.run, op.setup) for op in paired],
                                          warmup=args.warmup, repeats=args.repeats,
                                          min_time=args.min_time)))
    results = []
    for op in ops:
        if op.run is None:
            results.append(Result(N, op.name, op.flops, None, op.note))
            continue
        times = timed.get(op.name)
        if times is None:
            times = time_op(op.run, op.setup, warmup=args.warmup, repeats=args.repeats,
                            min_time=args.min_time)
        results.append(Result(N, op.name, op.flops, times))
        print(f"  N={N:<6} {op.name:<32} median {1e3 * statistics.median(times):10.2f} ms",
              file=sys.stderr, flush=True)
    del ops
    gc.collect()
    return results


# ----------------------------------------------------------------------------------------------
# Output


def timing_table(results: List[Result], sgemm: float, markdown: bool) -> str:
    headers = ["N", "operation", "median ms", "min ms", "runs", "GFLOP/s", "% sgemm"]
    rows = []
    for r in results:
        if r.times is None:
            rows.append([str(r.n), r.name, "skipped", "", "", "", ""])
            continue
        g = r.gflops()
        rows.append([str(r.n), r.name, f"{1e3 * r.median:.2f}", f"{1e3 * r.best:.2f}",
                     str(len(r.times)), f"{g:.1f}", f"{100 * g / sgemm:.0f}%"])
    return render(headers, rows, markdown, [True, False, True, True, True, True, True])


RATIOS: List[Tuple[str, str, str]] = [   # (column, numerator row, denominator row)
    ("C fwd / SDPA fwd", C_FWD, SDPA_FWD),
    ("eager fwd / C fwd", EAGER_FWD, C_FWD),
    ("C bwd / C fwd", C_BWD, C_FWD),
    ("C bwd / SDPA bwd", C_BWD, SDPA_BWD),
    ("eager bwd / C bwd", EAGER_BWD, C_BWD),
    ("C fwd / C fwd std", C_FWD, C_FWD_STD),
    ("ref fwd / C fwd", REF_FWD, C_FWD),
    ("ref bwd / C bwd", REF_BWD, C_BWD),
]

C_FWD_SGEMM = "C fwd % sgemm"

# Issue 7's speed targets: (N, column, comparison, bound, wording). Specified for 2 threads.
TARGETS: List[Tuple[int, str, str, float, str]] = [
    (2048, "C fwd / SDPA fwd", "<=", 1.0, "1. C forward <= 1.0x the SDPA (causal) time"),
    (4096, "C fwd / SDPA fwd", "<=", 1.0, "1. C forward <= 1.0x the SDPA (causal) time"),
    (2048, "eager fwd / C fwd", ">=", 10.0, "1. C forward >= 10x faster than eager selective"),
    (2048, C_FWD_SGEMM, ">=", 50.0, "2. C forward >= 50% of the sgemm GFLOP/s"),
    (4096, C_FWD_SGEMM, ">=", 50.0, "2. C forward >= 50% of the sgemm GFLOP/s"),
    (2048, "C bwd / C fwd", "<=", 2.5, "3. C backward <= 2.5x the C forward"),
    (4096, "C bwd / C fwd", "<=", 2.5, "3. C backward <= 2.5x the C forward"),
    (2048, "eager bwd / C bwd", ">=", 10.0, "3. C backward >= 10x faster than eager autograd"),
]
SPEEDUP_TARGET = (2048, C_FWD, 1.7)     # 6. 2 threads over 1, the forward at N = 2048


def ratio(by_name: Dict[str, Result], num: str, den: str) -> Optional[float]:
    a, b = by_name.get(num), by_name.get(den)
    if a is None or b is None or a.median is None or b.median is None:
        return None
    return a.median / b.median


def ratios_by_n(results: List[Result], sgemm: float) -> Dict[int, Dict[str, Optional[float]]]:
    out: Dict[int, Dict[str, Optional[float]]] = {}
    for n in dict.fromkeys(r.n for r in results):
        by_name = {r.name: r for r in results if r.n == n}
        out[n] = {col: ratio(by_name, num, den) for col, num, den in RATIOS}
        fwd = by_name.get(C_FWD)
        out[n][C_FWD_SGEMM] = (100.0 * fwd.gflops() / sgemm
                               if fwd is not None and fwd.times else None)
    return out


def ratio_table(table: Dict[int, Dict[str, Optional[float]]], markdown: bool) -> str:
    headers = ["N", *(col for col, _, _ in RATIOS)]
    rows = [[str(n), *("-" if table[n][col] is None else f"{table[n][col]:.2f}"
                       for col, _, _ in RATIOS)] for n in table]
    return render(headers, rows, markdown, [True] * len(headers))


def target_lines(table: Dict[int, Dict[str, Optional[float]]], threads: int) -> List[str]:
    lines = [f"issue 7 targets (specified for {TARGET_THREADS} threads; this run: {threads}):"]
    for n, col, op, bound, words in TARGETS:
        shown, result = verdict(table.get(n, {}).get(col), op, bound)
        lines.append(f"  {words:<50} N={n:<5} {col} = {shown:>6} (target {op} {bound:g})  "
                     f"{result}")
    lines.append("  (4. decode: python -m selattn_bench.decode; 5. memory: --memory; "
                 "6. speed-up: --threads 1,2)")
    return lines


FOOTNOTES = [
    "FLOPs: forward is credited 2*B*H*N^2*D (QK^T and PV over the causal half), backward 2.5x",
    "that; softmax and the selection mask are not counted. Every row uses this count, including",
    "the NumPy reference and eager PyTorch, which compute the full N x N. % sgemm = GFLOP/s over",
    "the NumPy float32 matmul rate in the header. Times: median (and min) wall time of the timed",
    "runs after warm-up; bwd rows time the backward call only, their forward ran untimed.",
    "C fwd % sgemm = the C forward's GFLOP/s as a percentage of the sgemm rate of this run.",
]


# ----------------------------------------------------------------------------------------------
# Main


def header_lines(np_mod: Any, sc: Any, torch: Any, torch_note: str, args: argparse.Namespace,
                 sgemm: SgemmReference, torch_sgemm: Optional[float], denormals: str
                 ) -> List[str]:
    lines = [
        "selective attention benchmark (selattn_bench.kernels)",
        f"shape: B={args.batch}, H={args.heads}, D={args.dim}, N in {args.sizes}; float32 inputs; "
        "selector head 0, BOS protected",
        f"cpu: {cpu_model()}; {os.cpu_count()} logical cores; flags: {cpu_flags()}; "
        f"load average (1 min) at start: {load_average()}",
        f"python {platform.python_version()}, numpy {np_mod.__version__}, torch {torch_note}",
        f"threads: C {sc.get_num_threads()} (openmp_enabled={sc.openmp_enabled()}"
        + (f", kernels {sc.kernel_name()}" if hasattr(sc, "kernel_name") else "") + "), "
        f"BLAS {blas_thread_report()}, torch "
        f"{torch.get_num_threads() if torch is not None else '-'}",
        f"timing: {args.warmup} warm-up run(s), >= {args.repeats} timed runs "
        f"(more for fast ops, up to {args.min_time:g} s); NumPy reference up to "
        f"N = {args.ref_max_n}; denormals {denormals}",
        f"machine limit: NumPy sgemm float32 {SGEMM_N}x{SGEMM_N}x{SGEMM_N}: "
        f"{sgemm.gflops:.1f} GFLOP/s"
        + (f"  (torch matmul: {torch_sgemm:.1f} GFLOP/s)" if torch_sgemm is not None else ""),
        f"sgemm reference BLAS: {sgemm.describe()}",
    ]
    return lines


def run_benchmark(args: argparse.Namespace) -> None:
    import numpy as np
    import selattn_c as sc
    from selattn_reference import attention as ref

    started = time.perf_counter()
    sc.set_num_threads(args.threads)
    torch, torch_note = import_torch(args.no_torch)
    if torch is not None:
        torch.set_num_threads(args.threads)
    denormals = "kept (default)"
    if args.flush_denormal:
        ok = torch is not None and torch.set_flush_denormal(True)
        denormals = "flushed on the main thread" if ok else "could not flush (needs torch, SSE3)"

    checks = []
    if not args.skip_verify:
        checks.append(verify_c(np, sc, ref, args.heads, args.dim))
        if torch is not None:
            checks.append(verify_torch_eager(np, torch, ref))

    sgemm_ref = measure_sgemm(SGEMM_N, args.repeats, args.threads)
    sgemm = sgemm_ref.gflops
    torch_sgemm = torch_sgemm_gflops(torch, SGEMM_N, args.repeats) if torch is not None else None
    print("\n".join(header_lines(np, sc, torch, torch_note, args, sgemm_ref, torch_sgemm,
                                  denormals)))
    for line in checks:
        print(f"check: {line}")
    print(flush=True)

    results: List[Result] = []
    for N in args.sizes:
        results += bench_one_n(np, sc, ref, torch, args, N)

    table = ratios_by_n(results, sgemm)
    print(timing_table(results, sgemm, args.markdown))
    for note in dict.fromkeys(r.note for r in results if r.times is None):
        print(note)
    print()
    print(ratio_table(table, args.markdown))
    print()
    print("\n".join(target_lines(table, args.threads)))
    print()
    print("\n".join(FOOTNOTES))
    print(f"total wall time: {time.perf_counter() - started:.0f} s; "
          f"load average (1 min) at end: {load_average()}", flush=True)
    if args.results_json:
        with open(args.results_json, "w", encoding="utf-8") as f:
            json.dump({"threads": args.threads, "sgemm": sgemm,
                       "results": [{"n": r.n, "name": r.name, "median": r.median,
                                    "best": r.best} for r in results]}, f)


def run_thread_counts(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """--threads 1,2: the whole benchmark once per thread count, each in a fresh process (so
    OpenBLAS starts with that count too), then the speed-up of every row over the first count."""
    import tempfile
    runs: List[Dict[str, Any]] = []
    rest = strip_option(list(argv), "--threads")
    with tempfile.TemporaryDirectory() as tmp:
        for t in args.thread_counts:
            path = os.path.join(tmp, f"threads-{t}.json")
            env = dict(os.environ, **{key: str(t) for key in _BLAS_ENV})
            print(f"==== {t} thread(s) ====", flush=True)
            subprocess.run([sys.executable, "-m", "selattn_bench.kernels", *rest,
                            "--threads", str(t), "--results-json", path], env=env, check=True)
            with open(path, encoding="utf-8") as f:
                runs.append(json.load(f))
            print(flush=True)
    base = runs[0]
    medians = [{(r["n"], r["name"]): r["median"] for r in run["results"]} for run in runs]
    print(f"speed-up over {base['threads']} thread(s) (ratio of medians; sgemm: "
          + ", ".join(f"{run['threads']} threads {run['sgemm']:.1f} GFLOP/s" for run in runs)
          + ")")
    headers = ["N", "operation", *(f"{run['threads']} thr ms" for run in runs),
               *(f"x at {run['threads']}" for run in runs[1:])]
    rows = []
    for key, t0 in medians[0].items():
        if t0 is None or key[1] not in PAIRED + (EAGER_FWD, EAGER_BWD):
            continue
        times = [m.get(key) for m in medians]
        rows.append([str(key[0]), key[1],
                     *("-" if t is None else f"{1e3 * t:.2f}" for t in times),
                     *("-" if t is None else f"{t0 / t:.2f}" for t in times[1:])])
    print(render(headers, rows, args.markdown, [True, False] + [True] * (len(headers) - 2)))
    n, name, bound = SPEEDUP_TARGET
    two = [i for i, run in enumerate(runs) if run["threads"] == TARGET_THREADS]
    one = [i for i, run in enumerate(runs) if run["threads"] == 1]
    value = None
    if one and two and medians[one[0]].get((n, name)) and medians[two[0]].get((n, name)):
        value = medians[one[0]][(n, name)] / medians[two[0]][(n, name)]
    shown, result = verdict(value, ">=", bound)
    print(f"\nissue 7 target 6: {name} at N={n}, {TARGET_THREADS} threads over 1 = {shown} "
          f"(target >= {bound:g})  {result}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if len(args.thread_counts) > 1 and not args.memory:
        run_thread_counts(args, sys.argv[1:] if argv is None else argv)
        return
    pin_blas_threads(args.threads, allow_reexec=argv is None)
    if args.memory:
        memory_report(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
