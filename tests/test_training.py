"""Tests of the training loop (selattn_lm.training) on the variable-assignment task: schedules,
settings, exact-match scoring, reproducibility, the log and the checkpoint's task settings.
(Resume, signals and output paths: tests/test_training_resume.py; text: test_text_training.py.)"""

from __future__ import annotations

import io
import json
import math
from dataclasses import fields
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from selattn_lm import task_assign, training
from selattn_lm.progress import TrainingProgress
from selattn_lm.task_assign import AssignTask, answer_accuracy
from selattn_lm.training import (
    TrainConfig,
    evaluate_checkpoint,
    learning_rate,
    memory_loss_weight,
    save_run,
    train,
)
from selattn_lm.checkpoint import load_checkpoint
from selattn_lm.tasks import CharTokenizer, TaskConfig, encode_batch, make_split
import selattn_lm

TASK_FIELDS = {f.name for f in fields(AssignTask)}


def make(**kwargs) -> TrainConfig:
    """TrainConfig from flat settings: the task's fields go to its AssignTask."""
    task = AssignTask(**{k: kwargs.pop(k) for k in list(kwargs) if k in TASK_FIELDS})
    return TrainConfig(task=task, **kwargs)


# A model and task small enough that a run of a few dozen steps takes a second or two.
TINY = dict(n_vars=2, n_assignments=3, max_value=9, n_layers=2, n_heads=2, d_model=16,
            batch_size=16, heldout_size=40, eval_every=10, steps=20, warmup_steps=5)


@st.composite
def schedules(draw) -> TrainConfig:
    steps = draw(st.integers(1, 500))
    lr = draw(st.floats(1e-5, 1e-1))
    return make(steps=steps, lr=lr, min_lr=draw(st.floats(0, 1)) * lr,
                       warmup_steps=draw(st.integers(0, steps)),
                       eps=draw(st.floats(0, 1)), eps_start=draw(st.integers(0, steps)),
                       eps_ramp=draw(st.integers(0, steps)), standard=draw(st.booleans()))


@given(schedules())
def test_learning_rate_warms_up_then_decays_to_min_lr(cfg):
    rates = [learning_rate(s, cfg) for s in range(cfg.steps)]
    tol = 1e-12 * cfg.lr
    w = cfg.warmup_steps
    assert all(0 < r <= cfg.lr + tol for r in rates[:w])                  # warmup from ~0
    assert all(cfg.min_lr - tol <= r <= cfg.lr + tol for r in rates[w:])
    assert all(a < b for a, b in zip(rates[:w], rates[1:w]))             # warmup: increasing
    assert all(a >= b - tol for a, b in zip(rates[w:], rates[w + 1:]))   # then non-increasing
    if w < cfg.steps:
        assert rates[w] == pytest.approx(cfg.lr)                           # peak after warmup
        if cfg.steps - w > 1:
            assert learning_rate(cfg.steps, cfg) == pytest.approx(cfg.min_lr)


