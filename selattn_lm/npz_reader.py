"""Reading ``.npz`` archives that may be hostile, with limits, and without pickle.

``np.load`` trusts the file: it decompresses a member before anyone can look at its shape (a
2.6 MB archive whose ``wte.npy`` inflates to 2 GiB costs 2 GiB), allocates whatever shape a
member's header declares (2^40 float64: a ``MemoryError``), and on a file that is not an archive
at all suggests loading it "unsafely using allow_pickle=". Here an archive is read in two steps:

1. ``NpzArchive(path)`` opens the zip and reads every member's ``.npy`` header only (format 1.0
   or 2.0, at most 10,000 bytes, parsed without running code): its shape, dtype and memory
   order, and the size the zip declares for it. A member is refused when its dtype holds Python
   objects (it would need pickle), when the zip's declared size is not exactly header + data
   (so the data cannot be longer than the header says), when it is compressed more than
   ``MAX_RATIO``:1 (a zip bomb: real weights barely compress), or when the archive has too many
   members or declares more than ``max_total_bytes`` in all.
2. The caller checks the headers against what it expects (``check``: names, shapes, dtypes)
   and only then reads the data (``read``): into an array of the checked size, from a stream
   that stops at the declared size and verifies the zip's CRC-32.

``read_npz`` does both for a caller that knows everything it expects in advance. Every problem
raises ``NpzError`` (a ``ValueError``) naming the file and the member.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Dict, Mapping, Tuple, Union

import numpy as np

MAX_MEMBERS = 4096              # a checkpoint of the tiny LM has 12 per layer and 6 more
MAX_TOTAL_BYTES = 1 << 32       # 4 GiB of arrays in all
MAX_HEADER_BYTES = 10_000       # numpy's own default limit for .npy headers
MAX_RATIO = 100                 # uncompressed / compressed size, for members beyond SMALL
SMALL = 1 << 20                 # members up to 1 MiB may compress any amount
_CHUNK = 1 << 22                # the data is read 4 MiB at a time

# What reading a member can raise on a corrupt archive: zipfile's own errors, zlib's for bad
# deflate data, NotImplementedError for an unknown compression method, RuntimeError for an
# encrypted member.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError,
                NotImplementedError, RuntimeError)

Shape = Tuple[int, ...]
# What a caller expects of a member: its shape, and the dtypes it accepts (np.dtype objects) or a
# string of accepted dtype kinds ("U": any unicode string, of any length within the limits).
Expectation = Tuple[Shape, Union[Collection[np.dtype], str]]


class NpzError(ValueError):
    """An .npz archive is unreadable, hostile, or not what the caller expects: ``path`` and the
    ``reason`` (which names the member), shown as "<path>: <reason>"."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _not_an_archive(path: Path, exc: BaseException) -> str:
    """Why ``path`` is no zip: a single .npy array, or something else."""
    try:
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                return "a single array (.npy), not a .npz archive"
    except OSError:
        pass
    return f"not a .npz archive (truncated, corrupt, or another kind of file): {exc}"


