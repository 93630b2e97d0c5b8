"""Benchmark: a training step (forward + backward) of the tiny LM under each thread setting.

Run it as a script (it is not a test)::

    python -m selattn_bench.thread_settings                   # both shapes, 5 rounds
    python -m selattn_bench.thread_settings --shape text --rounds 3 --markdown

Why it exists. A training step alternates NumPy's matrix products (the BLAS library's own worker
threads) with the C kernels (OpenMP threads). Each pool keeps its threads busy-waiting for a
while after its work ends (OpenBLAS: about 2^28 cycles, a tenth of a second, unless
``OPENBLAS_THREAD_TIMEOUT`` was set before NumPy loaded), so on a machine with as many cores as
threads the two pools take the cores from each other. This benchmark measures every setting that
matters side by side, so the project's default (``selattn_lm.threads.set_threads`` with no count,
what ``selattn train`` does without ``--threads``) can be checked against the best one.

Each setting runs in a fresh process (environment variables such as ``OMP_WAIT_POLICY`` take
effect only when the libraries load), with the threading variables of the caller's environment
removed first, so "default" means nothing set by the user (GNU OpenMP's threads then spin for a
while after each parallel region and sleep after; ``OMP_WAIT_POLICY=active`` spins longest,
``passive`` sleeps at once). Rounds interleave the settings: a
slow spell of a shared machine hits all alike. Every child times ``--steps`` steps after one
warm-up step; the table gives the median over all rounds and steps.

Shapes: ``model`` is ``selattn_bench.model``'s default (vocab 20, context 128, 2 layers of 4
heads, d_model 64, batch 32); ``text`` is the text task's default model (vocab 258, context 256,
4 layers of 4 heads, d_model 128, batch 16). Both selective, memory loss on (eps 0.1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .common import cpu_model, load_average, render

# Variables a user might set to steer the thread pools: removed from every child's environment.
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND",
                    "OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT", "MKL_NUM_THREADS",
                    "BLIS_NUM_THREADS", "SELATTN_NUM_THREADS")

SHAPES: Dict[str, Dict[str, int]] = {
    "model": dict(vocab_size=20, context=128, n_layers=2, n_heads=4, d_model=64, batch=32),
    "text": dict(vocab_size=258, context=256, n_layers=4, n_heads=4, d_model=128, batch=16),
    "tiny": dict(vocab_size=20, context=16, n_layers=1, n_heads=2, d_model=16, batch=2),
}
TIMED_SHAPES = ("model", "text")          # "both"; "tiny" is for the benchmark's own test


@dataclass(frozen=True)
class Setting:
    """One way to run a step: the backend, the kernels' and BLAS's threads (None: left as the
    libraries start), extra environment variables, or the project's default policy."""

    name: str
    backend: str                                   # "c" or "numpy"
    kernels: Optional[int] = None
    blas: Optional[int] = None
    env: Dict[str, str] = field(default_factory=dict)
    project_default: bool = False                  # selattn_lm.threads.set_threads(None, ...)


def settings(cores: int) -> List[Setting]:
    """The settings compared, for a machine with ``cores`` cores."""
    out = [Setting("numpy reference, nothing set", "numpy"),
           Setting("C, nothing set", "c"),
           Setting("C, selattn default (set_threads)", "c", project_default=True)]
    counts = sorted({1, cores})
    out += [Setting(f"C, kernels {k}, BLAS {b}", "c", kernels=k, blas=b)
            for k in counts for b in counts]
    out += [Setting("C, OMP_WAIT_POLICY=active", "c", env={"OMP_WAIT_POLICY": "active"}),
            Setting("C, OMP_WAIT_POLICY=passive", "c", env={"OMP_WAIT_POLICY": "passive"}),
            Setting("C, OPENBLAS_THREAD_TIMEOUT=4", "c", env={"OPENBLAS_THREAD_TIMEOUT": "4"})]
    return out


# ----------------------------------------------------------------------------------------------
# The child: one setting, one shape, a few steps


