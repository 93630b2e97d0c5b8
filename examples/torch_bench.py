"""Forward + backward time of the PyTorch bridge against PyTorch's own attention.

    python examples/torch_bench.py                          # N = 1024, 2048; B=1, H=8, D=64
    python examples/torch_bench.py --sizes 256 --repeats 3  # quick look

Three ways to compute attention of the same float32 CPU tensors with autograd, each timed as
one forward and one backward (``out = f(q, k, v); out.backward(dout)``), q, k, v requiring grad:

``bridge``   ``selattn_c.torch.selective_attention`` (selective attention on the C kernels)
``SDPA``     ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``: standard
             causal attention (no selection), PyTorch's fused CPU kernel
``eager``    the paper's listing (selective attention) written eagerly in torch, differentiated
             by autograd (``selattn_bench.kernels.torch_selective_attention``)

The three are timed in interleaved rounds (one run of each per round, so a slow spell of a shared
machine hits them alike) with ``selattn_bench.common.time_ops_interleaved``; medians and ratios are
printed. Threads: ``--threads`` for both the kernels and torch (default: all cores).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

import selattn_c
from selattn_bench.common import load_average, time_ops_interleaved
from selattn_bench.kernels import torch_selective_attention
from selattn_c.torch import selective_attention


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1024,2048", help="comma-separated N (default 1024,2048)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds at least (default 7)")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="keep timing until the fastest op has this many seconds (default 1)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    selattn_c.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ops = {
        "bridge": selective_attention,
        "SDPA": lambda q, k, v: sdpa(q, k, v, is_causal=True),
        "eager": torch_selective_attention,
    }
    print(f"forward + backward, B={args.batch}, H={args.heads}, D={args.dim}, float32, "
          f"{args.threads} threads (kernels and torch {torch.__version__}); load average "
          f"(1 min) at start {load_average()}")
    print(f"{'N':>6} {'op':<8} {'median ms':>10} {'min ms':>9} {'runs':>5}")
    for N in sizes:
        g = torch.Generator().manual_seed(N)
        shape = (args.batch, args.heads, N, args.dim)
        q, k, v, dout = (torch.randn(shape, generator=g) for _ in range(4))

        def run(fn):
            def once(_):
                qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
                fn(qq, kk, vv).backward(dout)
            return once

        times = time_ops_interleaved([(run(fn), None) for fn in ops.values()], warmup=1,
                                     repeats=args.repeats, min_time=args.min_time)
        med = {}
        for name, t in zip(ops, times):
            med[name] = statistics.median(t)
            print(f"{N:>6} {name:<8} {1e3 * med[name]:>10.1f} {1e3 * min(t):>9.1f} {len(t):>5}")
        print(f"{N:>6} ratios: bridge / SDPA = {med['bridge'] / med['SDPA']:.2f}, "
              f"eager / bridge = {med['eager'] / med['bridge']:.2f}")
    print(f"load average (1 min) at end {load_average()}")


if __name__ == "__main__":
    main()
