"""Benchmark: the PyTorch bridge against what a PyTorch user would otherwise write.

Run it as a script (it is not a test)::

    python -m selattn_bench.torch_compare                  # B=1, H=8, D=64, N = 1024, 2048
    python -m selattn_bench.torch_compare --threads 2 --repeats 9
    python -m selattn_bench.torch_compare --sizes 128 --flex eager --repeats 3   # quick look

Needs torch >= 2.4 (``pip install '.[torch]'``; on a CPU-only machine the CPU build of torch;
run on 2.13.0). Every method gets the same float32 CPU tensors q, k, v (B, H, N, D), standard
normal, and computes causal selective attention (selector head 0, BOS protected, scale
1/sqrt(D)), except SDPA, which computes standard causal attention (for scale):

``bridge``                ``selattn_c.torch.selective_attention(q, k, v)``: the C kernels as a
                          ``torch.library`` custom operator with autograd
``SDPA (standard)``       ``torch.nn.functional.scaled_dot_product_attention(q, k, v,
                          is_causal=True)``: PyTorch's fused CPU kernel for *standard* attention
                          (no selection), i.e. what attention costs in PyTorch without selection
``eager``                 the paper's listing in plain PyTorch (causal logits, F from head 0's
                          logits, ``logits - F``, softmax, ``@ v``), differentiated by autograd
                          (``selattn_bench.kernels.torch_selective_attention``)
``flex (F precomputed)``  ``torch.compile(flex_attention)`` with a causal ``block_mask`` and F as
                          a ``score_mod`` reading a precomputed (B, N, N) tensor F,
                          ``score - F[b, q_idx, kv_idx]``; F is computed before each run, untimed.
                          The block mask is built once per N (a user would cache it), untimed
``F (torch ops)``         that F alone, in plain torch operations
                          (``selattn_c.torch_math.accumulated_mask``: head 0's logits, ReLU where
                          allowed (never BOS, never the diagonal or the future), shifted one query
                          down, cumulative sum over queries)
``flex + F``              both in one run: selective attention through flex_attention

Rows: ``fwd`` is one forward under ``torch.no_grad()``; ``fwd+bwd`` is ``out = f(q, k, v);
out.backward(dout)`` with fresh leaves q, k, v that require grad (the graph is built inside the
timed region, as in training). flex on CPU has no backward in torch 2.13 (``flex_attention``
raises ``NotImplementedError`` when an input requires grad, compiled or not); the benchmark tries
it at every N and puts what it raised in the table, so a torch version that adds it gets timed.

Columns: median and minimum wall time over the timed rounds; the ratio of the median to the
bridge's (``fwd`` rows to the bridge's ``fwd``, ``fwd+bwd`` rows to its ``fwd+bwd``); the largest
absolute error of the output (and, for ``fwd+bwd``, of dq, dk, dv) against the bridge's float64
path (``selective_attention`` on float64 copies of the same inputs, which runs the paper's
listing in torch float64 operations), so the table shows that every row computes the same thing
(SDPA against the float64 path with ``selective=False``; the F row against F in float64).

Timing: all rows of one N are timed in interleaved rounds (each round runs every row once:
``selattn_bench.common.time_ops_interleaved``), so a slow spell of a shared machine hits them
alike and the ratios stay honest; one untimed warm-up run each, then at least ``--repeats``
rounds. Before that, the first call of the compiled flex_attention at each N is timed on its
own and reported as its compile time (``torch.compile(..., dynamic=False)``, so each N compiles
its own static kernel; ``torch._dynamo.reset()`` first). By default Inductor compiles into a
fresh, empty cache directory, so the compile time is what a first run costs; ``--warm-cache``
uses the user's cache instead. ``--threads`` (default: all cores) goes to the C kernels and to
torch. The header names the CPU, the load average at start and end, the versions and threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .common import (
    blas_thread_report,
    cpu_flags,
    cpu_model,
    import_torch,
    load_average,
    render,
    time_ops_interleaved,
)

FLEX_MODES = ("compiled", "eager", "off")
CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"
Grads = Tuple[Any, Any, Any]


# ----------------------------------------------------------------------------------------------
# The methods: each takes float32 (or float64) tensors q, k, v (B, H, N, D) and returns out


def bridge_attention(q: Any, k: Any, v: Any) -> Any:
    """``selattn_c.torch.selective_attention(q, k, v)``: the bridge (float32: the C kernels;
    float64: the paper's listing in torch operations, the reference of the error columns)."""
    from selattn_c.torch import selective_attention
    return selective_attention(q, k, v)


def bridge_standard_attention(q: Any, k: Any, v: Any) -> Any:
    """The bridge with ``selective=False``: standard causal attention (SDPA's reference)."""
    from selattn_c.torch import selective_attention
    return selective_attention(q, k, v, selective=False)


def sdpa_attention(q: Any, k: Any, v: Any) -> Any:
    """``scaled_dot_product_attention(q, k, v, is_causal=True)``: standard attention."""
    import torch
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def eager_attention(q: Any, k: Any, v: Any) -> Any:
    """The paper's listing in eager PyTorch (autograd differentiates it)."""
    from .kernels import torch_selective_attention
    return torch_selective_attention(q, k, v)


def accumulated_mask(q: Any, k: Any) -> Any:
    """F (B, N, N) from head 0 of q, k (B, H, N, D), in plain torch operations, BOS protected."""
    from selattn_c.torch_math import accumulated_mask as mask
    return mask(q, k, selector_head=0, protect_bos=True)


def causal_block_mask(N: int) -> Any:
    """flex_attention's ``BlockMask`` of causal attention over N tokens (any batch and head).

    Raises
    ------
    ValueError
        if N is not a positive int.
    """
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"N must be a positive int, got {N!r}")
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return q_idx >= kv_idx

    return create_block_mask(causal, B=None, H=None, Q_LEN=N, KV_LEN=N, device="cpu")


