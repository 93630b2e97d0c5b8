"""``python -m selattn_reference``: usage without a command, the worked example with ``explain``.

Run as a subprocess from a temporary directory, i.e. outside the repository, so that the test
exercises the installed package rather than files next to the working directory.
"""

from __future__ import annotations

import io
import subprocess
import sys

from selattn_reference import explain


def run(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selattn_reference", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_explain_prints_the_worked_example(tmp_path):
    result = run(tmp_path, "explain")
    assert result.returncode == 0, result.stderr
    expected = io.StringIO()
    explain.print_worked_example(expected)
    assert result.stdout == expected.getvalue()
    for step in ("L: head-0 scaled logits", "S = relu(L)", "F = cumulative sum", "3-slot buffer"):
        assert step in result.stdout


def test_no_command_and_help_print_usage(tmp_path):
    for args in ((), ("--help",)):
        result = run(tmp_path, *args)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: python -m selattn_reference")
        assert "explain" in result.stdout


def test_unknown_command_fails(tmp_path):
    result = run(tmp_path, "bogus")
    assert result.returncode == 2
    assert "invalid choice: 'bogus'" in result.stderr
