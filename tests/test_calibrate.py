"""The greedy budget search (selattn_lm.calibrate) against synthetic score functions, where the
right answer is known: each layer needs a known number of slots, and fewer slots in any layer
loses accuracy. The calibration of a real checkpoint is tested in tests/test_runner.py and
tests/test_demo.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selattn_lm.calibrate import (
    Score,
    candidate_budgets,
    greedy_calibrate,
    read_budgets,
    write_budgets,
)
from selattn_reference.validation import check_budgets

QUIET = dict(log=lambda line: None)


def threshold_score(need, context, calls=None):
    """Accuracy 1 when every layer has at least ``need[l]`` slots, else 0.5; the loss grows a
    little as budgets shrink (so ties in accuracy are broken by it, as on a real model)."""
    def score(budgets):
        if calls is not None:
            calls.append(tuple(budgets))
        ok = all(b >= n for b, n in zip(budgets, need))
        loss = sum(context / b for b in budgets) * 1e-3
        return Score(accuracy=1.0 if ok else 0.5, loss=loss)
    return score


@st.composite
def problems(draw):
    n_layers = draw(st.integers(1, 4))
    context = draw(st.integers(2, 300))
    need = draw(st.lists(st.integers(2, context), min_size=n_layers, max_size=n_layers))
    fractions = draw(st.lists(st.floats(0.05, 0.95), min_size=1, max_size=3))
    return n_layers, context, need, fractions


@given(problems())
def test_finds_a_local_optimum_that_keeps_accuracy(problem):
    n_layers, context, need, fractions = problem
    calls = []
    result = greedy_calibrate(threshold_score(need, context, calls), n_layers, context,
                              fractions=fractions, **QUIET)
    assert result.unpruned == Score(1.0, n_layers * 1e-3)
    assert result.final.accuracy == 1.0
    assert all(n <= b <= context for b, n in zip(result.budgets, need))
    # local optimality: every single-layer reduction the schedule offers would lose accuracy
    for layer, b in enumerate(result.budgets):
        assert all(c < need[layer] for c in candidate_budgets(b, fractions, 2))
    # each step changes one layer downwards; the last step's budgets are the result
    previous = [context] * n_layers
    for step in result.steps:
        changed = [l for l in range(n_layers) if step.budgets[l] != previous[l]]
        assert changed == [step.layer]
        assert step.old == previous[step.layer] > step.new == step.budgets[step.layer]
        previous = list(step.budgets)
    assert previous == result.budgets
    assert len(calls) == len(set(calls)) == result.evaluations   # memoised


@given(st.integers(2, 10_000), st.lists(st.floats(0.01, 0.99), min_size=1, max_size=4),
       st.integers(2, 50))
def test_candidates_are_reductions_at_or_above_the_minimum(budget, fractions, minimum):
    cands = candidate_budgets(budget, fractions, minimum)
    assert cands == sorted(set(cands))
    assert all(minimum <= c < budget for c in cands)
    if budget > minimum:
        assert cands, "a layer above the minimum always has a candidate"


def test_picks_the_reduction_that_hurts_least():
    # shrinking layer 0 costs ten times more loss than shrinking layer 1: layer 1 goes first
    def score(budgets):
        return Score(1.0, 0.1 * (64 - budgets[0]) + 0.01 * (64 - budgets[1]))

    result = greedy_calibrate(score, 2, 64, fractions=(0.5,), **QUIET)
    assert [s.layer for s in result.steps[:5]] == [1, 1, 1, 1, 1]
    assert result.budgets == [2, 2]        # accuracy never drops, so both reach the minimum


def test_accuracy_tolerance_is_respected():
    # every halving of any layer costs 0.3 points; a tolerance of 1 point allows three halvings
    def score(budgets):
        halvings = sum(6 - b.bit_length() + 1 for b in budgets)     # 64 -> 0 halvings
        return Score(1.0 - 0.003 * halvings, 0.0)

    result = greedy_calibrate(score, 2, 64, tolerance=0.01, fractions=(0.5,), **QUIET)
    assert len(result.steps) == 3
    assert result.final.accuracy == pytest.approx(0.991)
    zero = greedy_calibrate(score, 2, 64, tolerance=0.0, fractions=(0.5,), **QUIET)
    assert zero.budgets == [64, 64] and zero.steps == []


def test_loss_criterion():
    def score(budgets):
        return Score(1.0, sum(64 / b for b in budgets))       # unpruned loss 2

    result = greedy_calibrate(score, 2, 64, tolerance=2.0, criterion="loss", fractions=(0.5,),
                              **QUIET)
    assert result.final.loss <= 4.0
    assert sorted(result.budgets) == [32, 32]    # 64/32 + 64/32 = 4; any further halving: 5


def test_equal_scores_prefer_the_larger_saving():
    result = greedy_calibrate(lambda b: Score(1.0, 0.0), 1, 100, fractions=(0.5, 0.9), **QUIET)
    assert [s.new for s in result.steps] == [50, 25, 12, 6, 3, 2]


def test_progress_goes_to_the_log():
    lines = []
    greedy_calibrate(threshold_score([8, 8], 32), 2, 32, log=lines.append)
    assert lines[0].startswith("calibrate: unpruned accuracy 1.0000")
    assert "layer" in lines[1] and lines[-1].startswith("calibrate: done: budgets [")


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(n_layers=0), ValueError, "n_layers"),
    (dict(n_layers=2.0), TypeError, "n_layers"),
    (dict(context=1), ValueError, "context"),
    (dict(minimum=1), ValueError, "budget 1 is too small"),
    (dict(tolerance=-0.1), ValueError, "tolerance"),
    (dict(tolerance="0.1"), TypeError, "tolerance"),
    (dict(criterion="perplexity"), ValueError, "criterion"),
    (dict(fractions=(0.5, 1.0)), ValueError, "fractions"),
    (dict(fractions=()), ValueError, "fractions"),
    (dict(fractions=None), TypeError, "fractions"),
])
def test_bad_arguments_are_refused(kwargs, error, words):
    args = dict(score=threshold_score([2, 2], 16), n_layers=2, context=16, **QUIET)
    args.update(kwargs)
    with pytest.raises(error, match=words):
        greedy_calibrate(**args)


def test_score_must_return_a_score():
    with pytest.raises(TypeError, match="score must return a Score"):
        greedy_calibrate(lambda b: 1.0, 2, 16, **QUIET)


def test_budgets_file_round_trip(tmp_path):
    result = greedy_calibrate(threshold_score([5, 9], 40), 2, 40, **QUIET)
    path = tmp_path / "m.budgets.json"
    write_budgets(path, result, {"checkpoint": "m.npz"})
    data = json.loads(path.read_text())
    assert data["checkpoint"] == "m.npz" and data["context"] == 40
    assert data["kept_fraction"] == pytest.approx(sum(result.budgets) / 80)
    assert len(data["steps"]) == len(result.steps)
    assert read_budgets(path, 2) == result.budgets


@pytest.mark.parametrize("content, words", [
    (None, "does not exist"),
    ("{not json", "not readable JSON"),
    ('{"budget": [4, 4]}', "no 'budgets' entry"),
    ('{"budgets": [4, 4, 4]}', "one entry per layer"),
    ('{"budgets": [4, 1]}', r"budgets\[1\]: budget 1 is too small"),
    ('{"budgets": [4, 2.5]}', r"budgets\[1\]: budget must be an int"),
    ('{"budgets": [4, null]}', "every layer needs an int budget"),
    ('{"budgets": "4 4"}', "sequence of per-layer ints"),
])
def test_bad_budgets_files_are_refused(tmp_path, content, words):
    path = tmp_path / "b.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=words):
        read_budgets(path, 2)


@pytest.mark.parametrize("content, words", [
    ("[" * 100_000 + "]" * 100_000, "nested 100000 levels deep"),     # was a RecursionError
    ('{"budgets": [' * 40 + "]}" * 40, "nested 80 levels deep"),
    ('{"budgets": [4, ' + "9" * 5000 + "]}", "an integer of 5000 digits"),
    ('{"budgets": [4, NaN]}', "NaN is not JSON"),
    ('{"budgets": [4, 1e999]}', "overflows a float"),
    ('{"budgets": [4, 4]}' + " " * (1 << 21), "larger than 1048576 bytes"),
    (b'{"budgets": [4, 4], "x": "\xff"}', "not UTF-8"),
    ("DIRECTORY", "not readable"),
])
def test_hostile_budgets_files_give_one_error_naming_the_file(tmp_path, content, words):
    """Issue 27, item 3: a deeply nested, huge or absurd budgets file is refused with a
    ValueError naming the file, read with bounded memory; never a RecursionError/MemoryError."""
    path = tmp_path / "b.json"
    if content == "DIRECTORY":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=words) as info:
        read_budgets(path, 2)
    assert "budgets file" in str(info.value) and "b.json" in str(info.value)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_budgets_file_without_end_is_refused_after_a_bounded_read():
    with pytest.raises(ValueError, match="'/dev/zero' is not readable JSON: larger than"):
        read_budgets("/dev/zero", 2)


def test_check_budgets_names_the_problem():
    assert check_budgets([None, 3], 2) == [None, 3]
    with pytest.raises(ValueError, match="one entry per layer"):
        check_budgets([4], 2)
    with pytest.raises(TypeError, match=r"budgets\[0\]"):
        check_budgets(["4", 4], 2)
    with pytest.raises(TypeError, match="sequence"):
        check_budgets(4, 2)
