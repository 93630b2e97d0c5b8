"""Benchmark: a training step of the tiny LM with the memory loss on, at long contexts, by the two
routes the C backend has had for the memory loss.

Run it as a script (it is not a test)::

    python -m selattn_bench.memory_loss                     # N = 1024, 2048, 4096, 1 thread
    python -m selattn_bench.memory_loss --sizes 4096 --repeats 5 --markdown

Routes, each a whole ``model.forward`` (cross-entropy + memory loss) and ``model.backward``:

* ``rows`` (today's ``selattn_lm.backends.CAttention``): the kernels give each layer's kept row
  sums of F (``selattn_c.memory_loss``), the gradient is one row of F per sequence
  (``memory_loss_backward``), and ``selattn_c.backward(..., dF_rows=)`` carries it into the
  selector head inside its tiles. No N x N buffer anywhere.
* ``dense F`` (the route before, kept here as ``DenseFAttention`` so it can be measured):
  the kernels materialise F (B, N, N) per layer (``selattn_c.accumulated_mask``), the model's
  ``memory_forward`` computes the loss and a dense dF in NumPy, and the gradient goes through F
  into the selector head in NumPy (``L_sel``, ``dS``: more N x N arrays).

Each (route, N) runs in a fresh process (``--child``) so that its peak resident memory is its own;
the table shows the median step time, the peak memory above what the process held before the
first step (parameters, tokens, interpreter), and the ratios. Before timing, the two routes'
losses and gradients are compared at the smallest N.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from selattn_c import backward, get_num_threads, set_num_threads
from selattn_lm import model as M
from selattn_lm.backends import CAttention
from selattn_reference.attention import accumulated_mask_backward

from .common import render
from .memory_probe import peak_since_reset, reset_peak, rss_now, rss_peak

MIB = 1 << 20
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


def mask_gradient(dF: np.ndarray, q_sel: np.ndarray, k_sel: np.ndarray, scale: float,
                  protect_bos: bool) -> Tuple[np.ndarray, np.ndarray]:
    """The dense route's gradient of a loss on F with respect to the selector head's q and k:

        F[i, j] = sum_{m < i} S[m, j]    ->  dS[m, j] = sum_{i > m} dF[i, j]
        S = relu(L_sel) where allowed     ->  dS = 0 where S was constrained or L_sel <= 0
        L_sel = scale * q_sel @ k_sel^T   ->  dq_sel = scale * dS @ k_sel,
                                              dk_sel = scale * dS^T q_sel

    dF (B, N, N), q_sel, k_sel (B, N, D) -> dq_sel, dk_sel (B, N, D)
    """
    L_sel = scale * (q_sel @ k_sel.swapaxes(-1, -2))                       # (B, N, N)
    dS = accumulated_mask_backward(dF, L_sel, protect_bos).astype(q_sel.dtype, copy=False)
    return scale * (dS @ k_sel), scale * (dS.swapaxes(-1, -2) @ q_sel)     # (B, N, D) each


class DenseFAttention:
    """The C backend as it was before the kernels took dF as rows: forward and backward in C,
    but no ``memory_loss`` method, so the model asks for F (B, N, N) and computes the memory
    loss and its dense gradient in NumPy; ``backward`` adds that gradient's path through F."""

    def __init__(self) -> None:
        self._c = CAttention()

    def forward(self, q, k, v, **options):
        return self._c.forward(q, k, v, **options)     # need_F: F from accumulated_mask

    def backward(self, dout, dF, ctx):
        dq, dk, dv = backward(dout, ctx)                # (B, H, N, hd) each
        if dF is not None and ctx.selective:
            s = ctx.selector_head
            dq_sel, dk_sel = mask_gradient(np.asarray(dF, dtype=np.float32), ctx.q[:, s],
                                           ctx.k[:, s], ctx.scale, ctx.protect_bos)
            dq[:, s] += dq_sel
            dk[:, s] += dk_sel
        return dq, dk, dv


ROUTES = {"rows": CAttention, "dense F": DenseFAttention}


def setup(args: argparse.Namespace, N: int):
    """The model (memory loss on) and one batch of random byte tokens at context N."""
    cfg = M.ModelConfig(vocab_size=args.vocab, context=N, n_layers=args.layers,
                        n_heads=args.heads, d_model=args.d_model, selective=True, eps=0.1)
    params = M.init_params(cfg, seed=0)
    rng = np.random.default_rng(N)
    tokens = rng.integers(1, cfg.vocab_size, (args.batch, N))                # (B, N)
    targets = rng.integers(1, cfg.vocab_size, (args.batch, N))               # (B, N)
    return cfg, params, tokens, targets


def step(params, cfg, tokens, targets, attention):
    """One training step's forward and backward: (losses, grads)."""
    _, losses, cache = M.forward(params, cfg, tokens, targets, attention=attention)
    return losses, M.backward(cache)


