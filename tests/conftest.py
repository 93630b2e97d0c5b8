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

import os

from hypothesis import HealthCheck, settings

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
