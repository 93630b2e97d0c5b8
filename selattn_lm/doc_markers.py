"""Rewriting the generated part of a Markdown page: the text between two marker lines."""

from __future__ import annotations

from pathlib import Path


def replace_between_markers(doc: Path, begin: str, end: str, content: str) -> None:
    """Replace the text between ``begin`` and ``end`` in ``doc`` with ``content`` (one line break
    on each side). ValueError naming the file when a marker is missing."""
    text = Path(doc).read_text(encoding="utf-8")
    if begin not in text or end not in text:
        raise ValueError(f"{doc} has no table markers ({begin!r} ... {end!r})")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    Path(doc).write_text(f"{head}{begin}\n{content}\n{end}{tail}", encoding="utf-8")