@given(schedules())
def test_memory_loss_weight_is_off_then_ramps_to_eps(cfg):
    weights = [memory_loss_weight(s, cfg) for s in range(cfg.steps + cfg.eps_ramp + 1)]
    if cfg.standard:
        assert all(w == 0.0 for w in weights)
        return
    assert all(w == 0.0 for w in weights[:cfg.eps_start])
    assert all(a <= b for a, b in zip(weights, weights[1:]))
    assert all(0.0 <= w <= cfg.eps for w in weights)
    assert weights[cfg.eps_start + max(cfg.eps_ramp, 1) - 1] == pytest.approx(cfg.eps)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"), (dict(batch_size=-1), "batch_size"), (dict(lr=0.0), "lr"),
    (dict(lr=1e-3, min_lr=1e-2), "min_lr"), (dict(eps=-0.1), "eps"),
    (dict(eps=float("nan")), "eps"), (dict(d_model=30, n_heads=4), "d_model"),
    (dict(n_vars=0), "n_vars"), (dict(context=10), "context"), (dict(steps=1.5), "steps"),
    (dict(train_min_assignments=21), "train_min_assignments"),
    (dict(soft_budgets=[4]), "soft_budgets must have one entry per layer"),
    (dict(soft_budgets=8), "soft_budgets must be a sequence"),
    (dict(soft_budgets=[1, 4]), "budget 1 is too small"),
    (dict(soft_budgets=[4, 4], standard=True), "need a selective model"),
    (dict(soft_share=1.5), "soft_share"), (dict(soft_strength=-1.0), "soft_strength"),
])
def test_bad_settings_name_the_setting(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make(**kwargs)


def test_settings_round_trip():
    cfg = make(steps=7, eps=0.3, standard=True, train_min_assignments=2)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    soft = make(soft_budgets=(5, 7), soft_strength=3.0, soft_share=0.5)
    assert soft.soft_budgets == [5, 7]
    assert TrainConfig.from_dict(json.loads(json.dumps(soft.to_dict()))) == soft
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict(dict(cfg.to_dict(), momentum=0.9))


@given(st.integers(1, 20), st.integers(0, 2**32 - 1))
def test_training_batches_vary_in_length_within_bounds(lo, seed):
    cfg = make(n_assignments=20, train_min_assignments=lo)
    rng = np.random.default_rng(seed)
    sizes = {cfg.task.train_task(rng).n_assignments for _ in range(50)}
    assert min(sizes) >= lo and max(sizes) <= 20
    assert cfg.task.train_task() == cfg.task.config()     # without a generator: the task


@given(st.lists(st.integers(0, 2), min_size=1, max_size=12), st.integers(0, 2**32 - 1))
def test_exact_match_needs_every_answer_character(kinds, seed):
    """answer_accuracy against a fake model whose predictions are built per example: right
    everywhere (0), wrong only outside the answer (1, must still count), wrong at one answer
    character (2, must not count)."""
    task = TaskConfig(n_vars=3, n_assignments=4, max_value=99)
    tok = CharTokenizer.for_task(task)
    examples = make_split(task, len(kinds), seed)
    tokens, targets, mask = encode_batch(tok, examples, task.max_tokens)
    rng = np.random.default_rng(seed)
    predicted = targets.copy()
    for b, kind in enumerate(kinds):
        where = np.flatnonzero(~mask[b] if kind == 1 else mask[b])
        t = rng.choice(where)
        predicted[b, t] = (predicted[b, t] + 1 + rng.integers(0, tok.vocab_size - 1)) \
            % tok.vocab_size if kind else predicted[b, t]
    logits = np.eye(tok.vocab_size, dtype=np.float32)[predicted]            # (B, T, V)

    def fake_forward(params, cfg, batch_tokens, **kwargs):
        assert np.array_equal(batch_tokens, tokens[:len(batch_tokens), :batch_tokens.shape[1]])
        return logits[:len(batch_tokens), :batch_tokens.shape[1]], None, None

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(task_assign.lm, "forward", fake_forward)
        acc = answer_accuracy({}, SimpleNamespace(context=task.max_tokens), tok, examples,
                              batch_size=len(examples))
    expected = sum(kind != 2 for kind in kinds) / len(kinds)
    assert acc == expected


def test_progress_off_a_terminal_prints_one_line_per_evaluation():
    """Off a terminal the bar is off and each evaluation is one line with the step, the mean
    loss since the last evaluation and the metric; warnings go through it too."""
    stream = io.StringIO()
    bar = TrainingProgress(200, 0, "heldout_accuracy", AssignTask.format_metric, stream=stream)
    for _ in range(100):
        bar.step(0.5)
    bar.evaluation(100, 0.5, 0.875, 10.0)
    bar.write("warning: something")
    bar.evaluation(200, 0.25, 0.99, 20.0)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert "step 100/200" in lines[0] and "loss 0.5000" in lines[0] and "87.5%" in lines[0]
    assert lines[1] == "warning: something"
    assert "step 200/200" in lines[2] and "99.0%" in lines[2]
    quiet = io.StringIO()
    bar = TrainingProgress(10, 0, "m", str, quiet=True, stream=quiet)
    bar.evaluation(10, 1.0, 1.0, 1.0)
    bar.write("nothing")
    assert quiet.getvalue() == ""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = make(**TINY, eps=0.05, seed=3)
    params, model_cfg, log = train(cfg, backend="auto", quiet=True)
    path = tmp_path_factory.mktemp("run") / "tiny.npz"
    log_path = save_run(params, model_cfg, log, path)
    return cfg, params, model_cfg, log, path, log_path


def test_log_holds_the_curve_config_seed_and_times(tiny_run):
    cfg, params, model_cfg, log, path, log_path = tiny_run
    on_disk = json.loads(log_path.read_text())
    assert on_disk["train_config"] == cfg.to_dict() and on_disk["seed"] == 3
    assert on_disk["checkpoint"] == path.name
    curve = on_disk["curve"]
    assert [c["step"] for c in curve] == [10, 20]
    assert all(0.0 <= c["heldout_accuracy"] <= 1.0 for c in curve)
    assert all(math.isfinite(c["loss"]) and c["loss"] > 0 for c in curve)
    assert 0 < curve[0]["seconds"] <= curve[1]["seconds"] == on_disk["train_seconds"]
    assert on_disk["wall_seconds"] >= on_disk["train_seconds"]
    assert on_disk["final_heldout_accuracy"] == curve[-1]["heldout_accuracy"]
    assert on_disk["num_params"] == sum(p.size for p in params.values())


def test_checkpoint_carries_the_task_and_reproduces_the_accuracy(tiny_run):
    cfg, params, model_cfg, log, path, _ = tiny_run
    loaded, loaded_cfg, extra = load_checkpoint(path)
    assert loaded_cfg == model_cfg and loaded_cfg.selective and loaded_cfg.eps == 0.05
    assert extra["task"] == dict(cfg.task.settings(), name="assign")
    assert AssignTask.from_settings(extra["task"]) == cfg.task
    assert all(np.array_equal(loaded[k], params[k]) for k in params)
    result = evaluate_checkpoint(path, backend=log["backend"])
    assert result["n"] == cfg.task.heldout_size and result["task"] == "assign"
    assert result["heldout_accuracy"] == log["final_heldout_accuracy"]
    with pytest.raises(ValueError, match="is a model of the 'assign' task; this needs a model "
                                         "of the 'text' task"):
        evaluate_checkpoint(path, expect="text")


def test_same_seed_same_run_different_seed_different_run(tiny_run):
    cfg, params, _, log, _, _ = tiny_run
    again, _, log_again = train(cfg, backend=log["backend"], quiet=True)
    assert all(np.array_equal(again[k], params[k]) for k in params)
    assert [c["loss"] for c in log_again["curve"]] == [c["loss"] for c in log["curve"]]
    other, _, _ = train(make(**dict(TINY, steps=2, eval_every=2, seed=4)),
                        backend=log["backend"], quiet=True)
    first, _, _ = train(make(**dict(TINY, steps=2, eval_every=2, seed=3)),
                        backend=log["backend"], quiet=True)
    assert not np.array_equal(other["wte"], first["wte"])


def test_standard_baseline_has_no_memory_loss():
    cfg = make(**dict(TINY, steps=3, eval_every=3), standard=True, eps=0.5)
    _, model_cfg, log = train(cfg, quiet=True)
    assert not model_cfg.selective and model_cfg.eps == 0.0
    assert all(c["mem"] == 0.0 and c["eps"] == 0.0 for c in log["curve"])


def test_training_learns_the_single_assignment_task():
    """One variable, one assignment: the answer is a copy of the value. A tiny model must learn
    that, on values it never saw (a broken gradient, schedule or target mask leaves it near 0)."""
    cfg = make(n_vars=1, n_assignments=1, max_value=99, n_layers=2, n_heads=2,
                      d_model=32, batch_size=32, steps=120, lr=1e-2, warmup_steps=10,
                      heldout_size=20, eval_every=120, eps=0.0)
    _, _, log = train(cfg, quiet=True)
    assert log["final_heldout_accuracy"] == 1.0


@pytest.mark.parametrize("name, selective", [("selective", True), ("standard", False),
                                             ("selective-2layer", True),
                                             ("standard-2layer", False)])
def test_shipped_checkpoints_score_what_their_logs_say(name, selective):
    """The installed checkpoints (docs/results.md) load, carry their task, and still score
    exactly the held-out accuracy their training logs recorded."""
    from pathlib import Path
    data = Path(selattn_lm.__file__).parent / "data"
    log = json.loads((data / f"{name}.json").read_text())
    result = evaluate_checkpoint(data / f"{name}.npz", backend=log["backend"])
    assert result["selective"] is selective
    assert result["n"] == log["heldout_size"]
    assert result["heldout_accuracy"] == log["final_heldout_accuracy"]


# ----------------------------------------------------------------------------------------------
# Starting from a checkpoint, and growing it by a layer


@pytest.mark.parametrize("at", [0, 1, 2])
def test_inserted_identity_block_leaves_the_logits_unchanged(tiny_run, at):
    """A block with zero output projections adds exactly 0 to the residual stream, wherever it
    goes: the grown model's logits are the checkpoint's, bit for bit."""
    from selattn_lm import model as lm
    cfg, params, model_cfg, _, _, _ = tiny_run
    grown, grown_cfg = training.insert_identity_block(params, model_cfg, at, seed=1)
    assert grown_cfg.n_layers == model_cfg.n_layers + 1
    tokens = np.random.default_rng(0).integers(2, model_cfg.vocab_size,
                                               (3, model_cfg.context))
    want = lm.forward(params, model_cfg, tokens)[0]
    got = lm.forward(grown, grown_cfg, tokens)[0]
    np.testing.assert_array_equal(got, want)
    assert grown[f"h{at}.attn.wqkv"].any() and not grown[f"h{at}.mlp.w2"].any()
    with pytest.raises(ValueError, match="at must be in"):
        training.insert_identity_block(params, model_cfg, model_cfg.n_layers + 1)


def test_training_from_a_checkpoint_with_an_inserted_layer(tiny_run):
    """--init-from with --insert-layer starts from the checkpoint's accuracy (the new layer is
    an identity), trains the 3-layer model and records where it started."""
    cfg, _, _, log, path, _ = tiny_run
    grown = make(**dict(TINY, n_layers=3, steps=10, eval_every=10, seed=5),
                        init_from=str(path), insert_layer=1)
    params, model_cfg, grown_log = train(grown, quiet=True)
    assert model_cfg.n_layers == 3 and "h2.mlp.w2" in params
    assert grown_log["train_config"]["init_from"] == str(path)
    assert grown_log["train_config"]["insert_layer"] == 1
    unchanged = make(**dict(TINY, steps=1, eval_every=1, lr=1e-12, min_lr=0.0,
                                   warmup_steps=0, weight_decay=0.0), init_from=str(path))
    _, _, same_log = train(unchanged, quiet=True)        # a step too small to move anything
    assert same_log["final_heldout_accuracy"] == log["final_heldout_accuracy"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_layers=2, insert_layer=1), "do not describe the checkpoint .*n_layers"),
    (dict(n_layers=3), "do not describe the checkpoint .*n_layers"),
    (dict(n_layers=3, insert_layer=1, d_model=32), "d_model: checkpoint 16, settings 32"),
    (dict(n_layers=3, insert_layer=1, max_value=8), "trained on"),
])
def test_a_checkpoint_that_does_not_match_the_settings_is_refused(tiny_run, kwargs, match):
    path = tiny_run[4]
    cfg = make(**dict(TINY, steps=1, **{k: v for k, v in kwargs.items()
                                               if k != "insert_layer"}),
                      init_from=str(path), insert_layer=kwargs.get("insert_layer"))
    with pytest.raises(ValueError, match=match):
        train(cfg, quiet=True)