@dataclass(frozen=True)
class Member:
    """One array of the archive, from its .npy header (no data read)."""

    name: str                 # without the ".npy"
    shape: Shape
    dtype: np.dtype
    fortran_order: bool
    offset: int               # bytes of the .npy header, before the data
    info: zipfile.ZipInfo

    @property
    def nbytes(self) -> int:
        """Bytes of the data (Python ints: no overflow, whatever the header claims)."""
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class NpzArchive:
    """An open .npz with every member's header read and checked for safety (not yet against
    what the caller expects). Use as a context manager, or call ``close()``.

    Parameters
    ----------
    path : str or Path
    max_members : int, most arrays accepted
    max_total_bytes : int, most bytes of array data (declared in the headers) accepted in all

    Raises
    ------
    NpzError : not a zip archive (for example a text file, or a single .npy), a truncated or
        corrupt one, a member that is not a .npy or is listed twice, an unsafe or inconsistent
        header (see the module docstring), or limits exceeded.
    """

    def __init__(self, path, *, max_members: int = MAX_MEMBERS,
                 max_total_bytes: int = MAX_TOTAL_BYTES):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except FileNotFoundError:
            raise NpzError(self.path, "no such file") from None
        except IsADirectoryError:
            raise NpzError(self.path, "a directory, not a .npz archive") from None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
            raise NpzError(self.path, _not_an_archive(self.path, exc)) from None
        try:
            self.members = self._read_headers(max_members, max_total_bytes)
        except BaseException:
            self._zip.close()
            raise

    def __enter__(self) -> "NpzArchive":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        self._zip.close()

    def _fail(self, message: str) -> NpzError:
        return NpzError(self.path, message)

    def _read_headers(self, max_members: int, max_total_bytes: int) -> Dict[str, Member]:
        infos = self._zip.infolist()
        if len(infos) > max_members:
            raise self._fail(f"{len(infos)} members, more than the {max_members} accepted")
        members: Dict[str, Member] = {}
        total = 0
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise self._fail(f"member {info.filename!r} is not a .npy array")
            name = info.filename[:-len(".npy")]
            if name in members:
                raise self._fail(f"member {info.filename!r} is listed twice")
            member = self._header(name, info)
            if member.offset + member.nbytes != info.file_size:
                raise self._fail(f"member {name!r}: its header declares {member.nbytes} bytes "
                                 f"of {member.dtype} {member.shape}, the archive "
                                 f"{info.file_size - member.offset} (inconsistent: refused)")
            if info.file_size > SMALL and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                raise self._fail(f"member {name!r} inflates {info.compress_size} bytes to "
                                 f"{info.file_size}, more than {MAX_RATIO}:1 (a zip bomb?)")
            total += member.nbytes
            if total > max_total_bytes:
                raise self._fail(f"the arrays declare more than {max_total_bytes} bytes in "
                                 "all (refused before reading them)")
            members[name] = member
        return members

    def _header(self, name: str, info: zipfile.ZipInfo) -> Member:
        try:
            with self._zip.open(info) as f:
                shape, fortran, dtype = _read_header(f)
                offset = f.tell()
        except _READ_ERRORS + (TypeError, SyntaxError) as exc:
            raise self._fail(f"member {name!r} has no readable .npy header: "
                             f"{' '.join(str(exc).split())[:200]}") from None
        if dtype.hasobject:
            raise self._fail(f"member {name!r} holds Python objects (dtype {dtype}), which "
                             "only pickle could read: refused")
        if not all(isinstance(s, int) and s >= 0 for s in shape):
            raise self._fail(f"member {name!r} has an invalid shape {shape}")
        return Member(name, tuple(shape), dtype, bool(fortran), offset, info)

    def check(self, expected: Mapping[str, Expectation], *, exact: bool = True) -> None:
        """Check the headers against ``expected`` {name: (shape, dtypes)}: every expected
        member present with that shape and an accepted dtype; with ``exact``, no other member.

        Raises
        ------
        NpzError naming the missing or unexpected members, or the member whose shape or dtype
        differs.
        """
        missing = sorted(set(expected) - set(self.members))
        if missing:
            raise self._fail(f"missing tensors {missing}")
        unexpected = sorted(set(self.members) - set(expected))
        if exact and unexpected:
            raise self._fail(f"unexpected tensors {unexpected} (not in the config)")
        for name, (shape, dtypes) in expected.items():
            m = self.members[name]
            if m.shape != tuple(shape):
                raise self._fail(f"tensor {name!r} has shape {m.shape}, the config needs "
                                 f"{tuple(shape)}")
            ok = m.dtype.kind in dtypes if isinstance(dtypes, str) else m.dtype in dtypes
            if not ok:
                want = (f"kind {dtypes!r}" if isinstance(dtypes, str)
                        else " or ".join(str(np.dtype(d)) for d in dtypes))
                raise self._fail(f"tensor {name!r} has dtype {m.dtype}, expected {want}")

    def read(self, name: str) -> np.ndarray:
        """The data of member ``name`` (its header already checked): exactly the declared bytes
        into an array of the header's shape, then the zip's end-of-member and CRC-32 checks.

        Raises
        ------
        NpzError when the member is missing, truncated, longer than declared or corrupt.
        """
        if name not in self.members:
            raise self._fail(f"no member {name!r}")
        m = self.members[name]
        out = np.empty(m.nbytes // m.dtype.itemsize if m.dtype.itemsize else 0, m.dtype)
        buf = memoryview(out.view(np.uint8).reshape(-1)) if m.nbytes else memoryview(b"")
        try:
            with self._zip.open(m.info) as f:
                f.read(m.offset)                                      # the header, again
                done = 0
                while done < m.nbytes:
                    n = f.readinto(buf[done:done + _CHUNK])
                    if not n:
                        raise EOFError(f"{m.nbytes - done} bytes missing")
                    done += n
                if f.read(1):                      # also makes zipfile check the CRC at the end
                    raise ValueError("data beyond the declared size")
        except _READ_ERRORS as exc:
            raise self._fail(f"member {name!r} is unreadable (truncated or corrupt?): "
                             f"{' '.join(str(exc).split())[:200]}") from None
        arr = out.reshape(m.shape, order="F" if m.fortran_order else "C")
        return arr if arr.flags.c_contiguous else arr.copy(order="C")   # (0-d stays 0-d)


def _read_header(f) -> tuple:
    """(shape, fortran_order, dtype) of the .npy stream ``f`` (format 1.0 or 2.0), refusing a
    header longer than MAX_HEADER_BYTES before reading it. NumPy >= 1.24 checks the length
    itself (``max_header_size``); for older NumPy the length field is read here first."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy format version {version} is not supported")
    reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    try:
        return reader(f, max_header_size=MAX_HEADER_BYTES)
    except TypeError as exc:
        if "max_header_size" not in str(exc):
            raise
    start = f.tell()
    size = 2 if version == (1, 0) else 4
    length = int.from_bytes(f.read(size), "little")
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"a .npy header of {length} bytes (at most {MAX_HEADER_BYTES})")
    f.seek(start)
    return reader(f)


def read_npz(path, expected: Mapping[str, Expectation], *, exact: bool = True,
             max_members: int = MAX_MEMBERS,
             max_total_bytes: int = MAX_TOTAL_BYTES) -> Dict[str, np.ndarray]:
    """Read the members of the .npz at ``path`` that ``expected`` names, after checking every
    header against it (``NpzArchive``, ``NpzArchive.check``).

    Parameters
    ----------
    path : str or Path
    expected : {name: (shape, dtypes)}, dtypes a collection of np.dtype or a string of kinds
    exact : bool, refuse members not in ``expected``
    max_members, max_total_bytes : limits of ``NpzArchive``

    Returns
    -------
    {name: array} for every name in ``expected``, C-contiguous, of the expected shape.
    """
    with NpzArchive(path, max_members=max_members, max_total_bytes=max_total_bytes) as archive:
        archive.check(expected, exact=exact)
        return {name: archive.read(name) for name in expected}
