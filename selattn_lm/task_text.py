"""Byte-level language modelling of a text corpus as a training task, scored in bits per byte.

The corpus is one of ``selattn_lm.corpora`` (``wiki``: the Wikipedia sample; more corpora are
modules there). Each training step takes ``batch_size`` windows of ``context`` bytes at uniform
random offsets of the train split; the evaluation is the mean next-byte cross-entropy, in bits,
over the first ``eval_windows`` non-overlapping windows of the validation split. A window is
``[BOS, b_0, ..., b_{N-2}]`` with targets ``[b_0, ..., b_{N-1}]`` (``selattn_lm.text``).

The split is encoded once per corpus (one byte per position, shifted to token ids a window at a
time), so a step costs O(batch x context), not O(corpus).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import numpy as np

from . import corpora
from . import model as lm
from .task_settings import TaskSettings
from .text import BOS, BYTE_OFFSET, ByteTokenizer, TextCorpus

LN2 = math.log(2.0)
_SPLIT_BYTES: Dict[Tuple[str, Optional[str], str], np.ndarray] = {}


def split_bytes(corpus: str, path: Optional[str], split: str) -> np.ndarray:
    """(len,) uint8 view of one split of a corpus, cached per process."""
    key = (corpus, path, split)
    if key not in _SPLIT_BYTES:
        data = corpora.load(corpus, path).split(split)
        _SPLIT_BYTES[key] = np.frombuffer(data, dtype=np.uint8)
    return _SPLIT_BYTES[key]


def windows_at(data: np.ndarray, starts: np.ndarray, context: int
               ) -> Tuple[np.ndarray, np.ndarray]:
    """Windows of ``context`` bytes of ``data`` (uint8) starting at ``starts`` (B,).

    Returns tokens (B, N) = [BOS, b_0 .. b_{N-2}] and targets (B, N) = [b_0 .. b_{N-1}], int64.
    """
    offsets = starts[:, None] + np.arange(context)                         # (B, N)
    targets = data[offsets].astype(np.int64) + BYTE_OFFSET                  # (B, N)
    tokens = np.empty_like(targets)                                        # (B, N)
    tokens[:, 0] = BOS
    tokens[:, 1:] = targets[:, :-1]
    return tokens, targets


def bits_per_byte(params: Dict[str, np.ndarray], cfg: "lm.ModelConfig", tokens: np.ndarray,
                  targets: np.ndarray, *, attention=None, budgets=None,
                  batch_size: int = 32) -> float:
    """Mean cross-entropy of the next byte, in bits, over every position of the windows.

    Parameters
    ----------
    params, cfg : the model
    tokens, targets : (W, N) windows (``selattn_lm.text.eval_windows``)
    attention : attention backend (``CAttention``, ``NumpyAttention``, or one of the eviction
        baselines of ``selattn_reference.eviction_baselines``); default NumPy
    budgets : per-layer KV budgets for backends that take them (pruned cache), or None
    batch_size : windows per forward pass

    Returns
    -------
    bpb : float
    """
    tokens, targets = np.asarray(tokens), np.asarray(targets)
    if tokens.ndim != 2 or tokens.shape != targets.shape or len(tokens) == 0:
        raise ValueError(f"tokens and targets must be (W, N) arrays of one shape with W >= 1, "
                         f"got {tokens.shape} and {targets.shape}")
    total = 0.0
    for i in range(0, len(tokens), batch_size):
        tok, tgt = tokens[i:i + batch_size], targets[i:i + batch_size]
        _, losses, _ = lm.forward(params, replace(cfg, eps=0.0), tok, tgt, attention=attention,
                                  budgets=budgets)
        total += losses["ce"] * len(tok)            # every window has N scored positions
    return total / len(tokens) / LN2


@dataclass(frozen=True)
class TextTask(TaskSettings):
    """Next-byte prediction on ``corpus`` (a name of ``selattn_lm.corpora``), its source read
    from ``corpus_path`` when given; evaluated on the first ``eval_windows`` validation windows.
    """

    corpus: str = "wiki"
    corpus_path: Optional[str] = None
    eval_windows: int = 64

    NAME = "text"
    METRIC = "valid_bpb"
    HIGHER_IS_BETTER = False
    DEFAULTS = {"n_layers": 4, "d_model": 128, "context": 256, "steps": 2000, "batch_size": 16}
    vocab_size = ByteTokenizer.vocab_size

    def __post_init__(self) -> None:
        corpora.get(self.corpus)                      # a known corpus, or a ValueError
        if self.corpus_path is not None and not isinstance(self.corpus_path, str):
            raise TypeError(f"corpus_path must be a str or None, got "
                            f"{type(self.corpus_path).__name__}")
        w = self.eval_windows
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1:
            raise ValueError(f"eval_windows must be an int >= 1, got {w!r}")

    # -- settings ---------------------------------------------------------------------------

    def same_data(self, other: object) -> bool:
        """Whether a model trained on ``other`` saw this task's text (the same corpus)."""
        return isinstance(other, TextTask) and other.corpus == self.corpus

    def describe(self) -> str:
        return f"text (corpus {self.corpus})"

    def text(self) -> TextCorpus:
        """The split corpus."""
        return corpora.load(self.corpus, self.corpus_path)

    # -- model ------------------------------------------------------------------------------

    def default_context(self) -> int:
        return self.DEFAULTS["context"]

    @staticmethod
    def check_context(context: int) -> None:
        if context < 2:
            raise ValueError(f"context must be >= 2 bytes, got {context}")

    # -- data -------------------------------------------------------------------------------

    def batch(self, rng: np.random.Generator, batch_size: int, context: int
              ) -> Tuple[np.ndarray, np.ndarray, None]:
        """``batch_size`` windows of ``context`` bytes at uniform random offsets of the train
        split. Returns tokens (B, N), targets (B, N) and None (every position is scored)."""
        data = split_bytes(self.corpus, self.corpus_path, "train")
        if len(data) < context:
            raise ValueError(f"the train split has {len(data)} bytes, fewer than one window "
                             f"of {context}")
        starts = rng.integers(0, len(data) - context + 1, size=batch_size)      # (B,)
        tokens, targets = windows_at(data, starts, context)
        return tokens, targets, None

    def windows(self, split: str, context: int, max_windows: Optional[int] = None, *,
                spread: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """Non-overlapping windows of ``context`` bytes of a split, cut from its start.

        ``max_windows``: keep only that many (None: all). ``spread=False`` keeps the first ones
        (training's validation, results-text.md); ``spread=True`` keeps windows evenly spaced
        over the whole split (window ``round(i * (count - 1) / (max_windows - 1))`` for i = 0
        .. max_windows - 1, distinct and in order), so that a sample of a split made of many
        files covers all of them rather than the first few. Deterministic.

        Returns tokens (W, N) and targets (W, N), int64.
        """
        data = split_bytes(self.corpus, self.corpus_path, split)
        count = len(data) // context
        if count == 0:
            raise ValueError(f"the {split} split has {len(data)} bytes, fewer than one window "
                             f"of {context}")
        index = np.arange(count)                                            # (count,)
        if max_windows is not None and max_windows < count:
            keep = int(max_windows)
            if spread and keep > 1:       # strictly increasing: the step (count-1)/(keep-1) > 1
                index = np.round(np.arange(keep) * ((count - 1) / (keep - 1))).astype(np.int64)
            else:
                index = index[:keep]
        return windows_at(data, index * context, context)

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self, params: Dict[str, np.ndarray], cfg: "lm.ModelConfig", *, attention=None,
                 budgets=None, n: Optional[int] = None) -> float:
        """Bits per byte on the first ``eval_windows`` (or ``n``) validation windows."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer))
                              or n < 1):
            raise ValueError(f"n (windows to score) must be an int >= 1, got {n!r}")
        tokens, targets = self.windows("valid", cfg.context,
                                       self.eval_windows if n is None else n)
        return bits_per_byte(params, cfg, tokens, targets, attention=attention, budgets=budgets)

    def evaluation_size(self, context: int, n: Optional[int] = None) -> int:
        """How many validation windows ``evaluate`` scores."""
        return len(self.windows("valid", context, self.eval_windows if n is None else n)[0])

    @staticmethod
    def format_metric(value: float) -> str:
        return f"{value:.4f} bpb"
