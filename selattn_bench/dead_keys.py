"""Dead keys: the C forward and backward skipping dead key tiles against the exact kernel (and
PyTorch's SDPA causal, standard attention), on a synthetic trained-like sequence.

    python -m selattn_bench.dead_keys [--n 2048,4096] [--threads 1,2] [--repeats 5] [--markdown]
    python -m selattn_bench.dead_keys --text-model selattn_lm/data/text-selective.npz


For each N and thread count: the fraction of the causal key tiles skipped whole, and of the keys
the forward and the backward skip (the dead keys of partly dead tiles too: both pack the live
ones), F's statistics far from the diagonal (the issue's trained-model figure: 99 % of F at distance > 64 above 20), the
medians of interleaved runs of forward and backward, exact and skipping, and the largest
difference of the skipping results from the exact ones (relative to the largest entry). The
inputs are ``selattn_bench.trained_like`` (selector head killing keys after an exponential
lifetime); the CPU model and the load average are printed, since other processes on a small
machine move every row.

``--text-model`` instead runs a trained text model on random windows of the bundled text and
prints, per layer, what the skipping finds on its real activations (no timing): the share of the
causal key tiles skipped whole, the share of the keys before each query block's first row that the
bound finds dead, and the share of the causal keys the forward and the backward skip (packing the
live keys of partly dead tiles), next to F's statistics.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any, List, Optional, Sequence

from .common import cpu_model, import_torch, load_average, render, time_ops_interleaved


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m selattn_bench.dead_keys", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="2048,4096", help="sequence lengths, comma-separated")
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--mean-lifetime", type=float, default=32.0,
                   help="mean lifetime of a key before the selector kills it (tokens)")
    p.add_argument("--immortal", type=float, default=0.0,
                   help="fraction of keys that never die")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each op (medians)")
    p.add_argument("--no-torch", action="store_true", help="skip the SDPA rows")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--text-model", default=None,
                   help="a text checkpoint: report the skipping on its layers (no timing)")
    p.add_argument("--windows", type=int, default=8, help="text windows for --text-model")
    args = p.parse_args(argv)
    try:
        args.n = [int(x) for x in args.n.split(",")]
        args.threads = [int(x) for x in args.threads.split(",")]
    except ValueError as e:
        p.error(f"--n and --threads take comma-separated integers ({e})")
    if min(args.n) < 1 or min(args.threads) < 1 or args.repeats < 1 or args.head_dim < 3:
        p.error("--n, --threads and --repeats must be >= 1, --head-dim >= 3")
    return args


def f_statistics(np: Any, sc: Any, q: Any, k: Any) -> str:
    """Share of F above 20 and median F at distance > 64 (F materialised: N^2 floats)."""
    N = q.shape[2]
    F = sc.accumulated_mask(q, k)[0]
    far = np.tril(np.ones((N, N), dtype=bool), k=-65)
    values = F[far]
    return f"{100 * np.mean(values > 20):.1f} % > 20, median {np.median(values):.0f}"


def skipped_fraction(np: Any, sc: Any, q: Any, k: Any) -> float:
    """Skipped (query block, key tile) pairs over all pairs of the causal triangle."""
    dead_from = sc.dead_tiles(q, k)[0]
    nqb = dead_from.shape[0]
    return float(np.sum(nqb - dead_from)) / (nqb * (nqb + 1) / 2)


def skipped_keys_fraction(np: Any, key_dead_from: Any) -> float:
    """Skipped (query block, key) pairs over the pairs the dense kernel works on (every key of the
    tiles 0 .. qb for block qb), from ``selattn_c.dead_keys`` (B, N): the share of the heads' QK,
    exp, PV (and dS, dP, dq, dk, dv) work the forward and the backward skip."""
    B, N = key_dead_from.shape
    nqb = -(-N // 64)
    skipped = total = 0
    for qb in range(nqb):
        seen = min(N, (qb + 1) * 64)
        skipped += int(np.sum(key_dead_from[:, :seen] <= qb))
        total += B * seen
    return skipped / max(total, 1)


def max_rel_diff(np: Any, exact: Sequence[Any], skip: Sequence[Any]) -> float:
    return max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
               for a, b in zip(exact, skip))


def dead_keys_share(np: Any, key_dead_from: Any) -> float:
    """Share of the (query block, key before its first row) pairs whose key the bound kills
    (``selattn_c.dead_keys``: the kernels' per-key test, csrc/dead_keys.h)."""
    B, N = key_dead_from.shape
    dead = total = 0
    for qb in range(1, -(-N // 64)):
        dead += int(np.sum(key_dead_from[:, :qb * 64] <= qb))
        total += B * qb * 64
    return dead / max(total, 1)


def text_model_report(args: argparse.Namespace) -> None:
    import numpy as np

    import selattn_c as sc
    from selattn_lm import model as lm
    from selattn_lm.backends import CAttention
    from selattn_lm.task_registry import load_task_checkpoint
    from selattn_lm.text import random_windows

    params, cfg, task, _ = load_task_checkpoint(args.text_model, expect="text")
    tokens, targets = random_windows(task.text().train, args.windows, cfg.context,
                                     np.random.default_rng(0))
    _, _, cache = lm.forward(params, cfg, tokens, targets, attention=CAttention())
    rows = []
    for layer, ctx in enumerate(cache.attention_contexts):
        options = dict(selector_head=ctx.selector_head, protect_bos=ctx.protect_bos,
                       scale=ctx.scale)
        dead_from = sc.dead_tiles(ctx.q, ctx.k, **options)
        key_dead_from = sc.dead_keys(ctx.q, ctx.k, **options)
        B, nqb = dead_from.shape
        tiles = float(np.sum(nqb - dead_from)) / (B * nqb * (nqb + 1) / 2)
        rows.append([str(layer), f"{100 * tiles:.1f} %",
                     f"{100 * dead_keys_share(np, key_dead_from):.1f} %",
                     f"{100 * skipped_keys_fraction(np, key_dead_from):.1f} %",
                     f_statistics(np, sc, ctx.q[:1], ctx.k[:1])])
    print(f"{args.text_model}: context {cfg.context}, {cfg.n_layers} layers, {cfg.n_heads} "
          f"heads, {args.windows} random windows of the training text; t = "
          f"{sc.DEFAULT_DEAD_KEY_THRESHOLD:g}")
    print(render(["layer", "tiles skipped", "keys before i0 dead", "keys skipped",
                  "F at distance > 64 (window 0)"], rows, args.markdown, [True] * 4 + [False]))


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.text_model is not None:
        text_model_report(args)
        return
    import numpy as np

    import selattn_c as sc
    from .trained_like import trained_like

    torch, torch_note = import_torch(args.no_torch)
    print(f"CPU: {cpu_model()}; kernels: {sc.kernel_name()}; torch: {torch_note}")
    print(f"load average (1 min) before: {load_average()}; os.cpu_count() = {os.cpu_count()}")
    H, D = args.heads, args.head_dim
    rows: List[List[str]] = []
    for N in args.n:
        rng = np.random.default_rng(N)
        q, k, v = trained_like(rng, 1, H, N, D, mean_lifetime=args.mean_lifetime,
                               immortal=args.immortal)
        dout = rng.standard_normal(q.shape).astype(np.float32)
        stats = f_statistics(np, sc, q, k)
        skipped = skipped_fraction(np, sc, q, k)
        keys_skipped = skipped_keys_fraction(np, sc.dead_keys(q, k))
        for threads in args.threads:
            sc.set_num_threads(threads)
            if torch is not None:
                torch.set_num_threads(threads)
            out0, ctx0 = sc.forward(q, k, v, dead_key_threshold=None)
            out1, ctx1 = sc.forward(q, k, v)
            err = max_rel_diff(np, (out0,) + sc.backward(dout, ctx0),
                               (out1,) + sc.backward(dout, ctx1))
            ops = [
                (lambda _: sc.forward(q, k, v, dead_key_threshold=None), None),
                (lambda _: sc.forward(q, k, v), None),
                (lambda _: sc.backward(dout, ctx0), None),
                (lambda _: sc.backward(dout, ctx1), None),
            ]
            if torch is not None:
                qt, kt, vt, dt = (torch.from_numpy(x) for x in (q, k, v, dout))

                def sdpa_step(_: Any) -> None:
                    leaves = [x.detach().requires_grad_(True) for x in (qt, kt, vt)]
                    out = torch.nn.functional.scaled_dot_product_attention(*leaves,
                                                                           is_causal=True)
                    out.backward(dt)
                ops.append((sdpa_step, None))
            times = time_ops_interleaved(ops, warmup=1, repeats=args.repeats, min_time=0.0)
            med = [1e3 * statistics.median(t) for t in times]
            fb_exact, fb_skip = med[0] + med[2], med[1] + med[3]
            sdpa = f"{med[4]:.0f}" if torch is not None else "-"
            vs_sdpa = f"{med[4] / fb_skip:.2f}x" if torch is not None else "-"
            rows.append([str(N), str(threads), f"{100 * skipped:.1f} %",
                         f"{100 * keys_skipped:.1f} %", stats,
                         f"{med[0]:.0f}", f"{med[1]:.0f}", f"{med[2]:.0f}", f"{med[3]:.0f}",
                         f"{fb_exact / fb_skip:.2f}x", sdpa, vs_sdpa, f"{err:.1e}"])
            print(f"N={N} threads={threads} done; load average {load_average()}", flush=True)
    headers = ["N", "threads", "tiles skipped", "keys skipped", "F at distance > 64",
               "fwd exact ms",
               "fwd skip ms", "bwd exact ms", "bwd skip ms", "fwd+bwd speed-up",
               "SDPA fwd+bwd ms", "SDPA / skip", "max rel diff"]
    print(f"B = 1, H = {H}, D = {D}, mean lifetime {args.mean_lifetime}, immortal "
          f"{args.immortal}; medians of {args.repeats} interleaved runs; default t = "
          f"{sc.DEFAULT_DEAD_KEY_THRESHOLD:g}")
    print(render(headers, rows, args.markdown, [True] * 4 + [False] + [True] * 8))
    print(f"load average (1 min) after: {load_average()}")


if __name__ == "__main__":
    main()
