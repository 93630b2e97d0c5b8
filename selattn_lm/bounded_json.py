"""JSON from files that may be hostile: bounded size, bounded nesting, bounded numbers.

``json.loads`` alone is not enough for a file someone else wrote: ``--budgets /dev/zero`` reads
without end, ``[[[[...]]]]`` nested a hundred thousand deep raises ``RecursionError``, a
5000-digit integer raises a ``ValueError`` about Python's integer conversion that names no file,
and ``NaN``/``Infinity`` are not JSON at all. Here every such file gives one ``ValueError``
naming the file (or the entry) and the problem; the ``selattn`` command prints it as one line and
exits with status 2.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

MAX_BYTES = 1 << 20       # a budgets file or a config is a few hundred bytes
MAX_DEPTH = 32            # ours nest 3 deep
MAX_INT_DIGITS = 30       # beyond any count or size the files hold

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def _nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text`` (brackets inside strings do not
    count; unbalanced text is for the parser to refuse)."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits (at most "
                         f"{MAX_INT_DIGITS})")
    return int(digits)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} overflows a float")
    return value


def _parse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str, context: str, max_chars: int = MAX_BYTES) -> object:
    """Parse ``text`` as JSON within the limits above.

    Parameters
    ----------
    text : str
    context : str, the start of every error message, naming the source and the problem
        (e.g. "budgets file 'b.json' is not readable JSON")
    max_chars : int, longest text accepted

    Returns
    -------
    The parsed value (dict, list, str, int, float, bool or None).

    Raises
    ------
    ValueError "<context>: <why>" for text that is too long, nested deeper than ``MAX_DEPTH``,
    holds an integer of more than ``MAX_INT_DIGITS`` digits, a number beyond float range, NaN or
    Infinity, or is not JSON.
    """
    if not isinstance(text, str):
        raise TypeError(f"{context}: JSON text must be a str, got {type(text).__name__}")
    try:
        if len(text) > max_chars:
            raise ValueError(f"longer than {max_chars} characters")
        depth = _nesting_depth(text)
        if depth > MAX_DEPTH:
            raise ValueError(f"nested {depth} levels deep (at most {MAX_DEPTH})")
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_parse_constant)
    except (ValueError, RecursionError) as exc:      # JSONDecodeError is a ValueError
        message = " ".join(str(exc).split())[:200]
        raise ValueError(f"{context}: {message}") from None


def read_json_file(path, what: str, max_bytes: int = MAX_BYTES) -> object:
    """Read and parse the JSON file ``path``, reading at most ``max_bytes`` + 1 bytes (so a
    device or a huge file is refused without reading it all).

    Parameters
    ----------
    path : str or Path
    what : str, the kind of file for messages, e.g. "budgets file"
    max_bytes : int, largest file accepted

    Returns
    -------
    The parsed value.

    Raises
    ------
    ValueError naming the file: it does not exist, cannot be read, is larger than
    ``max_bytes``, is not UTF-8, or is not JSON within ``parse_json``'s limits.
    """
    name = f"{what} {str(path)!r}"
    try:
        with open(Path(path), "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ValueError(f"{name} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{name} is not readable: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ValueError(f"{name} is not readable JSON: larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} is not readable JSON: not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start})") from None
    return parse_json(text, f"{name} is not readable JSON", max_chars=max_bytes)
