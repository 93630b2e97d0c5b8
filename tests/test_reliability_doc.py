"""docs/reliability.md names a test for every bad input of the model runner, the CLI and the
checkpoints; this checks that each named test exists, so the table cannot point at nothing.
(The C entry points' rows are checked against their cases in tests/test_c_bad_inputs.py.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"


def named_tests():
    if not DOC.exists():
        pytest.skip("docs/reliability.md is not next to the tests (installed elsewhere)")
    return sorted(set(re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", DOC.read_text("utf-8"))))


def test_the_table_names_tests():
    assert len(named_tests()) >= 15


@pytest.mark.parametrize("path, name", named_tests() if DOC.exists() else [])
def test_every_named_test_exists(path, name):
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert name in defined, f"docs/reliability.md names {path}::{name}, which does not exist"
