"""Calling a candidate implementation without letting it crash the kit.

Every call of the candidate goes through ``Caller.call``: it runs on a worker thread (a daemon
thread) that the kit waits for at most ``timeout`` seconds. An exception (any ``BaseException``,
``SystemExit`` included) becomes a ``CandidateError`` with one line saying what happened; so does
a result of the wrong type or shape, or one with NaN or infinity.

A call that does not return in time cannot be stopped: Python has no way to kill a thread. The
thread is left running in the background (a daemon thread, so it never keeps the process alive
at exit; it keeps using a core until the call returns, if it ever does) and the ``Caller``
refuses every later call, so at most one runaway thread exists per check. ``python -m
selattn_reference check`` goes further and runs the whole check in a child process, which it
kills when the check overruns (``conformance_cli``).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional, Tuple

import numpy as np


class CandidateError(Exception):
    """The candidate failed a call: it raised, hung, or returned something unusable."""


class Caller:
    """Calls a candidate with a time limit; after one timeout, refuses to call it again.

    The calls run one after another on one worker thread (a daemon thread), not a new thread per
    call: thread-local state of the candidate (an OpenMP thread pool, torch settings) is then
    made once. ``close()`` ends the worker; a worker stuck in a call that timed out is
    abandoned instead (it ends with the process).

    Parameters
    ----------
    timeout : float, seconds one call may take
    """

    def __init__(self, timeout: float):
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.timed_out: Optional[str] = None   # what hung, once something has
        self._jobs: "queue.Queue" = queue.Queue()
        self._worker: Optional[threading.Thread] = None

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, kwargs, box, done = job
            try:
                box["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: B902 - the candidate's failure is the finding
                box["error"] = exc
            done.set()

    def call(self, what: str, fn: Callable, *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)`` on the worker, or ``CandidateError`` naming ``what`` failed."""
        if self.timed_out is not None:
            raise CandidateError(f"not run: {self.timed_out} did not return within "
                                 f"{self.timeout:g} s earlier")
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="conformance candidate",
                                            daemon=True)
            self._worker.start()
        box: dict = {}
        done = threading.Event()
        self._jobs.put((fn, args, kwargs, box, done))
        if not done.wait(self.timeout):
            self.timed_out = what
            raise CandidateError(f"{what} did not return within {self.timeout:g} s (timeout; "
                                 "the call is left running in a background thread)")
        if "error" in box:
            exc = box["error"]
            message = str(exc).strip().splitlines()
            first = f": {message[0]}" if message else ""
            raise CandidateError(f"{what} raised {type(exc).__name__}{first}")
        return box.get("value")

    def close(self) -> None:
        """End the worker thread (unless it is stuck in a call that timed out)."""
        if self._worker is not None and self.timed_out is None:
            self._jobs.put(None)
            self._worker.join()
        self._worker = None


def as_output(value: Any, what: str, shape: Tuple[int, ...]) -> np.ndarray:
    """A candidate's output as a float64 array of ``shape``, or ``CandidateError``.

    Accepts NumPy arrays and anything with ``__array__`` of a floating dtype (the torch adapter
    has already converted tensors); refuses tuples (the hint: return only ``out``), wrong shapes,
    non-floating dtypes, NaN and infinity.
    """
    if isinstance(value, tuple):
        raise CandidateError(f"{what} returned a tuple of {len(value)}, expected one array "
                             f"of shape {shape} (wrap it: lambda q, k, v: fn(q, k, v)[0])")
    if value is None:
        raise CandidateError(f"{what} returned None, expected an array of shape {shape}")
    if not isinstance(value, np.ndarray):
        if not hasattr(value, "__array__"):
            raise CandidateError(f"{what} returned {type(value).__name__}, expected an array "
                                 f"of shape {shape}")
        try:
            value = np.asarray(value)
        except Exception as exc:  # noqa: BLE001 - any conversion failure is the finding
            raise CandidateError(f"{what} returned {type(value).__name__}, which does not "
                                 f"convert to an array ({type(exc).__name__})") from None
    if value.dtype.kind != "f":
        raise CandidateError(f"{what} returned dtype {value.dtype}, expected a floating array")
    if value.shape != tuple(shape):
        raise CandidateError(f"{what} returned shape {value.shape}, expected {tuple(shape)}")
    bad = ~np.isfinite(value)
    if bad.any():
        kind = "NaN" if np.isnan(value).any() else "infinity"
        raise CandidateError(f"{what} returned {kind} in {int(bad.sum())} of {value.size} "
                             "entries (the inputs were finite)")
    return value.astype(np.float64)
