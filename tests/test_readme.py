"""The README's two commands: the test command is exactly what CI runs, and both are well formed.

CI (.ci/run) runs the README's test command on a clean checkout; if the two drift apart, CI stops
testing what users are told to run. The main job's command (`selattn demo`) is run
for real by tests/test_demo.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"


def readme_commands():
    """The shell commands in the README's Quick start section, in order."""
    if not README.exists():
        pytest.skip("README.md is not next to the tests (installed elsewhere)")
    text = README.read_text(encoding="utf-8")
    start = text.index("## Quick start")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```bash\n(.*?)\n```", text[start:end], flags=re.S)


def test_quick_start_has_the_main_job_and_the_test_command():
    commands = readme_commands()
    assert len(commands) == 2
    main_job, tests = commands
    for command in commands:
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install")
    assert tests.endswith("pip install '.[test]' && pytest")
    assert "pytest" not in main_job
    assert main_job.endswith("pip install . && selattn demo")


def test_ci_runs_the_readme_test_command_exactly():
    if not CI.exists():
        pytest.skip(".ci/run is not next to the tests")
    ci_lines = CI.read_text(encoding="utf-8").splitlines()
    assert readme_commands()[1] in ci_lines


def test_the_using_it_snippets_run_as_written():
    """The Python blocks of the README's "Using it" section, run in order in one namespace, as
    a reader would paste them (every name they use is defined in them)."""
    import selattn_c
    if not README.exists():
        pytest.skip("README.md is not next to the tests (installed elsewhere)")
    if not selattn_c.extension_built():
        pytest.skip("the snippets call the C kernels, which are not built")
    text = README.read_text(encoding="utf-8")
    start = text.index("## Using it")
    end = text.index("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)\n```", text[start:end], flags=re.S)
    assert len(blocks) == 2
    namespace = {}
    before = selattn_c.get_num_threads()
    selattn_c.set_num_threads(1)
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"README.md, Using it, block {i + 1}", "exec"), namespace)
    finally:
        selattn_c.set_num_threads(before)
    assert namespace["out_t"].shape == (1, 8, 64)
    assert int(namespace["cache"].size.max()) <= 256
