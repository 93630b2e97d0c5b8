"""Output files that are all written or not at all, and output paths checked before any work.

``check_output_path`` is what a command calls on every path it will write, before it starts: a
missing directory, a path that is a directory, or an unwritable place fails at once, in one line.
``write_files_atomically`` writes several files so that none of them is replaced until every one
has been written in full: each goes to a hidden temporary file beside its target, and only then
are they renamed over the targets (a rename within a directory is atomic). On any failure the
temporary files are removed, so no ``*.tmp`` is left behind and an existing file is never
replaced by a partial one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, List, Sequence, Tuple


class OutputPathError(ValueError):
    """An output path cannot be written (the message names the option and the path)."""


def check_output_path(path, option: str) -> Path:
    """``path`` as a Path if a file can be written there; OutputPathError otherwise.

    Parameters
    ----------
    path : str or Path, the file to write
    option : how the user named it (e.g. ``"--out"``), for the message
    """
    p = Path(path)
    if p.name in ("", ".", ".."):
        raise OutputPathError(f"{option} {str(path)!r} is not a file name")
    if p.is_dir():
        raise OutputPathError(f"{option} {str(p)!r} is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise OutputPathError(f"{option} {str(p)!r}: the directory {str(parent)!r} does not "
                              "exist")
    if not parent.is_dir():
        raise OutputPathError(f"{option} {str(p)!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {str(p)!r}: the directory {str(parent)!r} is not "
                              "writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputPathError(f"{option} {str(p)!r} exists and is not writable")
    return p


def _mode_for(path: Path) -> int:
    """The permissions a file written at ``path`` should get: those of the file it replaces,
    else what ``open`` would give a new file (0o666 less the umask; mkstemp's are 0o600)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_files_atomically(files: Sequence[Tuple[Path, Callable[[BinaryIO], None]]]) -> None:
    """Write every ``(path, write)`` pair: ``write(f)`` fills a binary file object. No target is
    replaced before all are written; on failure nothing is replaced and no temporary is left.
    """
    staged: List[Tuple[str, Path]] = []
    try:
        for path, write in files:
            path = Path(path)
            parent = path.parent if str(path.parent) else Path(".")
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
            staged.append((tmp, path))
            os.chmod(tmp, _mode_for(path))
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_text_atomically(path, text: str) -> None:
    """One text file (UTF-8), written atomically."""
    write_files_atomically([(Path(path), lambda f: f.write(text.encode("utf-8")))])
