"""The training tasks by name, and the task a checkpoint was trained on.

``TASKS`` maps a task's name to its class (``selattn_lm.task_assign.AssignTask``,
``selattn_lm.task_text.TextTask``); a new corpus is a module of ``selattn_lm.corpora`` and needs
nothing here. Checkpoints record their task as ``extra["task"] = task.settings()``;
``load_task_checkpoint`` reads it back (also from checkpoints written before tasks had names) and
refuses, in one line, a checkpoint of another task than the caller expects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np

from . import model as lm
from .checkpoint import CheckpointError, load_checkpoint
from .task_assign import AssignTask
from .task_text import TextTask

TASKS = {cls.NAME: cls for cls in (AssignTask, TextTask)}
Task = Union[AssignTask, TextTask]


def task_from_settings(d: object) -> Task:
    """The task of ``settings()`` output (``{"name": ..., ...}``). Raises ValueError."""
    if not isinstance(d, dict):
        raise ValueError(f"task settings must be a JSON object, got {type(d).__name__}")
    name = d.get("name")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are: {', '.join(TASKS)}")
    return TASKS[name].from_settings(d)


def task_of_extra(extra: Dict[str, object]) -> Task:
    """The task recorded in a checkpoint's ``extra``. Checkpoints written before tasks had names
    (the bundled ones) hold the variable-assignment task's fields with ``heldout_size`` and
    ``heldout_seed`` beside them, or ``"text"`` with the text settings in ``train_config``."""
    task = extra.get("task")
    if isinstance(task, dict) and "name" in task:
        return task_from_settings(task)
    if isinstance(task, dict):                                   # the assign task, unnamed
        return AssignTask.from_settings(dict(task, heldout_size=int(extra["heldout_size"]),
                                             heldout_seed=int(extra["heldout_seed"])))
    if task == TextTask.NAME:                                    # the text task, unnamed
        train = extra.get("train_config") or {}
        return TextTask(corpus_path=train.get("corpus"),
                        eval_windows=int(train.get("eval_windows", 64)))
    raise ValueError("no task settings (was it written by selattn train?)")


def load_task_checkpoint(path, expect: Optional[str] = None
                         ) -> Tuple[Dict[str, np.ndarray], "lm.ModelConfig", Task, Dict]:
    """Load a checkpoint of ``selattn train``: (params, model config, task, extra).

    Parameters
    ----------
    path : str or Path
    expect : a task name (``"assign"``, ``"text"``) the caller needs, or None for any

    Raises
    ------
    CheckpointError (a ValueError) naming the file: unreadable, no or bad task settings, or a
    task other than ``expect``.
    """
    path = Path(path)
    params, model_cfg, extra = load_checkpoint(path)
    try:
        task = task_of_extra(extra)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad task settings: {e}") from None
    if expect is not None and task.NAME != expect:
        raise CheckpointError(f"{path} is a model of the {task.NAME!r} task; this needs a model "
                              f"of the {expect!r} task")
    if model_cfg.vocab_size != task.vocab_size:
        raise CheckpointError(f"{path}: the model's vocabulary ({model_cfg.vocab_size}) is not "
                              f"its task's ({task.vocab_size})")
    return params, model_cfg, task, extra
