"""Benchmark: one training step (forward + backward) of the tiny LM on each attention backend.

Run it as a script (it is not a test)::

    python -m selattn_bench.model                      # vocab 20, context 128, 2 x (4 heads,
                                                         # d_model 64), batch 32, float32
    OPENBLAS_NUM_THREADS=1 python -m selattn_bench.model --threads 1 --markdown

One row per backend: ``selattn_lm.backends.NumpyAttention`` (the reference, which keeps the
(B, H, N, N) logits) and ``selattn_lm.backends.CAttention`` (the C kernels). Each timed run is
``model.forward`` with targets (cross-entropy and, when selective, the memory loss) followed by
``model.backward``, on the same batch; the rows are timed in interleaved rounds
(``common.time_ops_interleaved``), so a slow spell of a shared machine hits both alike.

Threads: ``--threads`` sets the C kernels' threads; NumPy's BLAS takes its own from
``OPENBLAS_NUM_THREADS`` when NumPy loads, so set that variable on the command line. On a machine
whose cores are busy with other work, one thread for both is much faster than two (two threads
wait for each other at every call).
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import numpy as np

from selattn_c import get_num_threads, set_num_threads
from selattn_lm import model as M
from selattn_lm.backends import CAttention, NumpyAttention

from .common import blas_thread_report, load_average, render, time_ops_interleaved


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m selattn_bench.model",
                                description="Time a forward + backward step of the tiny LM.")
    p.add_argument("--vocab", type=int, default=20)
    p.add_argument("--context", type=int, default=128, help="tokens per sequence")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--baseline", action="store_true", help="selective=False")
    p.add_argument("--threads", type=int, default=None, help="C kernel threads (default: all)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--markdown", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        set_num_threads(args.threads)
    cfg = M.ModelConfig(vocab_size=args.vocab, context=args.context, n_layers=args.layers,
                        n_heads=args.heads, d_model=args.d_model, selective=not args.baseline)
    params = M.init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (args.batch, cfg.context))      # (B, N)
    targets = rng.integers(1, cfg.vocab_size, (args.batch, cfg.context))     # (B, N)
    backends = [("numpy (reference)", NumpyAttention()), ("C (selattn_c)", CAttention())]

    def step(attention):
        _, _, cache = M.forward(params, cfg, tokens, targets, attention=attention)
        M.backward(cache)

    times = time_ops_interleaved([(lambda _, a=a: step(a), None) for _, a in backends],
                                 warmup=1, repeats=args.repeats, min_time=0.0)
    print(f"config: {cfg}")
    print(f"batch {args.batch}, float32, parameters {M.num_params(params)}; C threads "
          f"{get_num_threads()}, BLAS threads {blas_thread_report()}, load average "
          f"{load_average()}, cores {os.cpu_count()}")
    rows = [[name, f"{np.median(t) * 1e3:.0f}", f"{min(t) * 1e3:.0f}",
             f"{np.median(times[0]) / np.median(t):.2f}"]
            for (name, _), t in zip(backends, times)]
    print(render(["backend", "median ms / step", "best ms", "speed-up"], rows, args.markdown,
                 right=[False, True, True, True]))


if __name__ == "__main__":
    main()
