"""User-CPU time of the C forward and backward, or one call of either for callgrind.

    python tools/kernel_cpu_time.py 1024 64                # medians of 5 calls, 1 thread
    python tools/kernel_cpu_time.py 1024 64 --repeats 9 --heads 8 --threads 1
    valgrind --tool=callgrind --toggle-collect=selattn_forward \
        python tools/kernel_cpu_time.py 512 64 --once fwd   # instructions of one forward
    valgrind --tool=callgrind --toggle-collect=selattn_backward_soft \
        python tools/kernel_cpu_time.py 512 64 --once bwd   # ... of one backward

On a shared machine, wall time measures the neighbours as much as the kernels; the user-CPU time
of the process (getrusage) and callgrind's instruction counts (deterministic) do much less so.
``SELATTN_KERNELS=generic|avx2|avx512`` picks the kernel set as usual (docs/kernel-design.md).
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import List, Optional

import numpy as np


def user_seconds() -> float:
    """User-CPU seconds of this process so far (all its threads)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("N", type=int, help="sequence length")
    parser.add_argument("D", type=int, help="head dimension")
    parser.add_argument("--heads", type=int, default=8, help="heads H (default 8)")
    parser.add_argument("--batch", type=int, default=1, help="batch B (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="kernel threads (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (default 5)")
    parser.add_argument("--once", choices=("fwd", "bwd"),
                        help="run one forward (and, for bwd, one backward) untimed: for callgrind")
    args = parser.parse_args(argv)
    for name in ("N", "D", "heads", "batch", "threads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"{name} must be >= 1")

    import selattn_c

    selattn_c.set_num_threads(args.threads)
    shape = (args.batch, args.heads, args.N, args.D)
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
    if args.once:
        _, ctx = selattn_c.forward(q, k, v)
        if args.once == "bwd":
            selattn_c.backward(dout, ctx)
        return

    selattn_c.forward(q, k, v)                                     # warm-up
    fwd, bwd, wall = [], [], []
    for _ in range(args.repeats):
        t0, w0 = user_seconds(), time.perf_counter()
        _, ctx = selattn_c.forward(q, k, v)
        t1, w1 = user_seconds(), time.perf_counter()
        selattn_c.backward(dout, ctx)
        t2 = user_seconds()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        wall.append(w1 - w0)
    f, b = 1e3 * float(np.median(fwd)), 1e3 * float(np.median(bwd))
    print(f"kernels {selattn_c.kernel_name()}, {args.threads} thread(s), (B, H, N, D) = {shape}: "
          f"forward {f:.1f} user ms (wall {1e3 * float(np.median(wall)):.1f} ms), "
          f"backward {b:.1f} user ms, bwd / fwd {b / f:.2f}  (medians of {args.repeats})")


if __name__ == "__main__":
    main()
