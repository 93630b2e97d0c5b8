"""Without the compiled extension: the install succeeds, training and evaluation fall back to the
NumPy attention, and whatever needs the kernels says so in one line instead of crashing.

The missing extension is simulated in a fresh interpreter by making its import fail
(``sys.modules['selattn_c._selattn_cffi'] = None``), which is exactly what Python does when the
file is absent. The build fallback itself (setup.py's ``OptionalBuildExt``) is run for real with a
C compiler that always fails (``CC=false``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs first in the child interpreter: from here on `import selattn_c._selattn_cffi` fails.
HIDE_EXTENSION = "import sys; sys.modules['selattn_c._selattn_cffi'] = None\n"


def run_without_extension(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(HIDE_EXTENSION + textwrap.dedent(code))
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, timeout=300,
                          capture_output=True, text=True)


def test_package_imports_and_every_kernel_entry_point_says_what_is_missing(tmp_path):
    proc = run_without_extension(tmp_path, """
        import numpy as np
        import selattn_c
        assert not selattn_c.extension_built()
        assert "_selattn_cffi" in selattn_c.extension_reason()
        x = np.zeros((1, 1, 4, 8), dtype=np.float32)
        calls = {
            "forward": lambda: selattn_c.forward(x, x, x),
            "accumulated_mask": lambda: selattn_c.accumulated_mask(x, x),
            "KVCache": lambda: selattn_c.KVCache(1, 1, 8, budget=4),
            "openmp_enabled": selattn_c.openmp_enabled,
            "get_num_threads": selattn_c.get_num_threads,
            "build_info": selattn_c.build_info,
            "kernel_name": selattn_c.kernel_name,
        }
        for name, call in calls.items():
            try:
                call()
            except selattn_c.ExtensionNotBuilt as e:
                assert "compiled C extension" in str(e) and "selattn_reference" in str(e), e
                assert isinstance(e, ImportError)
            else:
                raise AssertionError(name + " ran without the extension")
        selattn_c.set_num_threads(2)       # a setting, not a kernel call: accepted
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_train_and_eval_fall_back_to_numpy_and_kernel_commands_fail_in_one_line(tmp_path):
    proc = run_without_extension(tmp_path, """
        import json
        from selattn_lm.cli import main
        tiny = ["--steps", "2", "--n-layers", "1", "--n-heads", "2", "--d-model", "16",
                "--batch-size", "4", "--eval-every", "2", "--heldout-size", "8", "--quiet"]
        assert main(["train", *tiny, "--out", "m.npz"]) == 0
        assert json.load(open("m.json"))["backend"] == "numpy"
        assert main(["eval", "m.npz", "--json"]) == 0
        assert main(["train", *tiny, "--backend", "c", "--out", "c.npz"]) == 2
        assert main(["demo"]) == 2
        assert main(["calibrate", "m.npz"]) == 2
        assert main(["plot", "m.npz", "a=1;a="]) == 2
    """)
    assert proc.returncode == 0, proc.stderr
    assert '"backend": "numpy"' in proc.stdout          # eval --json
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 4, proc.stderr                 # one line per refused command
    assert "backend 'c' needs the compiled extension" in errors[0]
    for command, line in zip(["demo", "calibrate", "plot"], errors[1:]):
        assert line.startswith(f"selattn {command}: error: selattn {command} needs selattn_c's "
                               "compiled C extension"), line
    assert "Traceback" not in proc.stderr


def _source_copy(tmp_path: Path) -> Path:
    """The files setup.py needs, copied: the build writes build/ and *.egg-info next to them."""
    src = tmp_path / "src"
    for name in ("selattn_reference", "selattn_c", "selattn_lm", "selattn_bench", "csrc"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.o"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    return src


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_setup_installs_without_the_extension_when_the_compiler_fails(tmp_path):
    pytest.importorskip("setuptools")
    src = _source_copy(tmp_path)
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib")]
    env = dict(os.environ, CC="false")     # a C compiler that always fails
    env.pop("SELATTN_REQUIRE_EXTENSION", None)
    proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING: the C extension could not be built" in proc.stderr
    assert not list((tmp_path / "lib").rglob("_selattn_cffi*.so"))

    # ... and a failed build is an error when the extension is required.
    env["SELATTN_REQUIRE_EXTENSION"] = "1"
    proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0


def test_the_message_tells_a_source_checkout_from_an_installed_copy(monkeypatch):
    """A checkout without a built extension (never built, or shadowing an installed copy under
    `python -m ...` from the checkout) is told about `pip install -e`; an installed copy about
    reinstalling with a compiler."""
    from selattn_c import _extension
    monkeypatch.setattr(_extension, "lib", None)
    monkeypatch.setattr(_extension, "REASON", "ModuleNotFoundError: no _selattn_cffi")
    monkeypatch.setattr(_extension, "_source_checkout", lambda: Path("checkout"))
    with pytest.raises(_extension.ExtensionNotBuilt,
                       match=r"source checkout.*python -m pytest.*pip install -e '\.\[test\]'"):
        _extension.require_extension("selattn_c.forward")
    monkeypatch.setattr(_extension, "_source_checkout", lambda: None)
    with pytest.raises(_extension.ExtensionNotBuilt, match=r"not installed.*--force-reinstall"):
        _extension.require_extension("selattn_c.forward")
