"""The benchmarks' reference rate: NumPy's float32 matrix product with OpenBLAS's own kernel.

``OPENBLAS_CORETYPE`` forces OpenBLAS onto one CPU's kernels and ``OPENBLAS_L2_SIZE`` changes its
blocking; an environment that sets them (for reproducible tests, say) can make sgemm much slower
than the machine allows (Haswell kernels on an AVX-512 CPU: about half the rate), and a
"percentage of sgemm" measured against that rate reads more than it is. OpenBLAS reads both only
when it is loaded, so the reference is measured in a fresh process whose environment lacks them;
nothing else changes (the variables stay as they are for the benchmark itself, the tests and CI).
The child reports, through threadpoolctl, the BLAS and the kernel ("architecture") it ran, and the
header prints that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

# The variables that override OpenBLAS's own choice of kernel and blocking.
OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

_CHILD = r"""
import json, os, statistics, sys, time
import numpy as np
n, repeats = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(1)
a = rng.standard_normal((n, n), dtype=np.float32)
b = rng.standard_normal((n, n), dtype=np.float32)
for _ in range(2):
    a @ b
times, spent = [], 0.0
while len(times) < repeats or (spent < 0.5 and len(times) < 20 * repeats):
    t0 = time.perf_counter(); a @ b; dt = time.perf_counter() - t0
    times.append(dt); spent += dt
try:
    from threadpoolctl import threadpool_info
    blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for i in threadpool_info() if i.get("user_api") == "blas"]
except ImportError:
    blas = None
seen = [key for key in sys.argv[3].split(",") if key in os.environ]
print(json.dumps({"gflops": 2.0 * n ** 3 / statistics.median(times) / 1e9, "blas": blas,
                  "seen": seen}))
"""


@dataclass
class SgemmReference:
    """NumPy sgemm measured with OpenBLAS's own kernel choice.

    gflops : float, median GFLOP/s of (n x n) @ (n x n) in float32
    blas : list of dicts (internal_api, version, architecture, num_threads), or None when
        threadpoolctl is missing in the child
    unset : the override variables that were set here and removed for the measurement
    seen : the override variables the measuring process found in its environment (always empty;
        kept as the measurement's own evidence)
    """

    gflops: float
    blas: Optional[List[Dict[str, object]]]
    unset: List[str]
    seen: List[str]

    def describe(self) -> str:
        """One line for a benchmark's header: the kernel, and which variables were unset."""
        if self.blas is None:
            kernel = "BLAS kernel unknown (pip install threadpoolctl)"
        elif not self.blas:
            kernel = "no BLAS found by threadpoolctl"
        else:
            kernel = ", ".join(f"{b['internal_api']} {b['version']} kernel {b['architecture']} "
                               f"on {b['num_threads']} thread(s)" for b in self.blas)
        how = (f"{' and '.join(self.unset)} unset for this measurement only" if self.unset
               else "no kernel override in the environment")
        return f"{kernel} ({how})"


def measure_sgemm(n: int, repeats: int, threads: int, timeout: float = 600.0) -> SgemmReference:
    """Median GFLOP/s of NumPy's float32 (n x n) @ (n x n) in a fresh process with OpenBLAS's own
    kernel choice (``OVERRIDES`` removed from its environment) on ``threads`` BLAS threads.

    Raises
    ------
    ValueError
        if n, repeats or threads is below 1
    RuntimeError
        if the child process fails or prints no result
    """
    for name, value in (("n", n), ("repeats", repeats), ("threads", threads)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    env = {key: value for key, value in os.environ.items() if key not in OVERRIDES}
    for key in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = str(int(threads))
    unset = [key for key in OVERRIDES if key in os.environ]
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(int(n)), str(int(repeats)),
                           ",".join(OVERRIDES)],
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the sgemm reference process failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-500:]}")
    result = json.loads(lines[-1])
    return SgemmReference(gflops=float(result["gflops"]), blas=result["blas"], unset=unset,
                          seen=list(result["seen"]))