def flex_function(mode: str) -> Callable[..., Any]:
    """``flex_attention`` as the benchmark calls it: ``"compiled"`` is
    ``torch.compile(flex_attention, dynamic=False)`` (the fused CPU kernel); ``"eager"`` is
    flex_attention itself, which runs an unfused implementation materialising the (B, H, N, N)
    scores (for tests at tiny N: no compile time); its warning about that is silenced.

    Raises
    ------
    ValueError
        if mode is neither "compiled" nor "eager".
    """
    import torch
    from torch.nn.attention.flex_attention import flex_attention
    if mode == "compiled":
        return torch.compile(flex_attention, dynamic=False)
    if mode == "eager":
        def eager_flex(*args: Any, **kwargs: Any) -> Any:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="flex_attention called without")
                return flex_attention(*args, **kwargs)
        return eager_flex
    raise ValueError(f"mode must be 'compiled' or 'eager', got {mode!r}")


def flex_selective_attention(flex: Callable[..., Any], q: Any, k: Any, v: Any, F: Any,
                             block_mask: Any) -> Any:
    """Selective attention through flex_attention: causal ``block_mask``, and F subtracted from
    every head's scaled logits by a ``score_mod`` reading the (B, N, N) tensor F."""

    def subtract_f(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return score - F[b, q_idx, kv_idx]

    return flex(q, k, v, score_mod=subtract_f, block_mask=block_mask)


def precomputed_mask(q: Any, k: Any) -> Any:
    """``accumulated_mask(q, k)`` under ``torch.no_grad()``: the F a forward-only flex reads."""
    import torch
    with torch.no_grad():
        return accumulated_mask(q, k)


def flex_attention_with_f(flex: Callable[..., Any], block_mask: Any) -> Callable[..., Any]:
    """q, k, v -> out: F computed (``accumulated_mask``), then ``flex_selective_attention``."""
    def attend(q: Any, k: Any, v: Any) -> Any:
        return flex_selective_attention(flex, q, k, v, accumulated_mask(q, k), block_mask)
    return attend


# ----------------------------------------------------------------------------------------------
# Inputs, gradients, the float64 reference, errors


def make_inputs(torch: Any, B: int, H: int, N: int, D: int, seed: int = 0) -> Tuple[Any, ...]:
    """q, k, v, dout: float32 (B, H, N, D) standard normal tensors from ``seed``.

    Raises
    ------
    ValueError
        if a dimension is not a positive int.
    """
    for name, x in (("B", B), ("H", H), ("N", N), ("D", D)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{name} must be a positive int, got {x!r}")
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, generator=g) for _ in range(4))


def forward(fn: Callable[[Any, Any, Any], Any], q: Any, k: Any, v: Any) -> Any:
    """``fn(q, k, v)`` under ``torch.no_grad()``."""
    import torch
    with torch.no_grad():
        return fn(q, k, v)


def forward_backward(fn: Callable[[Any, Any, Any], Any], q: Any, k: Any, v: Any,
                     dout: Any) -> Tuple[Any, Grads]:
    """``out = fn(q, k, v); out.backward(dout)`` on fresh leaves: (out, (dq, dk, dv))."""
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach(), tuple(x.grad for x in leaves)


