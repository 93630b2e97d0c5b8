"""Training on text (``selattn_lm.task_text`` through the one loop of ``selattn_lm.training``),
``selattn train --task text`` and the budget curve of ``selattn text-results``, on a small dump
written by the test (seconds, not minutes)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from selattn_lm import model as lm
from selattn_lm.checkpoint import CheckpointError, save_checkpoint
from selattn_lm.task_registry import load_task_checkpoint
from selattn_lm.task_text import TextTask, bits_per_byte
from selattn_lm.text import ByteTokenizer, eval_windows, load_corpus, random_windows
from selattn_lm import text_results
from selattn_lm.cli import main
from selattn_lm.training import TrainConfig, save_run, train

from test_text_data import write_dump

TINY = dict(n_layers=2, n_heads=2, d_model=16, context=32, steps=6, batch_size=4,
            eval_every=3, warmup_steps=2)
TINY_CLI = ["--n-layers", "2", "--n-heads", "2", "--d-model", "16", "--context", "32",
            "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--eval-windows", "4",
            "--warmup-steps", "2", "--threads", "1"]


def text_config(dump, **kwargs) -> TrainConfig:
    return TrainConfig(task=TextTask(corpus_path=str(dump), eval_windows=4),
                       **dict(TINY, **kwargs))


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    return write_dump(tmp_path_factory.mktemp("corpus") / "dump.xml.bz2", compress=True)


def test_uniform_model_scores_log2_of_the_vocabulary(dump):
    cfg = text_config(dump).model_config()
    params = lm.init_params(cfg, seed=0)
    for name in params:                      # every logit 0: a uniform next-byte distribution
        params[name][...] = 0.0
    tokens, targets = eval_windows(load_corpus(dump).valid, 32)
    assert bits_per_byte(params, cfg, tokens, targets) == pytest.approx(
        math.log2(ByteTokenizer.vocab_size), rel=1e-6)


def test_batches_and_windows_are_the_texts_own():
    """The task's batches are ``random_windows`` of the train split from the same generator, and
    its validation windows ``eval_windows``: encoding once per corpus changes nothing."""
    pytest.importorskip("gensim")
    task = TextTask(eval_windows=3)
    text = load_corpus()
    tokens, targets, mask = task.batch(np.random.default_rng(7), 5, 64)
    want = random_windows(text.train, 5, 64, np.random.default_rng(7))
    assert mask is None and np.array_equal(tokens, want[0]) and np.array_equal(targets, want[1])
    got = task.windows("valid", 64, 3)
    want = eval_windows(text.valid, 64, 3)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_spread_windows_cover_the_split_evenly(dump):
    """``windows(spread=True)`` (the study's test sample) keeps windows evenly spaced over the
    whole split, first and last included, distinct and in order; without ``max_windows`` or
    with more than the split holds it is every window, as without ``spread``."""
    task = TextTask(corpus="wiki", corpus_path=str(dump))
    every = task.windows("valid", 16)
    count = len(every[0])
    assert count >= 8
    for keep in (2, 3, count // 2, count - 1):
        tokens, targets = task.windows("valid", 16, keep, spread=True)
        starts = [round(i * (count - 1) / (keep - 1)) for i in range(keep)]   # the docstring's
        assert starts[0] == 0 and starts[-1] == count - 1
        assert all(b > a for a, b in zip(starts, starts[1:]))          # distinct, in order
        gaps = np.diff(starts)
        assert gaps.max() - gaps.min() <= 1                          # evenly spaced
        assert np.array_equal(tokens, every[0][starts])
        assert np.array_equal(targets, every[1][starts])
    for keep in (None, count, count + 5):
        got = task.windows("valid", 16, keep, spread=True)
        assert np.array_equal(got[0], every[0]) and np.array_equal(got[1], every[1])
    first = task.windows("valid", 16, 1, spread=True)
    assert np.array_equal(first[0], every[0][:1])


def test_training_learns_and_is_reproducible(dump):
    cfg = text_config(dump, steps=30, eval_every=10, lr=1e-2)
    params, model_cfg, log = train(cfg, quiet=True)
    curve = [c["valid_bpb"] for c in log["curve"]]
    assert [c["step"] for c in log["curve"]] == [10, 20, 30]
    assert curve[-1] < curve[0] < math.log2(258)            # it learns something
    assert log["final_valid_bpb"] == curve[-1] and model_cfg.selective
    again, _, log2 = train(cfg, quiet=True)
    assert all(np.array_equal(params[n], again[n]) for n in params)
    assert [c["valid_bpb"] for c in log2["curve"]] == curve


def test_standard_model_has_no_memory_loss(dump):
    _, model_cfg, log = train(text_config(dump, standard=True), quiet=True)
    assert not model_cfg.selective and model_cfg.eps == 0.0
    assert all(c["mem"] == 0.0 and c["eps"] == 0.0 for c in log["curve"])


@pytest.mark.parametrize("kwargs, error", [
    ({"context": 1}, ValueError), ({"d_model": 15}, ValueError), ({"lr": 0.0}, ValueError),
    ({"steps": 1.5}, TypeError), ({"eps": float("nan")}, ValueError),
    ({"min_lr": 1.0}, ValueError),
])
def test_bad_settings(kwargs, error):
    with pytest.raises(error):
        TrainConfig(task=TextTask(), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"corpus": "nonesuch"}, "unknown corpus 'nonesuch'; the corpora are: python-code, wiki"),
    ({"eval_windows": 0}, "eval_windows must be an int >= 1"),
    ({"corpus_path": 3}, "corpus_path must be a str"),
])
def test_bad_task_settings(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        TextTask(**kwargs)


def test_checkpoint_round_trip_and_task_check(dump, tmp_path):
    cfg = text_config(dump)
    params, model_cfg, log = train(cfg, quiet=True)
    log_path = save_run(params, model_cfg, log, tmp_path / "m.npz")
    assert json.loads(log_path.read_text())["task"]["corpus"] == "wiki"
    loaded, loaded_cfg, task, extra = load_task_checkpoint(tmp_path / "m.npz", expect="text")
    assert loaded_cfg == model_cfg and task == cfg.task
    assert TrainConfig.from_dict(extra["train_config"]) == cfg
    other = tmp_path / "assign.npz"
    save_checkpoint(other, params, model_cfg, extra={"task": {"name": "assign", "n_vars": 3}})
    with pytest.raises(CheckpointError, match="assign.npz is a model of the 'assign' task; this "
                                              "needs a model of the 'text' task"):
        load_task_checkpoint(other, expect="text")


def test_a_text_checkpoint_given_to_an_assign_command_is_one_clear_line(dump, tmp_path, capsys):
    params, model_cfg, log = train(text_config(dump, steps=1, eval_every=1), quiet=True)
    save_run(params, model_cfg, log, tmp_path / "t.npz")
    assert main(["plot", str(tmp_path / "t.npz"), "a=1;a="]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a model of the 'text' task" in err[0], err


def test_the_bundled_text_checkpoints_load_as_text_models():
    """Written before tasks had names, they still load as the text task."""
    for name in ("selective", "standard"):
        _, cfg, task, _ = load_task_checkpoint(text_results.DATA / f"text-{name}.npz",
                                               expect="text")
        assert task == TextTask() and cfg.context == 256


# ----------------------------------------------------------------------------------------------
# The command line


def test_cli_train_text(dump, tmp_path, capsys):
    assert main(["train", "--task", "text", "--corpus-path", str(dump), *TINY_CLI,
                 "--out", str(tmp_path / "t.npz")]) == 0
    out = capsys.readouterr()
    assert "selective model on text (corpus wiki): valid_bpb" in out.out and "bpb" in out.out
    bar = [line for line in out.err.splitlines() if line.startswith("step ")]
    assert len(bar) == 2 and "bpb" in bar[-1]
    log = json.loads((tmp_path / "t.json").read_text())
    assert log["task"]["name"] == "text" and log["train_config"]["context"] == 32
    assert log["train_config"]["n_layers"] == 2
    assert main(["eval", str(tmp_path / "t.npz"), "--json", "--threads", "1"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["task"] == "text" and scored["n"] == 4
    assert scored["valid_bpb"] == pytest.approx(log["final_valid_bpb"], rel=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--task", "text", "--corpus-path", "missing.xml"], "does not exist"),
    (["--task", "text", "--corpus", "bogus"], "invalid choice: 'bogus'"),
    (["--task", "text", "--n-vars", "5"], "--n-vars is an option of --task assign"),
    (["--task", "text", "--heldout-size", "5"], "--heldout-size is an option of --task assign"),
    (["--corpus-path", "x.xml"], "--corpus-path is an option of --task text"),
    (["--task", "text", "--context", "1"], "context must be >= 2"),
])
def test_cli_train_text_errors(args, message, tmp_path, capsys):
    assert main(["train", *args, "--steps", "1", "--out", str(tmp_path / "x.npz")]) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The budget curve


def test_path_helpers():
    path = [((8, 8), 1.0), ((4, 8), 1.005), ((4, 4), 1.02), ((2, 4), 1.3)]
    assert text_results.budgets_on_path(path, 8, 0.75) == (4, 8)
    assert text_results.budgets_on_path(path, 8, 0.5) == (4, 4)
    assert text_results.budgets_on_path(path, 8, 0.1) is None
    assert text_results.calibrated_on_path(path, 1.0, 0.01) == ((4, 8), 1.005)
    assert text_results.calibrated_on_path(path, 1.0, 0.0) == ((8, 8), 1.0)


def test_search_path_goes_down_to_the_minimum():
    calls = []

    def score(budgets):
        calls.append(budgets)
        return 1.0 + sum(1.0 / b for b in budgets)          # smaller caches cost more
    path = text_results.search_path(score, 2, 16)
    assert path[0] == ((16, 16), score((16, 16)))
    assert path[-1][0] == (2, 2)
    sizes = [sum(b) for b, _ in path]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


@pytest.fixture(scope="module")
def tiny_models(dump, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for standard in (False, True):
        cfg = text_config(dump, steps=20, standard=standard, lr=1e-2)
        params, model_cfg, log = train(cfg, quiet=True)
        paths[standard] = folder / f"{'standard' if standard else 'selective'}.npz"
        save_run(params, model_cfg, log, paths[standard])
    return paths[False], paths[True]


def test_text_results_end_to_end(dump, tiny_models, tmp_path, capsys):
    import selattn_c
    if not selattn_c.extension_built():
        pytest.skip("text-results runs the C kernels")
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{text_results.TABLE_BEGIN}\nold\n{text_results.TABLE_END}\noutro\n")
    sel, std = tiny_models
    assert main(["text-results", "--selective", str(sel), "--standard", str(std),
                 "--corpus", str(dump), "--test-windows", "6", "--valid-windows", "3",
                 "--json", str(tmp_path / "r.json"), "--png", str(tmp_path / "r.png"),
                 "--update-doc", str(doc), "--threads", "1"]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["test_windows"] == 6 and results["context"] == 32
    assert [r["slots"] for r in results["rows"]] == [16, 8, 4, 2, 2]
    full = results["full"]["selective"]
    for r in results["rows"]:
        assert all(math.isfinite(r[k]) for k in ("selective_uniform", "standard_window",
                                                 "standard_h2o"))
    assert results["search_path"][0]["budgets"] == [32, 32]
    assert results["calibrated"]["valid_bpb"] <= results["calibrated"]["valid_bpb_full"] * 1.01
    text = doc.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert f"| full | 32 | {full:.3f}" in text
    assert "| KV cache | slots |" in capsys.readouterr().out


def test_text_results_refuses_swapped_models(dump, tiny_models, tmp_path):
    import selattn_c
    if not selattn_c.extension_built():
        pytest.skip("text-results runs the C kernels")
    sel, std = tiny_models
    with pytest.raises(ValueError, match="must be a selective model"):
        text_results.evaluate(std, sel, corpus=str(dump), test_windows=2, valid_windows=2)


def test_corpus_command_lists_the_corpora(capsys):
    assert main(["corpus", "list"]) == 0
    out = capsys.readouterr().out
    assert "python-code (" in out and "wiki (" in out and "licence: BSD-3-Clause" in out
    assert main(["corpus", "fetch", "nonesuch"]) == 2
    assert "invalid choice: 'nonesuch'" in capsys.readouterr().err
