"""Hypothesis profiles for the whole test suite.

Pick one with the environment variable ``HYPOTHESIS_PROFILE`` (default ``dev``):

- ``dev``: a few examples per property, for the edit-test loop (seconds).
- ``ci``: deterministic (``derandomize=True``, no example database), no deadline (shared CI
  machines have noisy timing), and enough examples that the properties are really exercised;
  sized so that the reference tests take well under a minute on 2 cores.
- ``thorough``: many examples, for a long run before a release or after touching a kernel.

Deadlines are off in every profile: the examples are numeric and their run time depends on the
drawn shape (N up to 96), so a wall-clock deadline would only produce flaky failures.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings


def _installed_package_first() -> None:
    """Let ``python -m pytest`` test the installed package, as ``pytest`` does.

    ``python -m pytest`` (unlike ``pytest``) puts the current directory first on ``sys.path``.
    Run from a checkout installed with ``pip install .`` (not ``-e``), the checkout's
    ``selattn_c``, which has no compiled extension, would shadow the installed one and every
    kernel test would fail. So when the checkout holds no built extension and an installed copy
    exists elsewhere on the path, the checkout's directory leaves ``sys.path`` (the tests import
    the installed packages, and their helpers from tests/, which pytest puts on the path). A
    checkout built in place (``pip install -e .``) is left alone: it is the installed package."""
    root = Path(__file__).resolve().parent.parent
    if any((root / "selattn_c").glob("_selattn_cffi*")):
        return

    def is_root(entry: str) -> bool:
        return Path(entry or os.curdir).resolve() == root

    rest = [entry for entry in sys.path if not is_root(entry)]
    if len(rest) < len(sys.path) and importlib.machinery.PathFinder.find_spec("selattn_c", rest):
        sys.path[:] = rest


_installed_package_first()

settings.register_profile("dev", max_examples=10, deadline=None)
settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    # Drawing a large (B, H, N, D) case and running N x N attention on it is legitimately slower
    # than Hypothesis' data-generation heuristic expects.
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