def reference(q: Any, k: Any, v: Any, dout: Any, *, selective: bool = True
              ) -> Tuple[Any, Grads, Any]:
    """The float64 results of the bridge on float64 copies of the inputs (the paper's listing
    in torch float64 operations): (out, (dq, dk, dv), F); F is None when not selective."""
    fn = bridge_attention if selective else bridge_standard_attention
    q64, k64, v64, d64 = (x.detach().double() for x in (q, k, v, dout))
    out, grads = forward_backward(fn, q64, k64, v64, d64)
    F = precomputed_mask(q64, k64) if selective else None
    return out, grads, F


def max_abs_error(got: Any, want: Any) -> float:
    """max |got - want| in float64.

    Raises
    ------
    ValueError
        if the shapes differ.
    """
    if tuple(got.shape) != tuple(want.shape):
        raise ValueError(f"shapes differ: {tuple(got.shape)} and {tuple(want.shape)}")
    return float((got.detach().double() - want.detach().double()).abs().max())


def max_grad_error(got: Grads, want: Grads) -> float:
    """The largest ``max_abs_error`` over (dq, dk, dv)."""
    return max(max_abs_error(g, w) for g, w in zip(got, want))


# ----------------------------------------------------------------------------------------------
# One N


@dataclass
class Row:
    """One row of the table: a method, what is timed, its times and its errors."""

    n: int
    method: str
    timed: str                       # "fwd" or "fwd+bwd"
    times: Optional[List[float]] = None
    out_error: Optional[float] = None
    grad_error: Optional[float] = None
    note: str = ""

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None


@dataclass
class Op:
    """A timed operation: ``run(setup())`` (setup not timed) and the row it fills."""

    row: Row
    run: Callable[[Any], Any]
    setup: Optional[Callable[[], Any]] = None


@dataclass
class FlexState:
    """What the flex rows of one N need: the function and the block mask; what preparing them
    measured: the time to build the block mask, the compile time (the first call, when
    compiled) and, when flex_attention refused inputs that require grad, its error."""

    flex: Callable[..., Any]
    block_mask: Any
    block_mask_seconds: float
    compile_seconds: Optional[float] = None
    backward_error: Optional[str] = None


def prepare_flex(mode: str, q: Any, k: Any, v: Any, dout: Any) -> FlexState:
    """flex_attention for inputs like q, k, v (B, H, N, D): build the block mask (timed),
    make the function (``flex_function(mode)``), call it once (when compiled, that first call's
    time is the compile time) and try it once on inputs that require grad.

    Raises
    ------
    ValueError
        if mode is neither "compiled" nor "eager".
    """
    import torch
    if mode == "compiled":
        torch._dynamo.reset()      # a clean slate per N: each N compiles its own static kernel
    t0 = time.perf_counter()
    block_mask = causal_block_mask(q.shape[-2])
    mask_seconds = time.perf_counter() - t0
    state = FlexState(flex_function(mode), block_mask, mask_seconds)
    F = precomputed_mask(q, k)
    t0 = time.perf_counter()
    forward(lambda a, b, c: flex_selective_attention(state.flex, a, b, c, F, block_mask), q, k, v)
    if mode == "compiled":
        state.compile_seconds = time.perf_counter() - t0
    try:
        forward_backward(flex_attention_with_f(state.flex, block_mask), q, k, v, dout)
    except Exception as exc:      # noqa: BLE001  (what torch raises is the result)
        state.backward_error = f"{type(exc).__name__}: {exc}".strip()
    return state


def methods(flex: Optional[FlexState]) -> Dict[str, Callable[[Any, Any, Any], Any]]:
    """The methods by name (flex only when ``flex`` is given)."""
    out: Dict[str, Callable[[Any, Any, Any], Any]] = {
        "bridge": bridge_attention, "SDPA (standard)": sdpa_attention, "eager": eager_attention}
    if flex is not None:
        out["flex + F"] = flex_attention_with_f(flex.flex, flex.block_mask)
    return out