def child(args: argparse.Namespace) -> None:
    """One (route, N) in this fresh process: time ``repeats`` steps after one warm-up, report
    the peak resident memory above the level before the first step, as a JSON line."""
    set_num_threads(args.threads)
    N = args.child_n
    cfg, params, tokens, targets = setup(args, N)
    attention = ROUTES[args.child]()
    before = rss_now()
    exact = reset_peak()
    if not exact:
        before = max(before, rss_peak())
    times = []
    for r in range(args.repeats + 1):
        t0 = time.perf_counter()
        losses, grads = step(params, cfg, tokens, targets, attention)
        if r > 0:                                                 # the first one warms up
            times.append(time.perf_counter() - t0)
        del grads
    print(json.dumps({"route": args.child, "N": N, "seconds": times, "mem": losses["mem"],
                      "peak_above_start": peak_since_reset() - before, "start": before,
                      "peak_reset": exact}))


def run_child(args: argparse.Namespace, route: str, N: int) -> Dict[str, object]:
    cmd = [sys.executable, "-m", "selattn_bench.memory_loss", "--child", route,
           "--child-n", str(N), "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--vocab", str(args.vocab), "--layers", str(args.layers), "--heads", str(args.heads),
           "--d-model", str(args.d_model), "--batch", str(args.batch)]
    # cwd: the folder holding the selattn_c this process imported, so that the child's `python
    # -m` (which puts its cwd first on sys.path) runs the same package, not a checkout's copy
    # without the compiled extension
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PACKAGE_PARENT)
    if proc.returncode != 0:
        raise RuntimeError(f"child ({route}, N={N}) failed with code {proc.returncode}:\n"
                           f"{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def verify(args: argparse.Namespace, N: int) -> Tuple[float, float]:
    """Both routes on one batch: |mem difference| / mem and the largest relative gradient
    difference over the parameter tensors (float32 rounding only, if both are right)."""
    cfg, params, tokens, targets = setup(args, N)
    (l_rows, g_rows), (l_dense, g_dense) = (step(params, cfg, tokens, targets, R())
                                            for R in ROUTES.values())
    mem_err = abs(l_rows["mem"] - l_dense["mem"]) / abs(l_dense["mem"])
    grad_err = max(float(np.abs(g_rows[n] - g_dense[n]).max() / (np.abs(g_dense[n]).max()
                                                                 + 1e-30)) for n in g_dense)
    return mem_err, grad_err


def render_table(results, markdown: bool) -> str:
    header = ["N", "route", "median s / step", "best s", "peak MiB above start",
              "time ratio (dense / rows)", "memory ratio (dense / rows)"]
    rows = []
    for N in sorted({r["N"] for r in results}):
        by = {r["route"]: r for r in results if r["N"] == N}
        t = {k: float(np.median(v["seconds"])) for k, v in by.items()}
        m = {k: v["peak_above_start"] / MIB for k, v in by.items()}
        for route in ROUTES:
            ratio_t = f"{t['dense F'] / t['rows']:.2f}" if route == "rows" else ""
            ratio_m = (f"{m['dense F'] / m['rows']:.1f}" if route == "rows" and m["rows"] > 0
                       else "")
            rows.append([str(N), route, f"{t[route]:.3f}", f"{min(by[route]['seconds']):.3f}",
                         f"{m[route]:.1f}", ratio_t, ratio_m])
    return render(header, rows, markdown, right=[True, False, True, True, True, True, True])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m selattn_bench.memory_loss",
                                description="Time and peak memory of a training step with the "
                                            "memory loss: kernels' rows vs dense F.")
    p.add_argument("--sizes", default="1024,2048,4096", help="contexts N, comma-separated")
    p.add_argument("--vocab", type=int, default=258, help="vocabulary (258: bytes + BOS, PAD)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="C kernel threads [1]")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per (route, N) [3]")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--child", choices=list(ROUTES), help=argparse.SUPPRESS)
    p.add_argument("--child-n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("vocab", "layers", "heads", "d_model", "batch", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if any(n < 2 for n in args.sizes):
        p.error("--sizes must be >= 2")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child(args)
        return
    set_num_threads(args.threads)
    mem_err, grad_err = verify(args, min(args.sizes))
    print(f"training step, memory loss on (eps 0.1, tau 1): {args.layers} layers x {args.heads} "
          f"heads, d_model {args.d_model}, vocab {args.vocab}, batch {args.batch}, float32, "
          f"C threads {get_num_threads()}, {args.repeats} timed steps after 1 warm-up, each "
          "(route, N) in a fresh process")
    print(f"check at N = {min(args.sizes)}: memory loss differs by {mem_err:.1e} (relative), "
          f"gradients by at most {grad_err:.1e} (relative to each tensor's largest entry)")
    results = []
    for i, N in enumerate(args.sizes):
        order = list(ROUTES) if i % 2 == 0 else list(ROUTES)[::-1]   # alternate who runs first
        for route in order:
            results.append(run_child(args, route, N))
            print(f"  done: N = {N}, {route}", file=sys.stderr)
    print(render_table(results, args.markdown))
    B = args.batch
    for N in args.sizes:
        print(f"N = {N}: one (B, N, N) float32 array is {B * N * N * 4 / MIB:.1f} MiB")
    if not all(r["peak_reset"] for r in results):
        print("note: the peak could not be reset (no /proc/self/clear_refs): the memory column "
              "is the process' peak since its start, minus the memory before the first step")


if __name__ == "__main__":
    main()
