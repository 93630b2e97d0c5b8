"""The variable-assignment task (the paper's synthetic experiment) and its character tokenizer.

A sequence is BOS, then assignments over a few single-letter variables with random values and
many reassignments, then a query; the answer is the value assigned *last* to the queried variable,
followed by ';' (so that greedy decoding knows where the answer ends)::

    <BOS>c=17;a=4;c=52;b=0;a=93;c=    ->    52;

Everything is deterministic given a seed. A held-out set is a ``make_split`` of its own seed, and
training examples are drawn with that set excluded, so the two never share a sequence (the answer
is a function of the prompt, so comparing prompts suffices).

Why this task: to answer, a model must remember one value per variable and may forget every older
one. Selective attention can mask stale assignments as soon as a variable is reassigned, which is
exactly what lets a pruned KV cache keep a handful of tokens out of a long context.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np

Example = Tuple[str, str]   # (prompt, answer), e.g. ("a=4;b=7;a=", "4;")

PAD, BOS = 0, 1             # token ids; PAD is 0 because the model counts tokens != 0 as real
ASSIGN, END = "=", ";"


@dataclass(frozen=True)
class TaskConfig:
    """Settings of the variable-assignment task.

    Parameters
    ----------
    n_vars : int in [1, 26], variables are the letters 'a', 'b', ... (the first ``n_vars``)
    n_assignments : int >= 1, assignments per sequence (the most, when ``min_assignments`` is set)
    max_value : int >= 0, values are uniform integers in ``[0, max_value]`` (written in decimal)
    min_assignments : int or None, if set, each sequence has a uniform number of assignments in
        ``[min_assignments, n_assignments]`` (varying lengths); None means exactly ``n_assignments``
    fixed_width : bool, write every value with as many digits as ``max_value`` (zero-padded,
        e.g. ``c=07;``), so every assignment has the same length
    """

    n_vars: int = 3
    n_assignments: int = 20
    max_value: int = 99
    min_assignments: Optional[int] = None
    fixed_width: bool = False

    def __post_init__(self) -> None:
        for name in ("n_vars", "n_assignments", "max_value"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 1 <= self.n_vars <= 26:
            raise ValueError(f"n_vars must be in [1, 26], got {self.n_vars}")
        if self.n_assignments < 1:
            raise ValueError(f"n_assignments must be >= 1, got {self.n_assignments}")
        if self.max_value < 0:
            raise ValueError(f"max_value must be >= 0, got {self.max_value}")
        if self.min_assignments is not None:
            m = self.min_assignments
            if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
                raise TypeError(f"min_assignments must be an int or None, got {type(m).__name__}")
            if not 1 <= m <= self.n_assignments:
                raise ValueError(f"min_assignments must be in [1, n_assignments="
                                 f"{self.n_assignments}], got {m}")
        if not isinstance(self.fixed_width, (bool, np.bool_)):
            raise TypeError(f"fixed_width must be a bool, got {type(self.fixed_width).__name__}")

    @property
    def variables(self) -> str:
        """The variable names, e.g. 'abc'."""
        return string.ascii_lowercase[: self.n_vars]

    def format_value(self, value: int) -> str:
        """A value as written in a sequence: decimal, zero-padded when ``fixed_width``."""
        width = len(str(self.max_value)) if self.fixed_width else 1
        return f"{value:0{width}d}"

    @property
    def max_tokens(self) -> int:
        """Length of the longest model input: BOS + prompt + answer without its last token (the
        model never reads the final ';', it only predicts it). A model's context must be >= this."""
        digits = len(str(self.max_value))
        assignment = 1 + len(ASSIGN) + digits + len(END)          # "c=177;"
        query = 1 + len(ASSIGN)                                   # "c="
        answer = digits + len(END)                                # "177;"
        return 1 + self.n_assignments * assignment + query + answer - 1

    def to_dict(self) -> Dict[str, object]:
        """Plain dict (JSON-able), the inverse of ``from_dict``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "TaskConfig":
        """Rebuild from ``to_dict`` output; unknown keys are an error (not silently ignored)."""
        if not isinstance(d, dict):
            raise TypeError(f"task settings must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown task settings: {', '.join(unknown)}")
        return cls(**d)


class CharTokenizer:
    """Character-level tokenizer: PAD=0, BOS=1, then the digits, the variable letters, '=', ';'.

    Strings never contain BOS or PAD; ``encode_batch`` adds BOS and padding.
    """

    def __init__(self, variables: str) -> None:
        if not isinstance(variables, str) or not variables:
            raise ValueError("variables must be a non-empty string of letters")
        if len(set(variables)) != len(variables) or not variables.isalpha():
            raise ValueError(f"variables must be distinct letters, got {variables!r}")
        self.chars = string.digits + variables + ASSIGN + END
        self.stoi = {c: i + 2 for i, c in enumerate(self.chars)}   # 0, 1 are PAD, BOS
        self.itos = {i: c for c, i in self.stoi.items()}

    @classmethod
    def for_task(cls, task: TaskConfig) -> "CharTokenizer":
        """The tokenizer of a task (depends only on its variable names)."""
        return cls(task.variables)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, PAD and BOS included."""
        return len(self.chars) + 2

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no BOS)."""
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary "
                             f"{self.chars!r}") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; PAD and BOS are dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i in (PAD, BOS):
                continue
            if i not in self.itos:
                raise ValueError(f"token id {i} is not in the vocabulary (size {self.vocab_size})")
            out.append(self.itos[i])
        return "".join(out)


# ----------------------------------------------------------------------------------------------
# Generation


def generate_example(rng: np.random.Generator, task: TaskConfig) -> Example:
    """One (prompt, answer) pair, e.g. ``("c=17;a=4;c=52;c=", "52;")``.

    The variable of each assignment is uniform over the task's variables, the value uniform in
    ``[0, max_value]``; the queried variable is uniform over the variables that were assigned, and
    the answer is its last value followed by ';'.
    """
    if task.min_assignments is None:
        n = task.n_assignments
    else:
        n = int(rng.integers(task.min_assignments, task.n_assignments + 1))
    names = rng.integers(0, task.n_vars, size=n)                   # (n,) variable per assignment
    values = rng.integers(0, task.max_value + 1, size=n)           # (n,)
    last: Dict[str, int] = {}
    parts = []
    for v, x in zip(names, values):
        name = task.variables[v]
        parts.append(f"{name}{ASSIGN}{task.format_value(int(x))}{END}")
        last[name] = int(x)
    assigned = sorted(last)
    query = assigned[int(rng.integers(0, len(assigned)))]
    return "".join(parts) + query + ASSIGN, f"{task.format_value(last[query])}{END}"


def generate_examples(rng: np.random.Generator, task: TaskConfig, n: int,
                      exclude: Set[str] = frozenset()) -> List[Example]:
    """``n`` examples from ``rng``, distinct prompts, none of whose prompts is in ``exclude``.

    Raises ValueError when the task cannot produce that many distinct prompts (a tiny task).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    examples: List[Example] = []
    seen: Set[str] = set()
    attempts, max_attempts = 0, 100 * n + 1000
    while len(examples) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"could not draw {n} distinct prompts outside the excluded set "
                             f"after {max_attempts} attempts: the task is too small")
        prompt, answer = generate_example(rng, task)
        if prompt in seen or prompt in exclude:
            continue
        seen.add(prompt)
        examples.append((prompt, answer))
    return examples