def child(setting: Setting, shape: str, steps: int) -> Dict[str, object]:
    """Time ``steps`` training steps (after one warm-up) in this process. JSON-able result."""
    import time

    import numpy as np
    from threadpoolctl import threadpool_limits

    import selattn_c
    from selattn_lm import model as M
    from selattn_lm.backends import CAttention, NumpyAttention
    from selattn_lm.threads import set_threads, thread_report

    if setting.project_default:
        set_threads(None, setting.backend)
    if setting.kernels is not None:
        selattn_c.set_num_threads(setting.kernels)
    if setting.blas is not None:
        threadpool_limits(limits=setting.blas, user_api="blas")
    s = dict(SHAPES[shape])
    batch = s.pop("batch")
    cfg = M.ModelConfig(**s, selective=True)
    params = M.init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (batch, cfg.context))      # (B, N)
    targets = rng.integers(1, cfg.vocab_size, (batch, cfg.context))     # (B, N)
    attention = CAttention() if setting.backend == "c" else NumpyAttention()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        _, _, cache = M.forward(params, cfg, tokens, targets, attention=attention)
        M.backward(cache)
        if i:                                          # step 0 warms up
            times.append(time.perf_counter() - t0)
    return {"times": times, "threads": thread_report(setting.backend)}


# ----------------------------------------------------------------------------------------------
# The parent: rounds of fresh processes


def child_env(setting: Setting) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(setting.env)
    return env


def run_child(index: int, shape: str, steps: int, setting: Setting) -> Dict[str, object]:
    cmd = [sys.executable, "-m", "selattn_bench.thread_settings", "--child", str(index),
           "--shape", shape, "--steps", str(steps)]
    # cwd: the folder holding the selattn_bench this process imported, so that the child's
    # `python -m` imports the same copy (a source checkout in the caller's cwd would shadow it)
    done = subprocess.run(cmd, env=child_env(setting), capture_output=True, text=True,
                          check=False, cwd=PACKAGE_PARENT)
    if done.returncode != 0:
        raise RuntimeError(f"setting {setting.name!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe(report: Dict[str, object]) -> str:
    blas = ", ".join(f"{b['library']} {b['threads']}" for b in report["blas"]) or "none"
    kernels = report["kernels"]
    return f"kernels {kernels if kernels is not None else '-'}; BLAS {blas}"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m selattn_bench.thread_settings",
                                description="Time a training step under each thread setting, "
                                            "each in a fresh process.")
    p.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    p.add_argument("--rounds", type=int, default=5, help="rounds over the settings [5]")
    p.add_argument("--steps", type=int, default=3, help="timed steps per child [3]")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("rounds", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    table = settings(cores or 1)
    if args.child is not None:
        print(json.dumps(child(table[args.child], args.shape, args.steps)))
        return
    from selattn_lm.progress import progress_bar
    shapes = list(TIMED_SHAPES) if args.shape == "both" else [args.shape]
    print(f"CPU: {cpu_model()}; cores {cores}; load average {load_average()} (start)")
    for shape in shapes:
        times: List[List[float]] = [[] for _ in table]
        reports: List[Optional[Dict[str, object]]] = [None] * len(table)
        bar = progress_bar(total=args.rounds * len(table), desc=f"shape {shape}", unit="run")
        for _ in range(args.rounds):
            for i, setting in enumerate(table):
                out = run_child(i, shape, args.steps, setting)
                times[i] += out["times"]
                reports[i] = out["threads"]
                bar.update(1)
        bar.close()
        med = [statistics.median(t) for t in times]
        best = min(med[1:])                       # the best C setting
        ref = med[0]
        rows = [[s.name, describe(r), f"{m * 1e3:.0f}", f"{m / best:.2f}", f"{ref / m:.2f}"]
                for s, r, m in zip(table, reports, med)]
        print(f"\nshape {shape}: {SHAPES[shape]}; {args.rounds} rounds x {args.steps} steps; "
              f"load average {load_average()} (end)")
        print(render(["setting", "in force", "median ms / step", "vs best C", "speed-up vs numpy"],
                     rows, args.markdown, right=[False, False, True, True, True]))


if __name__ == "__main__":
    main()
