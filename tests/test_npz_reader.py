"""selattn_lm/npz_reader.py on its own: what ``read_npz`` returns, what ``check`` refuses, and the
header-length limit on every NumPy (the checkpoint-level cases are in
tests/test_checkpoint_hostile.py)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from selattn_lm import npz_reader
from selattn_lm.npz_reader import NpzArchive, NpzError, read_npz

F4, F8 = np.dtype(np.float32), np.dtype(np.float64)


def test_read_npz_returns_the_expected_members_only_after_checking_them(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, a=np.arange(6.0).reshape(2, 3), s=np.array("text"),
             f=np.asfortranarray(np.ones((2, 3), np.float32)))
    got = read_npz(path, {"a": ((2, 3), [F8]), "s": ((), "U"), "f": ((2, 3), [F4])})
    np.testing.assert_array_equal(got["a"], np.arange(6.0).reshape(2, 3))
    assert got["s"].shape == () and str(got["s"]) == "text"
    assert got["f"].flags.c_contiguous
    assert list(read_npz(path, {"a": ((2, 3), [F8])}, exact=False)) == ["a"]
    for expected, words in (({"a": ((2, 3), [F8])}, r"unexpected tensors \['f', 's'\]"),
                            ({"a": ((3, 2), [F8]), "s": ((), "U"), "f": ((2, 3), [F4])},
                             r"'a' has shape \(2, 3\)"),
                            ({"a": ((2, 3), [F4]), "s": ((), "U"), "f": ((2, 3), [F4])},
                             "'a' has dtype float64, expected float32"),
                            ({"b": ((1,), [F4])}, r"missing tensors \['b'\]")):
        with pytest.raises(NpzError, match=words):
            read_npz(path, expected)


def test_a_long_header_is_refused_also_where_numpy_cannot_limit_it(tmp_path, monkeypatch):
    """NumPy < 1.24 has no ``max_header_size``: the length field is then checked here."""
    npy = io.BytesIO()
    npy.write(b"\x93NUMPY\x01\x00" + (60_000).to_bytes(2, "little") + b" " * 60_000)
    with zipfile.ZipFile(tmp_path / "long.npz", "w") as z:
        z.writestr("a.npy", npy.getvalue())
    np.savez(tmp_path / "ok.npz", a=np.arange(3.0))
    original = np.lib.format.read_array_header_1_0

    def without_limit(fp, **kwargs):
        if kwargs:
            raise TypeError("read_array_header_1_0() got an unexpected keyword argument "
                            "'max_header_size'")
        return original(fp)

    for patched in (False, True):
        if patched:
            monkeypatch.setattr(np.lib.format, "read_array_header_1_0", without_limit)
        with pytest.raises(NpzError, match="'a' has no readable .npy header"):
            NpzArchive(tmp_path / "long.npz")
        np.testing.assert_array_equal(read_npz(tmp_path / "ok.npz", {"a": ((3,), [F8])})["a"],
                                      np.arange(3.0))
    assert npz_reader.MAX_HEADER_BYTES == 10_000
