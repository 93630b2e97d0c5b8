"""The variable-assignment task as a training task (``selattn_lm.training`` runs every task).

A training task is a small frozen object that supplies what the one training loop needs:
batches (``batch``), an evaluation (``evaluate``) and its metric (``METRIC``, ``HIGHER_IS_BETTER``),
the model settings it suggests (``DEFAULTS``), its vocabulary and its settings as JSON
(``settings`` / ``from_settings``, recorded in every checkpoint). This module is the
variable-assignment task of ``selattn_lm.tasks`` (``c=17;a=4;c=52;c=`` -> ``52;``): cross-entropy
on the answer characters only, scored by exact match on a held-out set.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from . import model as lm
from .task_settings import TaskSettings
from .tasks import CharTokenizer, Example, TaskConfig, encode_batch, generate_examples, \
    make_split, prompts


@dataclass(frozen=True)
class AssignTask(TaskSettings):
    """The variable-assignment task: ``n_vars``, ``n_assignments``, ``max_value``,
    ``min_assignments``, ``fixed_width`` (``selattn_lm.tasks.TaskConfig``);
    ``train_min_assignments``, if set, gives each *training batch* a uniform number of
    assignments in ``[train_min_assignments, n_assignments]`` (one number per batch; short
    sequences show the structure sooner), while the held-out set always follows the task itself;
    ``heldout_size`` examples drawn with ``heldout_seed`` are the held-out set (never trained on).
    """

    n_vars: int = 3
    n_assignments: int = 20
    max_value: int = 99
    min_assignments: Optional[int] = None
    fixed_width: bool = False
    train_min_assignments: Optional[int] = None
    heldout_size: int = 1000
    heldout_seed: int = 12345

    NAME = "assign"
    METRIC = "heldout_accuracy"
    HIGHER_IS_BETTER = True
    # Model and optimisation settings of a run on this task unless given (TrainConfig).
    DEFAULTS = {"n_layers": 2, "d_model": 64, "steps": 3000, "batch_size": 64}

    def __post_init__(self) -> None:
        task = self.config()                          # validates the task fields
        for name in ("heldout_size", "heldout_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.heldout_size < 1 or self.heldout_seed < 0:
            raise ValueError(f"heldout_size must be >= 1 and heldout_seed >= 0, got "
                             f"{self.heldout_size} and {self.heldout_seed}")
        lo = self.train_min_assignments
        if lo is not None and (isinstance(lo, bool) or not isinstance(lo, (int, np.integer))
                               or not 1 <= lo <= task.n_assignments):
            raise ValueError(f"train_min_assignments must be in [1, n_assignments="
                             f"{task.n_assignments}], got {lo!r}")

    # -- settings ---------------------------------------------------------------------------

    def config(self) -> TaskConfig:
        """The task as ``selattn_lm.tasks.TaskConfig`` (what the examples follow)."""
        return TaskConfig(n_vars=self.n_vars, n_assignments=self.n_assignments,
                          max_value=self.max_value, min_assignments=self.min_assignments,
                          fixed_width=self.fixed_width)

    def same_data(self, other: object) -> bool:
        """Whether a model trained on ``other`` was trained on this task's data (for
        ``init_from``): the same examples, whatever the held-out set or training lengths."""
        return isinstance(other, AssignTask) and other.config() == self.config()

    def describe(self) -> str:
        """One line for messages."""
        return f"assign ({self.config()})"

    # -- model ------------------------------------------------------------------------------

    @cached_property
    def tokenizer(self) -> CharTokenizer:
        return CharTokenizer.for_task(self.config())

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def default_context(self) -> int:
        """The task's longest input, in tokens."""
        return self.config().max_tokens

    def check_context(self, context: int) -> None:
        """ValueError when a model of ``context`` positions cannot read the task's inputs."""
        if context < self.default_context():
            raise ValueError(f"context ({context}) is shorter than the task's longest input "
                             f"({self.default_context()} tokens)")

    # -- data -------------------------------------------------------------------------------

    @cached_property
    def heldout(self) -> List[Example]:
        """The held-out set (``heldout_size`` examples from ``heldout_seed``)."""
        return make_split(self.config(), self.heldout_size, self.heldout_seed)

    @cached_property
    def _heldout_prompts(self) -> Set[str]:
        return prompts(self.heldout)

    def train_task(self, rng: Optional[np.random.Generator] = None) -> TaskConfig:
        """The task of one training batch: the task itself, or with ``train_min_assignments``
        set, the task with a number of assignments drawn from ``rng`` (the largest without
        one)."""
        task = self.config()
        if self.train_min_assignments is None or rng is None:
            return task
        n = int(rng.integers(self.train_min_assignments, self.n_assignments + 1))
        return replace(task, n_assignments=n, min_assignments=None)

    def batch(self, rng: np.random.Generator, batch_size: int, context: int
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A training batch drawn from ``rng`` (never a held-out prompt).

        Returns tokens (B, N), targets (B, N) and the mask (B, N) of the answer positions.
        """
        examples = generate_examples(rng, self.train_task(rng), batch_size,
                                     exclude=self._heldout_prompts)
        return encode_batch(self.tokenizer, examples, context)

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self, params: Dict[str, np.ndarray], cfg: "lm.ModelConfig", *, attention=None,
                 budgets=None, n: Optional[int] = None) -> float:
        """Exact-match accuracy on the held-out set (its first ``n`` examples when given)."""
        examples = self.heldout
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"n (examples to score) must be an int >= 1, got {n!r}")
            examples = examples[:n]
        return answer_accuracy(params, cfg, self.tokenizer, examples, attention=attention,
                               budgets=budgets)

    def evaluation_size(self, context: int, n: Optional[int] = None) -> int:
        """How many examples ``evaluate`` scores (``n`` or the whole held-out set)."""
        return self.heldout_size if n is None else min(int(n), self.heldout_size)

    @staticmethod
    def format_metric(value: float) -> str:
        return f"{100 * value:.1f}%"


def answer_accuracy(params: Dict[str, np.ndarray], cfg: "lm.ModelConfig",
                    tokenizer: CharTokenizer, examples: Sequence[Example], *, attention=None,
                    batch_size: int = 256, budgets=None) -> float:
    """Exact-match answer accuracy: the fraction of examples whose every answer character is the
    argmax of the model at its position (teacher-forced, i.e. what greedy decoding produces).

    Parameters
    ----------
    params, cfg : the model
    tokenizer : CharTokenizer of the task
    examples : sequence of (prompt, answer)
    attention : attention backend (default NumPy)
    batch_size : examples per forward pass
    budgets : optional per-layer KV budgets (pruned attention)

    Returns
    -------
    accuracy : float in [0, 1]
    """
    if not examples:
        raise ValueError("examples must not be empty")
    correct = 0
    for i in range(0, len(examples), batch_size):
        tokens, targets, mask = encode_batch(tokenizer, examples[i:i + batch_size], cfg.context)
        logits, _, _ = lm.forward(params, cfg, tokens, attention=attention, budgets=budgets)
        hit = (logits.argmax(axis=-1) == targets) | ~mask                  # (B, T)
        correct += int(hit.all(axis=1).sum())
    return correct / len(examples)
