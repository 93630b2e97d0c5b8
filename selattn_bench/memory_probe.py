"""The child process of ``python -m selattn_bench.kernels --memory``: one forward (or forward and
backward) at a large N, and the process's resident memory around it, printed as one JSON line.

It is its own small module so that the process holds only what a user's forward needs: the
interpreter, NumPy and selattn_c (``python -m selattn_bench.kernels`` would add the benchmark's own
imports). The inputs are filled with a deterministic pattern instead of ``numpy.random``, whose
extension modules would add about 5 MiB of libraries that have nothing to do with the forward; the
kernels' memory does not depend on the values (no budget here, so nothing is evicted).

    python -m selattn_bench.memory_probe fwd|fwdbwd N H D B THREADS
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np

import selattn_c as sc


def _status_bytes(field: str) -> int:
    """A "kB" field of /proc/self/status in bytes (``VmRSS``, ``VmHWM``), or the process' peak
    where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss_peak()


def rss_now() -> int:
    """Current resident set size in bytes (the peak where /proc is missing)."""
    return _status_bytes("VmRSS")


def reset_peak() -> bool:
    """Reset the kernel's record of this process' peak resident memory (Linux: writing 5 to
    /proc/self/clear_refs resets VmHWM), so that ``peak_since_reset`` then reads the peak of what
    follows; False where that is not possible (the peak then includes everything before)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_since_reset() -> int:
    """Peak resident memory in bytes since ``reset_peak`` (VmHWM), else since the start."""
    return _status_bytes("VmHWM")


def rss_peak() -> int:
    """Peak resident set size of the process in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024   # Linux reports KiB


def filled(shape: tuple, phase: float, chunk: int = 1 << 18) -> np.ndarray:
    """A float32 array of ``shape`` holding sin(0.7 i + phase) over its flat index i, written a
    chunk at a time so that no temporary of the array's size exists."""
    x = np.empty(shape, np.float32)
    flat = x.reshape(-1)                                     # a view: (B * H * N * D,)
    for start in range(0, flat.size, chunk):
        idx = np.arange(start, min(start + chunk, flat.size), dtype=np.float32)
        np.sin(idx * 0.7 + phase, out=flat[start:start + idx.size])
    return x


def probe(case: str, N: int, H: int, D: int, B: int, threads: int) -> dict:
    """Run the case and return the RSS figures (bytes) and timings."""
    sc.set_num_threads(threads)
    info = {"rss_after_imports": rss_now()}
    names = ["q", "k", "v"] + (["dout"] if case == "fwdbwd" else [])
    arrays = {n: filled((B, H, N, D), 0.3 * i) for i, n in enumerate(names)}
    info["rss_before_call"] = rss_now()
    info["peak_before_call"] = rss_peak()
    t0 = time.perf_counter()
    out, ctx = sc.forward(arrays["q"], arrays["k"], arrays["v"])
    info["fwd_seconds"] = time.perf_counter() - t0
    held = [*arrays.values(), out]
    if case == "fwdbwd":
        t0 = time.perf_counter()
        held += list(sc.backward(arrays["dout"], ctx))
        info["bwd_seconds"] = time.perf_counter() - t0
    info["rss_after_call"] = rss_now()
    info["peak"] = rss_peak()
    info["tensor_bytes"] = int(sum(a.nbytes for a in held))
    info["tensors"] = len(held)
    return info


def main(argv: list) -> None:
    if len(argv) != 6 or argv[0] not in ("fwd", "fwdbwd"):
        raise SystemExit(__doc__.strip().splitlines()[-1].strip())
    case, N, H, D, B, threads = argv[0], *(int(a) for a in argv[1:])
    print(json.dumps(probe(case, N, H, D, B, threads)))


if __name__ == "__main__":
    main(sys.argv[1:])
