"""What the benchmarks share: the machine (CPU model and flags, load average, BLAS and torch
threads), interleaved timing (``time_ops_interleaved``), the ``Result`` row and the table
renderer. Imports nothing heavy: a benchmark imports NumPy only after it set the threads."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

from selattn_lm.progress import progress_bar

MAX_RUNS_FACTOR = 20          # at most repeats * this many timed runs for fast operations


def blas_thread_report() -> str:
    try:
        from threadpoolctl import threadpool_info  # optional
    except ImportError:
        return f"{os.environ.get('OPENBLAS_NUM_THREADS', '?')} (OPENBLAS_NUM_THREADS)"
    pools = [f"{i.get('internal_api')}={i.get('num_threads')}" for i in threadpool_info()
             if i.get("user_api") == "blas"]
    return ", ".join(pools) or "? (threadpoolctl found no BLAS)"


def import_torch(no_torch: bool) -> Tuple[Any, str]:
    """(torch module or None, a note for the header)."""
    if no_torch:
        return None, "not used (--no-torch)"
    try:
        import torch
    except ImportError:
        return None, ("not installed: pip install 'selattn[bench]' (on a CPU-only machine, the "
                      "CPU build of torch); torch rows skipped")
    return torch, torch.__version__


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> str:
    """1-minute load average: other processes on a 2-core machine move every row."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "?"


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                    return " ".join(x for x in wanted if x in flags) or "-"
    except OSError:
        pass
    return "?"


@dataclass
class Result:
    """One row of the timing table."""

    n: int
    name: str
    flops: float
    times: Optional[List[float]] = None     # seconds; None when skipped
    note: str = ""

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None

    @property
    def best(self) -> Optional[float]:
        return min(self.times) if self.times else None

    def gflops(self) -> Optional[float]:
        return self.flops / self.median / 1e9 if self.times else None


def time_op(run: Callable[[Any], Any], setup: Optional[Callable[[], Any]], *, warmup: int,
            repeats: int, min_time: float) -> List[float]:
    """Wall times of ``run(setup())``; ``setup`` is not timed. At least ``repeats`` runs, more
    (up to ``repeats * MAX_RUNS_FACTOR``) until ``min_time`` seconds of runs are collected."""
    return time_ops_interleaved([(run, setup)], warmup=warmup, repeats=repeats,
                                min_time=min_time)[0]


def time_ops_interleaved(ops: Sequence[Tuple[Callable[[Any], Any], Optional[Callable[[], Any]]]],
                         *, warmup: int, repeats: int, min_time: float) -> List[List[float]]:
    """Wall times of several ``run(setup())`` pairs, taken in rounds: every round runs each op
    once, in order. A slow spell of a shared machine then hits all ops alike, which keeps the
    ratios of their medians honest. Rounds continue until every op has ``repeats`` runs and the
    fastest-finishing criterion ``min_time`` (seconds of the op with the least total) is met, up
    to ``repeats * MAX_RUNS_FACTOR`` rounds."""
    gc.collect()
    for run, setup in ops:
        for _ in range(warmup):
            arg = setup() if setup else None
            run(arg)
            del arg
    times: List[List[float]] = [[] for _ in ops]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    bar = progress_bar(total=repeats, desc="timing", unit="round")   # between runs, never timed
    try:
        while True:
            rounds = len(times[0])
            if rounds >= repeats and (min(sum(t) for t in times) >= min_time
                                      or rounds >= repeats * MAX_RUNS_FACTOR):
                break
            for (run, setup), op_times in zip(ops, times):
                arg = setup() if setup else None
                t0 = time.perf_counter()
                run(arg)
                op_times.append(time.perf_counter() - t0)
                del arg
            bar.update(1)
    finally:
        bar.close()
        if gc_was_enabled:
            gc.enable()
    return times


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool,
           right: Sequence[bool]) -> str:
    if markdown:
        sep = ["---:" if r else "---" for r in right]
        lines = [headers, sep, *rows]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right))
    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def verdict(value: Optional[float], op: str, bound: float) -> Tuple[str, str]:
    """(shown value, PASS / MISS / n/a)."""
    if value is None:
        return "-", "n/a (not measured)"
    ok = value <= bound if op == "<=" else value >= bound
    return f"{value:.2f}", "PASS" if ok else "MISS"


def strip_option(argv: List[str], name: str) -> List[str]:
    """argv without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out
