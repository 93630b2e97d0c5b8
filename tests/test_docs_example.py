"""The worked example in docs/selective-attention.md is what the spec computes.

The document marks each matrix of the example with ``<!-- worked-example: NAME -->`` followed by
a fenced ``text`` block in the format of ``python -m selattn_reference explain``. This test
parses those blocks, recomputes every matrix from the example's inputs by the rules the document
states (not by the helpers of explain.py), and checks that (1) the numbers agree and (2) each
block appears verbatim in the explain output, so the document, the command and the spec cannot
drift apart.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest

from selattn_reference import attention as A
from selattn_reference import explain
from tolerances import DOC_PRINTED_ATOL

DOC = Path(__file__).resolve().parents[1] / "docs" / "selective-attention.md"
BLOCK = re.compile(r"<!-- worked-example: (\w+) -->\s*```text\n(.*?)\n```", re.S)
N = 5


def doc_blocks() -> Dict[str, str]:
    blocks = dict(BLOCK.findall(DOC.read_text(encoding="utf-8")))
    assert blocks, f"no worked-example blocks in {DOC.name}"
    return blocks


def parse_matrix(text: str) -> Tuple[np.ndarray, np.ndarray]:
    """A printed N x N matrix -> (values with nan for '.', mask of cells printed as '.')."""
    lines = text.splitlines()
    assert lines[0].split() == [f"j={j}" for j in range(N)], lines[0]
    values = np.full((N, N), np.nan)
    for i, line in enumerate(lines[1:]):
        label, *cells = line.split()
        assert label == f"i={i}" and len(cells) == N, line
        values[i] = [np.nan if cell == "." else float(cell) for cell in cells]
    assert i == N - 1, "a row is missing"
    return values, np.isnan(values)


def expected_matrices() -> Dict[str, np.ndarray]:
    """Every matrix of the example, from the spec's public functions and the document's rules."""
    q, k, v, scale = explain.example_inputs()
    _, cache = A.forward(q, k, v, scale=scale)
    _, plain = A.forward(q, k, v, scale=scale, selective=False)
    L = cache.L[0, 0]                                            # (N, N)
    S_relu = np.where(np.tri(N, dtype=bool), np.maximum(L, 0.0), 0.0)
    S_bos = S_relu.copy()
    S_bos[:, 0] = 0.0
    S = np.tril(S_bos, k=-1)                                     # zero the diagonal
    S_shifted = np.vstack([np.zeros((1, N)), S[:-1]])
    F = np.cumsum(S_shifted, axis=0)
    return {
        "L": L, "S_relu": S_relu, "S_bos": S_bos, "S": S, "S_shifted": S_shifted, "F": F,
        "P0_plain": plain.P[0, 0], "P0_selective": cache.P[0, 0],
        "P1_plain": plain.P[0, 1], "P1_selective": cache.P[0, 1],
        "visible_3": A.eviction_mask(cache.F, 3, protect_bos=True)[0].astype(float),
        "spec_F": cache.F[0],
    }


EXPECTED = expected_matrices()
SPEC_F = EXPECTED.pop("spec_F")


def test_doc_rules_give_the_spec_F():
    """relu, zero BOS column and diagonal, shift, cumsum (as the document states them) is F."""
    np.testing.assert_array_equal(EXPECTED["F"], SPEC_F)


def test_doc_has_every_step_of_the_example():
    assert set(doc_blocks()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_doc_matrix_equals_spec(name):
    values, dots = parse_matrix(doc_blocks()[name])
    future = ~np.tri(N, dtype=bool)
    if name == "L":
        assert not dots.any()
        assert np.all(np.isneginf(values[future])), "L is -inf above the diagonal"
    else:
        np.testing.assert_array_equal(dots, future, err_msg="'.' marks exactly the future keys")
        assert not EXPECTED[name][future].any(), "nothing above the diagonal"
    causal = ~future
    np.testing.assert_allclose(values[causal], EXPECTED[name][causal], rtol=0,
                               atol=DOC_PRINTED_ATOL, err_msg=name)


def test_doc_blocks_are_the_explain_output():
    printed = io.StringIO()
    explain.print_worked_example(printed)
    for name, text in doc_blocks().items():
        assert text in printed.getvalue(), f"block {name} is not what explain prints"


def test_doc_memory_loss_of_the_example():
    match = re.search(r"memory_loss\(F, tau=1\) = (\d+)", DOC.read_text(encoding="utf-8"))
    assert match, "the document states the example's memory"
    mem = A.memory_loss(EXPECTED["F"][None], 1.0)[0]
    assert float(match.group(1)) == mem
