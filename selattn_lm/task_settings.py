"""What every training task shares: its settings as JSON with its name, and back.

``TaskSettings`` is a mixin for the task dataclasses (``selattn_lm.task_assign.AssignTask``,
``selattn_lm.task_text.TextTask``), whose class attribute ``NAME`` names the task.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Dict


class TaskSettings:
    """``settings()`` / ``from_settings(d)`` for a task dataclass with a class attribute NAME."""

    NAME = ""

    def settings(self) -> Dict[str, object]:
        """The task's settings, JSON-able, with its name (``from_settings`` inverts it)."""
        return {"name": self.NAME, **asdict(self)}

    @classmethod
    def from_settings(cls, d: Dict[str, object]):
        """Inverse of ``settings``; unknown keys are an error naming them."""
        d = {k: v for k, v in d.items() if k != "name"}
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown settings of task {cls.NAME!r}: {', '.join(unknown)}")
        return cls(**d)