def test_insert_layer_needs_init_from_and_a_layer_index_in_range():
    with pytest.raises(ValueError, match="insert_layer needs init_from"):
        make(insert_layer=0)
    with pytest.raises(ValueError, match="insert_layer must be in"):
        make(init_from="m.npz", insert_layer=2, n_layers=2)


def test_pruning_aware_training_changes_the_run_only_on_its_steps():
    """soft_share 0 draws no penalised step: the run is bit for bit the plain one. With the
    penalty on every step the same batches give other weights than a slope of 0 on the same
    (NumPy) attention; the log records the settings."""
    base = dict(TINY, steps=6, eval_every=6, seed=4)
    plain, _, _ = train(make(**base), quiet=True)
    none, _, _ = train(make(**base, soft_budgets=[3, 3], soft_share=0.0), quiet=True)
    flat, _, _ = train(make(**base, soft_budgets=[3, 3], soft_strength=0.0), quiet=True)
    soft, _, log = train(make(**base, soft_budgets=[3, 3], soft_strength=5.0), quiet=True)
    assert all(np.array_equal(none[k], plain[k]) for k in plain)
    assert any(np.abs(soft[k] - flat[k]).max() > 1e-4 for k in plain)
    assert log["train_config"]["soft_budgets"] == [3, 3]
    assert log["train_config"]["soft_strength"] == 5.0


def test_a_standard_checkpoint_can_be_fine_tuned_into_a_selective_model(tiny_run, tmp_path):
    """Selective attention adds no parameter: --init-from a standard model with the selective
    settings starts from its weights (its held-out score at step 0 is the standard model's
    under selection, not a fresh model's) and trains on with the memory loss."""
    std = make(**dict(TINY, steps=4, eval_every=4), standard=True)
    params, model_cfg, log = train(std, quiet=True)
    path = tmp_path / "std.npz"
    save_run(params, model_cfg, log, path)
    tuned_cfg = make(**dict(TINY, steps=1, eval_every=1, lr=1e-12, min_lr=0.0, warmup_steps=0,
                            weight_decay=0.0), init_from=str(path), eps=0.1)
    tuned, tuned_model_cfg, tuned_log = train(tuned_cfg, quiet=True)
    assert tuned_model_cfg.selective and tuned_log["curve"][0]["eps"] == 0.1
    assert all(np.abs(tuned[k] - params[k]).max() < 1e-6 for k in params)
