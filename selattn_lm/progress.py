"""Progress of long commands on stderr, through tqdm.

``TrainingProgress`` is the training loop's bar. Its figures keep one meaning throughout:
``loss`` is the mean training loss of the steps since the last evaluation (reset at each
evaluation), the metric (``heldout_accuracy`` or ``valid_bpb``) is the latest evaluation's, and
tqdm's own rate and remaining time count the steps of this session. On a terminal the bar is
redrawn in place; elsewhere (a log file) the bar is off and each evaluation prints one line, so
logs stay short. ``progress_bar`` is the plain bar of the other long commands (calibration,
the text results, benchmarks).
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, Optional, TextIO

from tqdm.auto import tqdm


def _is_tty(stream: TextIO) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None,
                 desc: str = "", quiet: bool = False, stream: Optional[TextIO] = None,
                 unit: str = "it") -> tqdm:
    """A tqdm bar on stderr (off when ``quiet``, or when the stream is not a terminal)."""
    stream = sys.stderr if stream is None else stream
    return tqdm(iterable, total=total, desc=desc, file=stream, unit=unit, leave=False,
                dynamic_ncols=True, disable=quiet or not _is_tty(stream))


class TrainingProgress:
    """The bar of one training session: ``start`` to ``total`` steps.

    Parameters
    ----------
    total : the run's steps
    start : steps already done (a resumed run)
    metric : name of the evaluation's figure
    format_metric : value -> short text (e.g. ``"2.134 bpb"``)
    quiet : no output at all
    stream : default stderr
    """

    def __init__(self, total: int, start: int, metric: str,
                 format_metric: Callable[[float], str], *, quiet: bool = False,
                 stream: Optional[TextIO] = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.quiet = quiet
        self.metric, self.format_metric = metric, format_metric
        self.total = total
        self.bar = tqdm(total=total, initial=start, file=self.stream, unit="step",
                        dynamic_ncols=True, disable=quiet or not _is_tty(self.stream),
                        desc="train")
        self.latest = "--"

    def step(self, mean_loss: float) -> None:
        """One step done; ``mean_loss`` is the mean loss since the last evaluation."""
        self.bar.set_postfix_str(f"loss {mean_loss:.4f} {self.metric} {self.latest}",
                                 refresh=False)
        self.bar.update(1)

    def evaluation(self, step: int, mean_loss: float, value: float, seconds: float) -> None:
        """An evaluation after ``step`` steps: shown on the bar, and as a line off a terminal."""
        self.latest = self.format_metric(value)
        self.bar.set_postfix_str(f"loss {mean_loss:.4f} {self.metric} {self.latest}")
        if not self.quiet and self.bar.disable:
            width = len(str(self.total))
            self.stream.write(f"step {step:>{width}}/{self.total} loss {mean_loss:.4f} "
                              f"{self.metric} {self.latest} {seconds:.0f}s\n")
            self.stream.flush()

    def write(self, line: str) -> None:
        """A line that does not break the bar."""
        if not self.quiet:
            self.bar.write(line, file=self.stream)

    def close(self) -> None:
        self.bar.close()
