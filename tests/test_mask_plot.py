"""Mask pictures (selattn_lm.mask_plot): the ASCII heatmap cell by cell, the PNG file."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from selattn_lm.mask_plot import ASCII_LEVELS, ascii_heatmap, save_png


@st.composite
def masks(draw):
    N = draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    F = scale * np.abs(np.random.default_rng(seed).standard_normal((N, N)))
    tokens = [chr(ord("a") + (i % 26)) for i in range(N)]
    return np.tril(F, -1), tokens


@given(masks(), st.sampled_from([1.0, 5.0, 20.0]))
def test_ascii_cells_follow_F(case, vmax):
    F, tokens = case
    N = len(tokens)
    lines = ascii_heatmap(F, tokens, title="layer 0", vmax=vmax).splitlines()
    assert len(lines) == N + 3
    assert lines[0] == "layer 0" and lines[1] == "  " + "".join(tokens)
    order = {c: i for i, c in enumerate(ASCII_LEVELS)}
    for i, row in enumerate(lines[2:2 + N]):
        assert row[0] == tokens[i] and row[1] == "|" and row[-1] == "|"
        cells = row[2:-1]
        assert len(cells) == N
        assert cells[i + 1:] == " " * (N - i - 1)                 # future keys are blank
        for j in range(i + 1):
            assert (order[cells[j]] == 0) == (F[i, j] < vmax / (2 * (len(ASCII_LEVELS) - 1)))
            assert (cells[j] == ASCII_LEVELS[-1]) == (F[i, j] >= vmax * (1 - 0.5 / 9))
            for jj in range(i + 1):                               # darker means larger F
                if F[i, j] < F[i, jj]:
                    assert order[cells[j]] <= order[cells[jj]]


def test_ascii_marks_the_kept_tokens():
    F = np.tril(np.ones((5, 5)), -1)
    lines = ascii_heatmap(F, list("^ab=1"), kept=[0, 3, 4]).splitlines()
    assert lines[-2].startswith("  ^  ^^  <- the 3 tokens the pruned cache holds")
    with pytest.raises(ValueError, match=r"kept positions must be in \[0, 5\)"):
        ascii_heatmap(F, list("^ab=1"), kept=[0, 5])
    with pytest.raises(TypeError, match="kept"):
        ascii_heatmap(F, list("^ab=1"), kept=[0.5])


def test_ascii_bad_input():
    with pytest.raises(ValueError, match=r"masks\[0\] must have shape \(3, 3\)"):
        ascii_heatmap(np.zeros((2, 2)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="NaN"):
        ascii_heatmap(np.full((1, 1), np.nan), ["a"])
    with pytest.raises(ValueError, match="vmax"):
        ascii_heatmap(np.zeros((1, 1)), ["a"], vmax=0)
    with pytest.raises(TypeError, match="vmax"):
        ascii_heatmap(np.zeros((1, 1)), ["a"], vmax="5")


def test_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    F = np.tril(np.arange(36.0).reshape(6, 6) / 6, -1)
    path = tmp_path / "masks.png"
    save_png(path, [F, F / 2], list("^ab=1;"), titles=["layer 0", "layer 1"], suptitle="x",
             kept=[[0, 4, 5], [0, 5]])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="kept must have one entry per mask"):
        save_png(path, [F, F], list("^ab=1;"), kept=[[0]])
    with pytest.raises(ValueError, match="one entry per mask"):
        save_png(path, [F, F], list("^ab=1;"), titles=["only one"])


def test_png_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib -> ImportError
    with pytest.raises(RuntimeError, match=r"selattn\[plot\]"):
        save_png(tmp_path / "m.png", [np.zeros((2, 2))], ["a", "b"])
