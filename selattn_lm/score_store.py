"""Scores kept between runs of ``selattn study`` (``--scores FILE``).

A study scores each model under many budgets; with several slow models it takes longer than a
session, and adding one model to a manifest would otherwise score every other model again. A
``ScoreStore`` is a JSON file of bits per byte keyed by *what was scored*, never by file names:

    key = sha256(checkpoint file) : sha256(tokens and targets of the windows) : method : budgets

so a retrained checkpoint, other windows (another count, split or corpus) or another method
never reuse a score, while the same checkpoint under another name does. The file is read with
limits (``bounded_json``), rewritten atomically after every new score (``output_files``), and a
malformed one is refused with its name rather than ignored.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .bounded_json import read_json_file
from .output_files import write_text_atomically

FORMAT = "selattn-study-scores"
VERSION = 1
MAX_BYTES = 64 << 20


def file_digest(path) -> str:
    """sha256 of a file's bytes (hex), read in blocks."""
    h = hashlib.sha256()
    with open(Path(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def windows_digest(tokens: np.ndarray, targets: np.ndarray) -> str:
    """sha256 (hex) of the windows: their shape and int64 contents, tokens then targets."""
    h = hashlib.sha256()
    for a in (tokens, targets):
        a = np.ascontiguousarray(a, dtype=np.int64)
        h.update(repr(a.shape).encode("ascii"))
        h.update(a.tobytes())
    return h.hexdigest()


class ScoreStore:
    """Bits per byte by key (see the module docstring); ``path`` None keeps them in memory only.

    Raises ValueError naming the file when it exists but is not a score file of this version.
    """

    def __init__(self, path: Optional[Path] = None) -> None:
        self.path = None if path is None else Path(path)
        self.scores: Dict[str, float] = {}
        self.loaded: set = set()         # keys read from the file
        self.used: set = set()           # of those, the ones this run asked for
        self.computed = 0                # scores put (each key once: the memo answers again)
        if self.path is not None and self.path.exists():
            data = read_json_file(self.path, "study scores file", MAX_BYTES)
            if not isinstance(data, dict) or data.get("format") != FORMAT \
                    or data.get("version") != VERSION or not isinstance(data.get("scores"), dict):
                raise ValueError(f"study scores file {str(self.path)!r} is not a {FORMAT} "
                                 f"file of version {VERSION}")
            for key, value in data["scores"].items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or not math.isfinite(value):
                    raise ValueError(f"study scores file {str(self.path)!r}: the score of "
                                     f"{key[:80]!r} is not a finite number")
                self.scores[key] = float(value)
            self.loaded = set(self.scores)

    @property
    def reused(self) -> int:
        """How many scores this run took from the file."""
        return len(self.used)

    @staticmethod
    def key(model_digest: str, windows: str, method: str,
            budgets: Optional[Sequence[int]]) -> str:
        b = "full" if budgets is None else ",".join(str(int(x)) for x in budgets)
        return f"{model_digest}:{windows}:{method}:{b}"

    def get(self, key: str) -> Optional[float]:
        if key in self.loaded:
            self.used.add(key)
        return self.scores.get(key)

    def put(self, key: str, value: float) -> None:
        """Keep a score, and rewrite the file (atomically) when there is one."""
        self.scores[key] = float(value)
        self.computed += 1
        if self.path is not None:
            import json
            text = json.dumps({"format": FORMAT, "version": VERSION, "scores": self.scores},
                              indent=0, sort_keys=True) + "\n"
            write_text_atomically(self.path, text)


def model_key(path: Path, cache: Dict[str, str]) -> str:
    """The digest of a checkpoint, computed once per resolved path (``cache``)."""
    resolved = str(Path(path).resolve())
    if resolved not in cache:
        cache[resolved] = file_digest(resolved)
    return cache[resolved]


__all__: Tuple[str, ...] = ("ScoreStore", "file_digest", "windows_digest", "model_key")