def build_ops(q: Any, k: Any, v: Any, dout: Any, N: int, flex: Optional[FlexState]
              ) -> Tuple[List[Op], List[Row]]:
    """The timed operations of one N and every row (untimed rows included), in table order,
    with the error columns filled from one untimed call of each."""
    ref_sel = reference(q, k, v, dout)
    ref_std = reference(q, k, v, dout, selective=False)
    ops: List[Op] = []
    rows: List[Row] = []

    def fresh_leaves() -> Tuple[Any, Any, Any]:
        return tuple(x.detach().requires_grad_(True) for x in (q, k, v))

    def backward_run(fn: Callable[[Any, Any, Any], Any]) -> Callable[[Any], Any]:
        def run(leaves: Tuple[Any, Any, Any]) -> None:
            fn(*leaves).backward(dout)
        return run

    def forward_run(fn: Callable[[Any, Any, Any], Any]) -> Callable[[Any], Any]:
        return lambda _: forward(fn, q, k, v)

    for name, fn in methods(flex).items():
        want_out, want_grads, _ = ref_std if name.startswith("SDPA") else ref_sel
        if name == "flex + F":
            def flex_only(F: Any, fl: FlexState = flex) -> Any:
                return forward(lambda a, b, c: flex_selective_attention(
                    fl.flex, a, b, c, F, fl.block_mask), q, k, v)

            F = precomputed_mask(q, k)
            note = (f"compile (first call) {flex.compile_seconds:.1f} s, not in the median"
                    if flex.compile_seconds is not None else "flex_attention not compiled")
            row = Row(N, "flex (F precomputed)", "fwd",
                      out_error=max_abs_error(flex_only(F), want_out), note=note)
            ops.append(Op(row, flex_only, setup=lambda: precomputed_mask(q, k)))
            rows.append(row)
            row = Row(N, "F (torch ops)", "fwd", out_error=max_abs_error(F, ref_sel[2]),
                      note="the accumulated mask alone")
            ops.append(Op(row, lambda _: precomputed_mask(q, k)))
            rows.append(row)
        note = "F, then flex: selective attention" if name == "flex + F" else ""
        row = Row(N, name, "fwd", out_error=max_abs_error(forward(fn, q, k, v), want_out),
                  note=note)
        ops.append(Op(row, forward_run(fn)))
        rows.append(row)
        if name == "flex + F" and flex.backward_error is not None:
            rows.append(Row(N, name, "fwd+bwd", note=f"not supported: {flex.backward_error}"))
            continue
        out, grads = forward_backward(fn, q, k, v, dout)
        row = Row(N, name, "fwd+bwd", out_error=max_abs_error(out, want_out),
                  grad_error=max_grad_error(grads, want_grads))
        ops.append(Op(row, backward_run(fn), setup=fresh_leaves))
        rows.append(row)
    return ops, rows


def bench_one_n(torch: Any, args: argparse.Namespace, N: int) -> Tuple[List[Row], List[str]]:
    """Every row of one N, timed; and a line about what was prepared once (the block mask)."""
    q, k, v, dout = make_inputs(torch, args.batch, args.heads, N, args.dim, seed=N)
    flex = None
    if args.flex != "off":
        print(f"N = {N}: {'compiling' if args.flex == 'compiled' else 'running'} flex_attention",
              file=sys.stderr, flush=True)
        flex = prepare_flex(args.flex, q, k, v, dout)
    ops, rows = build_ops(q, k, v, dout, N, flex)
    times = time_ops_interleaved([(op.run, op.setup) for op in ops], warmup=args.warmup,
                                 repeats=args.repeats, min_time=args.min_time)
    for op, t in zip(ops, times):
        op.row.times = t
    lines = []
    if flex is not None:
        lines.append(f"N = {N}: flex_attention's causal block mask (create_block_mask) took "
                     f"{1e3 * flex.block_mask_seconds:.1f} ms, once, not timed (the first N's "
                     "includes torch's first-use start-up)")
    return rows, lines


# ----------------------------------------------------------------------------------------------
# Table


def fmt_ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.2f}"


def fmt_err(error: Optional[float]) -> str:
    return "-" if error is None else f"{error:.1e}"


