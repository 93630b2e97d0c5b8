"""Benchmark: token-by-token decoding with the pruned KV cache, and the budgeted prefill.

Run it as a script (it is not a test)::

    python -m selattn_bench.decode                  # context 4096, budgets 4096,1024,256,64,2
    python -m selattn_bench.decode --threads 2 --markdown
    python -m selattn_bench.decode --context 1024 --budgets 1024,64 --no-torch   # quick look

What one run prints
-------------------
Decode table, one row per budget (B=1, H=8, D=64 by default): a ``selattn_c.KVCache`` is filled
with ``--context`` tokens by ``prefill`` (not timed), then ``--steps`` calls of ``step`` make one
timed run; the time per step is the run's time divided by ``--steps``. A budgeted cache is in its
steady state (full; every step evicts one token), so every run does the same work; budget =
context is the full cache. Columns: held tokens, ``nbytes`` of the cache, the median time of one
``step`` (the Python method: input checks, conversion, the C call), of one call of a function from
``KVCache.bind_step`` (the same step on arrays checked once; one bound function per token's
arrays, made before timing), and of the bare C call (``lib.selattn_kv_step`` through cffi with
prepared pointers, in the same Python loop); the Python overhead of ``step`` and of the bound
step (each minus the bare call); and the speed-up over the first budget's ``step``.
Every timed run follows an untimed run of the same steps on the same cache, so ``step`` and the
bare call find the cache's memory equally warm (without it, the op timed first after another
budget's runs paid for cold caches, and the difference grew with the budget). Budget 2 (BOS and
the newest token) has almost no C work.

With PyTorch installed, one more row: the same decode step written eagerly in PyTorch over a full
cache (preallocated K, V and F; logits, minus F, softmax, times V, then F += relu of the selector
logits), which is what a public implementation that keeps the whole cache does. Each timed run
starts again from ``--context`` tokens.

All decode rows are timed in interleaved rounds (common.time_ops_interleaved), so a slow spell of
a shared machine hits them alike and their ratios stay honest.

Prefill table: ``selattn_c.forward`` at N = context, unbudgeted and with each budget below the
context (the eviction walk on the selector head, then the blocked kernel that skips wholly evicted
key tiles), interleaved likewise.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any, List, Optional, Sequence

from .common import (
    Result,
    cpu_flags,
    cpu_model,
    import_torch,
    load_average,
    render,
    time_ops_interleaved,
)

TARGET_BUDGET, TARGET_FULL, TARGET_SPEEDUP = 256, 4096, 10.0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m selattn_bench.decode",
                                description="Benchmark KV-cache decoding and budgeted prefill.")
    p.add_argument("--context", type=int, default=4096, help="tokens in the cache (default 4096)")
    p.add_argument("--budgets", default="4096,1024,256,64,2", help="comma-separated budgets")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per row (median)")
    p.add_argument("--min-time", type=float, default=0.3, help="least seconds of runs per row")
    p.add_argument("--no-torch", action="store_true", help="leave out the PyTorch row")
    p.add_argument("--no-prefill", action="store_true", help="leave out the prefill table")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    args = p.parse_args(argv)
    try:
        args.budgets = [int(x) for x in args.budgets.split(",") if x.strip()]
    except ValueError:
        p.error("--budgets must be comma-separated integers")
    if not args.budgets or min(args.budgets) < 2 or args.context < 1 or args.steps < 1:
        p.error("need budgets >= 2, context >= 1, steps >= 1")
    return args


def decode_ops(np: Any, sc: Any, args: argparse.Namespace):
    """(label, budget, cache, step run, bound step run, bare C run, warm-up) for every budget."""
    from selattn_c._selattn_cffi import ffi, lib

    B, H, D = args.batch, args.heads, args.dim
    rng = np.random.default_rng(0)
    prompt = [rng.standard_normal((B, H, args.context, D)).astype(np.float32) for _ in range(3)]
    tokens = [[rng.standard_normal((B, H, D)).astype(np.float32) for _ in range(3)]
              for _ in range(args.steps)]
    ptrs = [[ffi.from_buffer("float[]", x) for x in tok] for tok in tokens]
    out = np.empty((B, H, D), np.float32)
    out_ptr = ffi.from_buffer("float[]", out)
    threads = sc.get_num_threads()
    ops = []
    for budget in args.budgets:
        cache = sc.KVCache(B, H, D, budget=min(budget, args.context))
        cache.prefill(*prompt)

        def step_run(_: Any, cache=cache) -> None:
            for q, k, v in tokens:
                cache.step(q, k, v)

        bound = [cache.bind_step(q, k, v, out) for q, k, v in tokens]

        def bound_run(_: Any, bound=bound) -> None:
            for step in bound:
                step()

        def bare_run(_: Any, cache=cache) -> None:
            c = cache._c
            for qp, kp, vp in ptrs:
                lib.selattn_kv_step(c, qp, kp, vp, out_ptr, 1, threads)  # check_finite as step

        def warm(cache=cache) -> None:
            """Untimed steps on this cache right before each timed run: the rows are timed in
            rounds, so without it the first op of a budget would find the cache's memory
            evicted by the other budgets' runs and the second (on the same cache) would not,
            and their difference would measure caches, not Python."""
            bare_run(None, cache)

        ops.append((f"KVCache budget {budget}", budget, cache, step_run, bound_run, bare_run,
                    warm))
    return ops


def torch_full_cache_op(torch: Any, args: argparse.Namespace):
    """The eager PyTorch decode step over a full cache (see the module docstring)."""
    B, H, D, ctx = args.batch, args.heads, args.dim, args.context
    g = torch.Generator().manual_seed(0)
    K = torch.randn(B, H, ctx + args.steps, D, generator=g)
    V = torch.randn(B, H, ctx + args.steps, D, generator=g)
    F = torch.zeros(B, ctx + args.steps)
    tokens = [[torch.randn(B, H, D, generator=g) for _ in range(3)] for _ in range(args.steps)]
    scale = 1.0 / D ** 0.5

    def run(_: Any) -> None:
        with torch.no_grad():
            for n, (q, k, v) in enumerate(tokens):
                t = ctx + n
                K[:, :, t] = k
                V[:, :, t] = v
                F[:, t] = 0.0
                logits = torch.einsum("bhd,bhtd->bht", q, K[:, :, : t + 1]) * scale  # (B, H, t+1)
                p = torch.softmax(logits - F[:, None, : t + 1], dim=-1)
                torch.einsum("bht,bhtd->bhd", p, V[:, :, : t + 1])                 # (B, H, D)
                F[:, 1:t] += torch.relu(logits[:, 0, 1:t])          # not BOS, not the new token

    return run, 2 * (ctx + args.steps // 2) * H * D * 4 * B   # K and V bytes in float32


def prefill_ops(np: Any, sc: Any, args: argparse.Namespace):
    B, H, D, N = args.batch, args.heads, args.dim, args.context
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((B, H, N, D)).astype(np.float32) for _ in range(3))
    ops = [("forward, no budget", None)]
    ops += [(f"forward, budget {b}", b) for b in args.budgets if b < N]
    return [(label, lambda _, b=b: sc.forward(q, k, v, budget=b)) for label, b in ops]


def fmt_us(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.1f}"


def run(args: argparse.Namespace) -> None:
    import numpy as np
    import selattn_c as sc

    started = time.perf_counter()
    sc.set_num_threads(args.threads)
    torch, torch_note = import_torch(args.no_torch)
    if torch is not None:
        torch.set_num_threads(args.threads)
    print("KV-cache decode benchmark (selattn_bench.decode)")
    print(f"shape: B={args.batch}, H={args.heads}, D={args.dim}; context {args.context}; "
          f"budgets {args.budgets}; float32; selector head 0, BOS protected")
    print(f"cpu: {cpu_model()}; {os.cpu_count()} logical cores; flags: {cpu_flags()}; "
          f"load average (1 min) at start: {load_average()}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, torch {torch_note}; "
          f"threads: C {sc.get_num_threads()} (kernels {sc.kernel_name()}), torch "
          f"{torch.get_num_threads() if torch is not None else '-'}")
    print(f"timing: {args.steps} steps per run, >= {args.repeats} runs per row (>= "
          f"{args.min_time:g} s), rows interleaved; medians per step\n", flush=True)

    ops = decode_ops(np, sc, args)
    timed = []
    for label, _, _, step_run, bound_run, bare_run, warm in ops:
        timed += [(step_run, warm), (bound_run, warm), (bare_run, warm)]
    torch_bytes = None
    if torch is not None:
        torch_run, torch_bytes = torch_full_cache_op(torch, args)
        timed.append((torch_run, None))
    times = time_ops_interleaved(timed, warmup=1, repeats=args.repeats, min_time=args.min_time)
    per_step = [Result(args.context, "", 0.0, [t / args.steps for t in ts]) for ts in times]

    rows: List[List[str]] = []
    first = per_step[0].median
    summary = {}
    for n, (label, budget, cache, *_) in enumerate(ops):
        step, bound, bare = (per_step[3 * n + i].median for i in range(3))
        summary[budget] = step
        rows.append([label, f"{int(cache.size.max())}", f"{cache.nbytes / 2**20:,.2f}",
                     fmt_us(step), fmt_us(bound), fmt_us(bare), fmt_us(step - bare),
                     fmt_us(bound - bare), f"{first / step:.1f}x"])
    if torch is not None:
        t = per_step[-1].median
        rows.append(["torch eager, full cache", f"{args.context}", f"{torch_bytes / 2**20:,.2f}",
                     fmt_us(t), "-", "-", "-", "-", f"{first / t:.1f}x"])
    print(render(["decode step", "held", "cache MiB", "step us", "bound us", "C call us",
                  "Python us: step", "Python us: bound", f"vs budget {args.budgets[0]}"], rows,
                 args.markdown, [False] + [True] * 8))
    if TARGET_BUDGET in summary and TARGET_FULL in summary:
        ratio = summary[TARGET_FULL] / summary[TARGET_BUDGET]
        verdict = "met" if ratio >= TARGET_SPEEDUP else "NOT met"
        print(f"\ntarget: a step at budget {TARGET_BUDGET} >= {TARGET_SPEEDUP:g}x faster than at "
              f"budget {TARGET_FULL}: {ratio:.1f}x ({verdict})")

    if not args.no_prefill:
        pops = prefill_ops(np, sc, args)
        ptimes = time_ops_interleaved([(fn, None) for _, fn in pops], warmup=1,
                                      repeats=max(3, args.repeats // 3), min_time=0.0)
        prows = []
        base = Result(args.context, "", 0.0, ptimes[0]).median
        for (label, _), ts in zip(pops, ptimes):
            med = Result(args.context, "", 0.0, ts).median
            prows.append([label, f"{med * 1e3:,.1f}", f"{base / med:.2f}x"])
        print()
        print(render([f"prefill N={args.context}", "median ms", "vs no budget"], prows,
                     args.markdown, [False, True, True]))
    print(f"\ntotal wall time: {time.perf_counter() - started:.0f} s; load average (1 min) at end: "
          f"{load_average()}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