def make_split(task: TaskConfig, n: int, seed: int, exclude: Set[str] = frozenset()
               ) -> List[Example]:
    """A reproducible set of ``n`` examples with distinct prompts, none in ``exclude``.

    Parameters
    ----------
    task : TaskConfig
    n : int, number of examples
    seed : int, the same seed (and task) always gives the same list
    exclude : set of prompt strings that must not occur (e.g. the held-out prompts)

    Returns
    -------
    list of (prompt, answer)
    """
    return generate_examples(np.random.default_rng(seed), task, n, exclude)


def prompts(examples: Sequence[Example]) -> Set[str]:
    """The set of prompts of ``examples`` (to pass as ``exclude``)."""
    return {p for p, _ in examples}


# ----------------------------------------------------------------------------------------------
# Batching


def encode_batch(tokenizer: CharTokenizer, examples: Sequence[Example], context: int
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model inputs for a batch of examples, padded with PAD to the longest one.

    Each sequence is ``BOS + prompt + answer``; the input is every token but the last and the
    target is the next token, so the answer's characters are predicted from the positions of the
    prompt's final '=' onwards.

    Parameters
    ----------
    tokenizer : CharTokenizer
    examples : sequence of (prompt, answer)
    context : int, the model's context; a longer input is an error

    Returns
    -------
    tokens : (B, T) int64, T = longest input length (<= context)
    targets : (B, T) int64, the next token (PAD after the end)
    target_mask : (B, T) bool, True exactly at the positions whose target is an answer character
    """
    if not examples:
        raise ValueError("examples must not be empty")
    seqs, answer_starts = [], []
    for prompt, answer in examples:
        if not answer:
            raise ValueError(f"empty answer for prompt {prompt!r}")
        p = [BOS] + tokenizer.encode(prompt)
        seqs.append(p + tokenizer.encode(answer))
        answer_starts.append(len(p) - 1)          # input position that predicts the answer's 1st
    T = max(len(s) for s in seqs) - 1
    if T > context:
        raise ValueError(f"an example needs {T} input tokens but the context is {context}")
    B = len(seqs)
    tokens = np.full((B, T), PAD, dtype=np.int64)                  # (B, T)
    targets = np.full((B, T), PAD, dtype=np.int64)                 # (B, T)
    target_mask = np.zeros((B, T), dtype=bool)                     # (B, T)
    for b, (s, start) in enumerate(zip(seqs, answer_starts)):
        n = len(s) - 1
        tokens[b, :n] = s[:-1]
        targets[b, :n] = s[1:]
        target_mask[b, start:n] = True
    return tokens, targets, target_mask
