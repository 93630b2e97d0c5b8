"""The ``selattn`` console script: a tiny ``train`` end to end, ``eval`` of what it wrote, and
one-line errors with exit status 2 for bad input.

The end-to-end test runs the installed console script in a subprocess from a temporary directory
(outside the repository); the error tests call ``selattn_lm.cli.main`` in-process (faster).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selattn_lm.cli import main

TINY_TRAIN = ["--n-vars", "2", "--n-assignments", "3", "--max-value", "9", "--d-model", "16",
              "--n-heads", "2", "--batch-size", "16", "--steps", "12", "--eval-every", "6",
              "--heldout-size", "30", "--warmup-steps", "3", "--seed", "5", "--threads", "1"]


def selattn_command():
    """The installed ``selattn`` script (next to this interpreter), else the module."""
    script = Path(sys.executable).with_name("selattn")
    if script.exists():
        return [str(script)]
    found = shutil.which("selattn")
    return [found] if found else [sys.executable, "-m", "selattn_lm.cli"]


def run(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(selattn_command() + list(args), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def test_train_then_eval_end_to_end(tmp_path):
    result = run(tmp_path, "train", *TINY_TRAIN, "--out", "m.npz")
    assert result.returncode == 0, result.stderr
    assert "wrote m.npz and m.json" in result.stdout
    # the progress bar, on stderr: one line per evaluation when stderr is not a terminal
    bar = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert len(bar) == 2 and "step 12/12" in bar[-1] and "loss " in bar[-1]
    assert "heldout_accuracy " in bar[-1]

    log = json.loads((tmp_path / "m.json").read_text())
    assert log["seed"] == 5 and log["train_config"]["steps"] == 12
    assert log["task"] == {"name": "assign", "n_vars": 2, "n_assignments": 3, "max_value": 9,
                           "min_assignments": None, "fixed_width": False,
                           "train_min_assignments": None, "heldout_size": 30,
                           "heldout_seed": 12345}
    assert [c["step"] for c in log["curve"]] == [6, 12]
    assert log["model_config"]["selective"] is True

    result = run(tmp_path, "eval", "m.npz", "--json", "--backend", log["backend"])
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout)
    assert scored["n"] == 30 and scored["heldout_accuracy"] == log["final_heldout_accuracy"]

    result = run(tmp_path, "eval", "m.npz", "--budgets", "4,6", "--n", "10")
    assert result.returncode == 0, result.stderr
    assert "assign task, heldout_accuracy" in result.stdout and "[4, 6]" in result.stdout
    assert "first 10" in result.stdout


def test_standard_flag_trains_the_baseline(tmp_path, capsys):
    code = main(["train", *TINY_TRAIN, "--steps", "2", "--eval-every", "2", "--standard",
                 "--quiet", "--out", str(tmp_path / "s.npz"), "--log", str(tmp_path / "s.log")])
    assert code == 0
    log = json.loads((tmp_path / "s.log").read_text())
    assert log["model_config"]["selective"] is False and log["train_config"]["standard"]
    assert capsys.readouterr().err == ""           # --quiet: no progress bar


def test_train_grows_a_checkpoint_by_a_layer(tmp_path, capsys):
    """--init-from with --insert-layer: a 3-layer run that starts from a 2-layer checkpoint."""
    two, three = str(tmp_path / "two.npz"), str(tmp_path / "three.npz")
    assert main(["train", *TINY_TRAIN, "--steps", "2", "--eval-every", "2", "--quiet",
                 "--out", two]) == 0
    assert main(["train", *TINY_TRAIN, "--steps", "2", "--eval-every", "2", "--quiet",
                 "--n-layers", "3", "--init-from", two, "--insert-layer", "1",
                 "--out", three]) == 0
    log = json.loads((tmp_path / "three.json").read_text())
    assert log["model_config"]["n_layers"] == 3
    assert log["train_config"]["init_from"] == two and log["train_config"]["insert_layer"] == 1


def test_train_with_soft_budgets(tmp_path):
    """--soft-budgets (one value for every layer) and --soft-strength reach the run's log."""
    out = str(tmp_path / "soft.npz")
    assert main(["train", *TINY_TRAIN, "--steps", "2", "--eval-every", "2", "--quiet",
                 "--soft-budgets", "3", "--soft-strength", "4", "--out", out]) == 0
    config = json.loads((tmp_path / "soft.json").read_text())["train_config"]
    assert config["soft_budgets"] == [3, 3] and config["soft_strength"] == 4.0
    assert config["soft_share"] == 1.0