def table(rows: Sequence[Row], markdown: bool) -> str:
    """The results as a table: medians, ratios to the bridge, errors, notes."""
    base = {(r.n, r.timed): r.median for r in rows if r.method == "bridge"}
    body = []
    for r in rows:
        med, ref = r.median, base.get((r.n, r.timed))
        ratio = "-" if med is None or not ref else f"{med / ref:.2f}"
        best = min(r.times) if r.times else None
        body.append([str(r.n), r.method, r.timed, fmt_ms(med), fmt_ms(best),
                     str(len(r.times)) if r.times else "-", ratio, fmt_err(r.out_error),
                     fmt_err(r.grad_error), r.note])
    headers = ["N", "method", "timed", "median ms", "best ms", "runs", "/ bridge",
               "max err out", "max err grads", "note"]
    return render(headers, body, markdown, right=[True, False, False] + [True] * 6 + [False])


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m selattn_bench.torch_compare",
                                description="The PyTorch bridge against flex_attention, eager "
                                            "autograd and SDPA.")
    p.add_argument("--sizes", default="1024,2048", help="comma-separated N (default 1024,2048)")
    p.add_argument("--batch", type=int, default=1, help="B (default 1)")
    p.add_argument("--heads", type=int, default=8, help="H (default 8)")
    p.add_argument("--dim", type=int, default=64, help="D, head size (default 64)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads of the C kernels and of torch (default: all cores)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds, at least (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each row (default 1)")
    p.add_argument("--min-time", type=float, default=0.0,
                   help="more rounds until the fastest row has this many seconds (default 0)")
    p.add_argument("--flex", choices=FLEX_MODES, default="compiled",
                   help="flex_attention compiled (default), eager (unfused, no compile: for a "
                        "quick look at small N) or off")
    p.add_argument("--warm-cache", action="store_true",
                   help="compile with the user's Inductor cache (default: a fresh empty one, "
                        "so the compile time is a first run's)")
    p.add_argument("--plain", action="store_true",
                   help="an aligned text table instead of Markdown")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 1:
        p.error("--sizes needs at least one N >= 1")
    for name in ("batch", "heads", "dim", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0 or args.min_time < 0:
        p.error("--warmup and --min-time must be >= 0")
    return args


def header_lines(torch: Any, sc: Any, args: argparse.Namespace, cache_note: str) -> List[str]:
    """What was run, on what machine, with which threads (the helpers of ``common``)."""
    import numpy as np
    flex = {"compiled": f"torch.compile(flex_attention, dynamic=False), {cache_note}",
            "eager": "flex_attention eager (unfused: materialises the scores)",
            "off": "not run (--flex off)"}[args.flex]
    return [
        "selective attention in PyTorch (selattn_bench.torch_compare): the bridge against "
        "flex_attention, eager autograd and SDPA",
        f"shape: B={args.batch}, H={args.heads}, D={args.dim}, N in {args.sizes}; float32 "
        "inputs, standard normal; selector head 0, BOS protected, scale 1/sqrt(D)",
        f"cpu: {cpu_model()}; {os.cpu_count()} logical cores; flags: {cpu_flags()}; "
        f"load average (1 min) at start: {load_average()}",
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}",
        f"threads: C {sc.get_num_threads()} (kernels {sc.kernel_name()}), torch "
        f"{torch.get_num_threads()}, BLAS {blas_thread_report()}",
        f"flex: {flex}",
        f"timing: {args.warmup} warm-up run(s) of each row, then >= {args.repeats} interleaved "
        "rounds (every row once per round"
        + (f"; until the fastest row has {args.min_time:g} s" if args.min_time > 0 else "")
        + "); medians",
        "errors: max |x - x64| against the bridge's float64 path on the same inputs "
        "(SDPA: with selective=False)",
    ]


def run(args: argparse.Namespace) -> None:
    """The whole benchmark: header, one block of rows per N, the table, notes, footer."""
    started = time.perf_counter()
    torch, torch_note = import_torch(False)
    if torch is None:
        raise SystemExit(f"torch is {torch_note}")
    import selattn_c as sc
    sc.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rows: List[Row] = []
    lines: List[str] = []
    cache_before = os.environ.get(CACHE_VARIABLE)
    with tempfile.TemporaryDirectory(prefix="selattn-inductor-") as tmp:
        if args.warm_cache:
            cache_note = "the user's Inductor cache (compile times may be cache hits)"
        else:
            # Inductor reads the variable whenever it needs its cache (at compile time)
            os.environ[CACHE_VARIABLE] = tmp
            cache_note = ("a fresh empty Inductor cache (cold compile; the first N's time also "
                          "holds Inductor's start-up in this process)")
        try:
            print("\n".join(header_lines(torch, sc, args, cache_note)), flush=True)
            for N in args.sizes:
                n_rows, n_lines = bench_one_n(torch, args, N)
                rows += n_rows
                lines += n_lines
        finally:
            if not args.warm_cache:
                if cache_before is None:
                    os.environ.pop(CACHE_VARIABLE, None)
                else:
                    os.environ[CACHE_VARIABLE] = cache_before
    print()
    print(table(rows, markdown=not args.plain))
    print()
    if lines:
        print("\n".join(lines))
    print(f"total wall time: {time.perf_counter() - started:.0f} s; load average (1 min) at end: "
          f"{load_average()}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
