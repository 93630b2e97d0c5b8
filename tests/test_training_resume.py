"""Runs that can be left alone (issue: training runs): the run state, resume bit for bit, clean
stops on SIGINT/SIGTERM, output paths checked before the first step, all-or-nothing writes, the
threads of the kernels and BLAS, and the warning for a schedule that cannot warm up.

Resume equality is checked for both tasks, stopped inside the warm-up and after it: a run whose
state was written at step k and resumed from there ends with the same weights, optimizer state and
curve (but for the seconds) as the run that never stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest

from selattn_lm.checkpoint import CheckpointError, load_checkpoint
from selattn_lm.cli import main
from selattn_lm.output_files import check_output_path, write_files_atomically
from selattn_lm.run_state import load_run_state
from selattn_lm.task_assign import AssignTask
from selattn_lm.task_text import TextTask
from selattn_lm import training
from selattn_lm.training import TrainConfig, load_resume, train

from test_cli import TINY_TRAIN, one_line_error, selattn_command
from test_text_data import write_dump

ASSIGN = TrainConfig(task=AssignTask(n_vars=2, n_assignments=3, max_value=9, heldout_size=20),
                     n_layers=2, n_heads=2, d_model=16, batch_size=8, steps=12, eval_every=4,
                     warmup_steps=8, eps=0.05, seed=3)


@pytest.fixture(scope="module")
def text_cfg(tmp_path_factory):
    dump = write_dump(tmp_path_factory.mktemp("corpus") / "dump.xml.bz2", compress=True)
    return TrainConfig(task=TextTask(corpus_path=str(dump), eval_windows=2), n_layers=2,
                       n_heads=2, d_model=16, context=32, batch_size=4, steps=12, eval_every=4,
                       warmup_steps=8, seed=1)


def without_seconds(curve):
    return [{k: v for k, v in c.items() if k != "seconds"} for c in curve]


@pytest.mark.parametrize("task", ["assign", "text"])
@pytest.mark.parametrize("stop_at", [7, 10])         # inside the warm-up (8 steps), after it
def test_a_resumed_run_equals_the_uninterrupted_one(task, stop_at, text_cfg, tmp_path,
                                                  monkeypatch):
    cfg = ASSIGN if task == "assign" else text_cfg
    run_path, at_stop = tmp_path / "run.npz", tmp_path / "at_stop.npz"
    save = training.save_run_state

    def save_and_keep(path, params, m, v, state):      # keep the state written at stop_at
        save(path, params, m, v, state)
        if state["step"] == stop_at:
            shutil.copy(path, at_stop)

    monkeypatch.setattr(training, "save_run_state", save_and_keep)
    # stop_at falls between two evaluations (every 4 steps): the losses since the last one are
    # part of the state
    params, model_cfg, log = train(cfg, quiet=True, run_path=run_path, checkpoint_every=stop_at)
    monkeypatch.undo()
    assert load_run_state(run_path)[3]["step"] == 12          # the finished state, at the end
    saved = load_run_state(at_stop)[3]
    assert saved["step"] == stop_at and saved["adam_t"] == stop_at and saved["window"]

    resumed_cfg, resume = load_resume(at_stop)
    assert resumed_cfg == cfg
    params2, model_cfg2, log2 = train(resumed_cfg, quiet=True, resume=resume)
    assert model_cfg2 == model_cfg
    assert all(np.array_equal(params[k], params2[k]) for k in params)
    assert without_seconds(log2["curve"]) == without_seconds(log["curve"])
    assert log2[f"final_{cfg.task.METRIC}"] == log[f"final_{cfg.task.METRIC}"]
    assert [s["start_step"] for s in log2["sessions"]] == [0, stop_at]
    assert log2["sessions"][0]["end_step"] == stop_at and log2["sessions"][1]["end_step"] == 12


def test_the_run_state_holds_the_optimizer_and_streams(tmp_path):
    run_path = tmp_path / "run.npz"
    train(ASSIGN, quiet=True, run_path=run_path, checkpoint_every=12)
    params, m, v, state = load_run_state(run_path)
    assert set(params) == set(m) == set(v) and state["step"] == 12
    assert state["rng"]["bit_generator"] == "PCG64" and state["window"] == []
    assert [c["step"] for c in state["curve"]] == [4, 8, 12]
    assert all(np.abs(v[k]).max() > 0 for k in v)


def test_bad_run_states_are_refused_in_one_line(tmp_path, capsys):
    model = tmp_path / "m.npz"
    assert main(["train", *TINY_TRAIN, "--steps", "2", "--eval-every", "2", "--quiet",
                 "--out", str(model)]) == 0
    capsys.readouterr()
    for path, message in ((model, "not a run state of selattn train (no 'state'"),
                          (tmp_path / "none.npz", "no run state at"),
                          (tmp_path / "m.json", "is not a run state")):
        assert main(["train", "--resume", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    run = tmp_path / "m.run.npz"
    assert main(["train", "--resume", str(run)]) == 2            # it finished
    assert "already finished all 2 steps" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--lr", "0.1"]) == 2
    assert "--lr cannot be given with it" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="members do not match"):
        arrays = dict(np.load(run))
        del arrays["adam.v/wte"]
        np.savez(tmp_path / "cut.npz", **arrays)
        load_run_state(tmp_path / "cut.npz")


# ----------------------------------------------------------------------------------------------
# Signals


def _start(tmp_path, *args):
    return subprocess.Popen(selattn_command() + ["train", *TINY_TRAIN, "--steps", "100000",
                                                 "--eval-every", "1", *args],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_state_and_says_how_to_resume(tmp_path, signum):
    proc = _start(tmp_path, "--out", "m.npz", "--checkpoint-every", "0")
    try:
        line = proc.stderr.readline()            # one line per evaluation: it is training
        assert line.startswith("step "), line
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert last.startswith(f"selattn train: stopped by {name} after step ")
    assert last.endswith("resume with  selattn train --resume m.run.npz")
    step = int(last.split("after step ")[1].split(";")[0])
    assert load_run_state(tmp_path / "m.run.npz")[3]["step"] == step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.run.npz"]   # no .tmp, no model


def test_stopped_and_resumed_from_the_command_line_equals_one_run(tmp_path):
    """Ctrl-C after a few steps, then --resume: the checkpoint and the log's curve are those of
    the same run uninterrupted (run in-process from the same settings)."""
    proc = subprocess.Popen(selattn_command() + ["train", *TINY_TRAIN, "--steps", "30",
                                                 "--eval-every", "1", "--out", "m.npz"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for _ in range(3):
            assert proc.stderr.readline().startswith("step ")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130
    result = subprocess.run(selattn_command() + ["train", "--resume", "m.run.npz", "--quiet",
                                                 "--threads", "2"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote m.npz and m.json" in result.stdout
    log = json.loads((tmp_path / "m.json").read_text())
    cfg = TrainConfig.from_dict(log["train_config"])
    params, _, want = train(cfg, quiet=True)
    got, _, _ = load_checkpoint(tmp_path / "m.npz")
    assert all(np.array_equal(got[k], params[k]) for k in params)
    assert without_seconds(log["curve"]) == without_seconds(want["curve"])
    assert len(log["sessions"]) == 2 and log["sessions"][1]["command"].endswith(
        "--resume m.run.npz --quiet --threads 2")
    assert log["sessions"][1]["threads"]["kernels"] in (1, 2)


# ----------------------------------------------------------------------------------------------
# Output paths and files


def test_bad_output_paths_fail_before_the_first_step(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    a_dir = tmp_path / "adir"
    a_dir.mkdir()
    cases = [
        (["--out", str(tmp_path / "no" / "m.npz")], "the directory"),
        (["--out", str(a_dir)], "is a directory; give a file name"),
        (["--out", str(tmp_path / "m.npz"), "--log", str(a_file / "x.json")],
         "is not a directory"),
        (["--out", str(tmp_path / "m.npz"), "--log", str(a_dir)], "--log"),
        (["--out", str(tmp_path / "m.npz"), "--checkpoint-dir", str(tmp_path / "none")],
         "--checkpoint-dir"),
    ]
    for args, message in cases:
        # 100000 steps: had any of them started, this test would not end
        line = one_line_error(capsys, ["train", *TINY_TRAIN, "--steps", "100000", *args])
        assert message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "file"]
    assert list(a_dir.iterdir()) == []


def test_check_output_path_names_the_option(tmp_path):
    assert check_output_path(tmp_path / "x.npz", "--out") == tmp_path / "x.npz"
    with pytest.raises(ValueError, match="--log '.*' is a directory"):
        check_output_path(tmp_path, "--log")


def test_a_failed_write_replaces_nothing_and_leaves_no_temporary(tmp_path):
    old_a, old_b = tmp_path / "a.npz", tmp_path / "a.json"
    old_a.write_bytes(b"old a")
    old_b.write_bytes(b"old b")

    def fails(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_files_atomically([(old_a, lambda f: f.write(b"new a")), (old_b, fails)])
    assert old_a.read_bytes() == b"old a" and old_b.read_bytes() == b"old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.npz"]
    write_files_atomically([(old_a, lambda f: f.write(b"new a")),
                            (old_b, lambda f: f.write(b"new b"))])
    assert old_a.read_bytes() == b"new a" and old_b.read_bytes() == b"new b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.npz"]


def test_written_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_files_atomically([(tmp_path / "n", lambda f: f.write(b"x"))])
    finally:
        os.umask(umask)
    assert (tmp_path / "n").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------------------------
# Threads and warnings


def test_threads_bound_kernels_and_blas_and_are_logged(tmp_path, capsys):
    import selattn_c
    if not selattn_c.extension_built():
        pytest.skip("the kernels' threads need the C extension")
    assert main(["train", *TINY_TRAIN[:-2], "--threads", "2", "--steps", "2", "--eval-every",
                 "2", "--quiet", "--backend", "c", "--out", str(tmp_path / "m.npz")]) == 0
    log = json.loads((tmp_path / "m.json").read_text())
    expected = 2 if selattn_c.openmp_enabled() else 1
    assert log["threads"]["kernels"] == expected
    assert all(b["threads"] == 2 for b in log["threads"]["blas"])
    assert log["sessions"][0]["threads"] == log["threads"]


def test_a_schedule_that_cannot_warm_up_is_warned_about(tmp_path, capsys):
    assert main(["train", *TINY_TRAIN, "--steps", "2", "--eval-every", "2",
                 "--warmup-steps", "50", "--out", str(tmp_path / "m.npz")]) == 0
    err = capsys.readouterr().err
    assert "warning: the schedule cannot complete its warm-up: steps (2) <= warmup_steps (50)" \
        in err
    assert json.loads((tmp_path / "m.json").read_text())["warnings"]