@pytest.mark.parametrize("backend", ["c", "numpy"])
def test_train_with_soft_budgets_on_either_backend(tmp_path, backend):
    """--soft-budgets trains on the backend asked for: the C kernels have the rank penalty too."""
    out = str(tmp_path / "soft.npz")
    assert main(["train", *TINY_TRAIN, "--steps", "2", "--eval-every", "2", "--quiet",
                 "--backend", backend, "--soft-budgets", "3,4", "--out", out]) == 0
    log = json.loads((tmp_path / "soft.json").read_text())
    assert log["backend"] == backend and log["train_config"]["soft_budgets"] == [3, 4]


def one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "0"], "steps must be >= 1"),
    (["train", "--steps", "ten"], "invalid int value: 'ten'"),
    (["train", "--lr", "-1"], "lr must be"),
    (["train", "--eps", "nan"], "eps must be a finite number"),
    (["train", "--d-model", "30"], "multiple of n_heads"),
    (["train", "--n-vars", "27"], "n_vars must be in [1, 26]"),
    (["train", "--threads", "0", "--steps", "1"], "--threads must be an int >= 1"),
    (["train", "--backend", "gpu"], "invalid choice: 'gpu'"),
    (["train", "--insert-layer", "1"], "insert_layer needs init_from"),
    (["train", "--soft-budgets", "3,x"], "--soft-budgets must be integers"),
    (["train", "--soft-budgets", "3,3,3"], "--soft-budgets needs 1 or 2 values"),
    (["train", "--standard", "--soft-budgets", "3"], "need a selective model"),
    (["train", "--soft-budgets", "4", "--soft-share", "2"], "soft_share must be in [0, 1]"),
    (["train", "--init-from", "missing.npz", "--steps", "1"], "missing.npz"),
    (["eval"], "the following arguments are required: checkpoint"),
    (["bogus"], "invalid choice: 'bogus'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_arguments_give_one_line_and_status_2(capsys, argv, message):
    assert message in one_line_error(capsys, argv)


def test_missing_and_corrupt_checkpoints(tmp_path, capsys):
    line = one_line_error(capsys, ["eval", str(tmp_path / "nothing.npz")])
    assert line.startswith("selattn eval: error:") and "nothing.npz" in line

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    assert "corrupt.npz" in one_line_error(capsys, ["eval", str(corrupt)])

    main(["train", *TINY_TRAIN, "--steps", "1", "--eval-every", "1", "--quiet",
          "--out", str(tmp_path / "ok.npz")])
    capsys.readouterr()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes((tmp_path / "ok.npz").read_bytes()[:2000])
    assert "truncated.npz" in one_line_error(capsys, ["eval", str(truncated)])
    assert "--budgets" in one_line_error(capsys, ["eval", str(tmp_path / "ok.npz"),
                                                  "--budgets", "4,x"])
    assert "1 or 2 values" in one_line_error(capsys, ["eval", str(tmp_path / "ok.npz"),
                                                      "--budgets", "4,4,4"])
    assert "budget" in one_line_error(capsys, ["eval", str(tmp_path / "ok.npz"),
                                               "--budgets", "1"])
    assert "n (examples to score) must be an int >= 1" in one_line_error(capsys, ["eval", str(tmp_path / "ok.npz"),
                                                         "--n", "0"])


def test_unwritable_output_is_a_one_line_error(tmp_path, capsys):
    line = one_line_error(capsys, ["train", *TINY_TRAIN, "--steps", "1", "--eval-every", "1",
                                   "--quiet", "--out", str(tmp_path / "no" / "dir" / "m.npz")])
    assert line.startswith("selattn train: error:")


def test_help_lists_train_and_eval(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    """``selattn ... | head``: when the reader goes away, no "error: [Errno 32] Broken pipe" and
    no exit status 2, but the status of a program ended by SIGPIPE (141), silently."""
    import os

    from selattn_lm import cli

    def parser():
        p = cli._Parser(prog="selattn")
        sub = p.add_subparsers(dest="command", required=True)
        sub.add_parser("spam").set_defaults(run=lambda args: print("x" * 100_000) or 0)
        return p

    read, write = os.pipe()
    os.close(read)                                           # the reader is gone
    out = os.fdopen(write, "w")
    monkeypatch.setattr(cli, "build_parser", parser)
    monkeypatch.setattr(cli.sys, "stdout", out)
    status = cli.main(["spam"])
    monkeypatch.undo()
    out.close()
    assert status == cli.BROKEN_PIPE == 141
    assert capsys.readouterr().err == ""
