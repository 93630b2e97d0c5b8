"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM.

``StopSignals`` is a context manager: while it is active, either signal only sets ``signum``;
the training loop checks it after each step, writes the run state and raises ``TrainingStopped``,
which the ``selattn`` command turns into one line saying how to resume and the exit status
128 + the signal's number (130 for SIGINT, 143 for SIGTERM), without a traceback. A second signal
while the state is being written is ignored the same way (the save is never cut short). Outside
the main thread (where Python cannot install handlers) it does nothing.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """A run stopped on a signal after saving its state to ``run_path`` at ``step``."""

    def __init__(self, signum: int, step: int, run_path: Optional[Path]) -> None:
        self.signum, self.step, self.run_path = signum, step, run_path
        name = signal.Signals(signum).name
        where = (f"its state is in {run_path}: resume with  selattn train --resume {run_path}"
                 if run_path is not None else "no run state was written (no --checkpoint-every)")
        super().__init__(f"stopped by {name} after step {step}; {where}")

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signum)


class StopSignals:
    """Defer SIGINT and SIGTERM to the training loop (``signum`` is the first one received)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
