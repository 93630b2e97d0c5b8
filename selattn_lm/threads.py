"""How many threads a command uses: the C kernels' OpenMP threads and NumPy's BLAS threads alike.

``selattn ... --threads N`` calls ``set_threads(N)``: the kernels run on N threads
(``selattn_c.set_num_threads``) and so does the BLAS library under NumPy's matrix products
(``threadpoolctl``), so that one option bounds the whole process. Without ``--threads`` both use
every core this process may run on (``available_cores``). ``thread_report`` says what is in force,
for the JSON log of a run.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np  # noqa: F401  (loads the BLAS library, so that threadpoolctl can see it)
from threadpoolctl import threadpool_info, threadpool_limits


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(threads: Optional[int], backend: str) -> int:
    """Run the kernels (when ``backend`` is not ``"numpy"``) and BLAS on ``threads`` threads
    (None: ``available_cores()``). Returns the number set. ValueError for a count < 1."""
    if threads is None:
        threads = available_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be an int >= 1, got {threads!r}")
    threadpool_limits(limits=threads, user_api="blas")
    if backend != "numpy":
        import selattn_c
        if selattn_c.extension_built():
            selattn_c.set_num_threads(threads)
    return threads


def thread_report(backend_name: str) -> Dict[str, object]:
    """What is in force (JSON-able): the kernels' threads (None off the C backend) and each BLAS
    library's threads, name and CPU kernel."""
    kernels = None
    if backend_name == "c":
        import selattn_c
        kernels = selattn_c.get_num_threads()
    blas: List[Dict[str, object]] = [
        {"library": info.get("internal_api"), "threads": info.get("num_threads"),
         "version": info.get("version"), "kernel": info.get("architecture")}
        for info in threadpool_info() if info.get("user_api") == "blas"]
    return {"kernels": kernels, "blas": blas}
