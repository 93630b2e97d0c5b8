"""The equal-perplexity memory factor (``selattn_lm.memory_factor``): the search against a brute
force on synthetic curves, its invariants on any curve, and its refusals. The factor on real
(tiny) models, where the answer is known by construction, is in tests/test_study.py."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selattn_lm.memory_factor import equal_quality_point, uniform_candidates


def counted(scores):
    """A score function reading ``scores[index]`` by the candidate's budget, counting calls."""
    calls = []

    def score(budgets):
        calls.append(budgets)
        return scores[budgets[0]]
    return score, calls


@given(st.integers(2, 300), st.integers(1, 3), st.data())
def test_monotone_curves_give_the_largest_reduction(context, n_layers, data):
    """Scores rising as the budget falls: the answer is the smallest budget at or below the
    target, found in about 2 log2(context) evaluations."""
    cands = uniform_candidates(context, n_layers)
    crossing = data.draw(st.integers(2, context + 1))          # budgets >= crossing pass
    scores = {K: (1.0 if K >= crossing else 2.0) + (context - K) * 1e-6
              for K in range(2, context + 1)}
    target = 1.5
    score, calls = counted(scores)
    point = equal_quality_point(cands, score, target)
    if crossing > context:
        assert point.index is None and point.factor is None and len(calls) == 1
        return
    assert point.budgets == (crossing,) * n_layers
    assert point.factor == pytest.approx(context / crossing)
    assert point.memory == crossing * n_layers and point.full_memory == context * n_layers
    assert len(calls) == len(set(calls)) <= 2 * math.ceil(math.log2(context)) + 2


@given(st.lists(st.integers(0, 20), min_size=1, max_size=80), st.integers(0, 20))
def test_invariants_on_any_curve(values, target):
    """Any curve (ties with the target included): the point passes, the next candidate fails
    (or there is none), and every candidate evaluated with more memory passed."""
    context = len(values) + 1
    cands = uniform_candidates(context, 2)
    scores = {K: values[K - 2] / 10 for K in range(2, context + 1)}
    target = target / 10
    score, _ = counted(scores)
    point = equal_quality_point(cands, score, target)
    evaluated = dict(point.evaluated)
    if point.index is None:
        assert scores[context] > target and list(evaluated) == [0]
        return
    assert point.score == scores[point.budgets[0]] <= target
    if point.index + 1 < len(cands):
        assert point.index + 1 in evaluated and evaluated[point.index + 1] > target
    assert all(s <= target for i, s in evaluated.items() if i <= point.index)


def test_per_layer_candidates_and_the_factor():
    """Candidates of unequal budgets (a per-layer path): the factor is the total memory ratio."""
    path = [(16, 16), (8, 16), (8, 12), (4, 12), (4, 9), (2, 9), (2, 6)]
    scores = {c: 1.0 + 0.1 * i for i, c in enumerate(path)}        # rises along the path
    point = equal_quality_point(path, scores.__getitem__, 1.35)
    assert point.budgets == (4, 12) and point.factor == pytest.approx(32 / 16)
    assert point.to_dict()["budgets"] == [4, 12] and point.to_dict()["factor"] == 2.0


def test_ties_at_the_target_pass():
    point = equal_quality_point(uniform_candidates(8, 1), lambda b: 1.0, 1.0)
    assert point.budgets == (2,) and point.factor == 4.0


@pytest.mark.parametrize("candidates, target, error", [
    ([], 1.0, ValueError),
    ([(4, 4), (4, 4)], 1.0, ValueError),                  # memory must decrease
    ([(4, 4), (2,)], 1.0, ValueError),                    # one budget per layer
    ([(4, 0)], 1.0, ValueError),
    ([(4.5,)], 1.0, ValueError),
    ([None], 1.0, TypeError),
    ([(4,)], float("nan"), ValueError),
    ([(4,)], "1", ValueError),
])
def test_refusals(candidates, target, error):
    with pytest.raises(error):
        equal_quality_point(candidates, lambda b: 1.0, target)


def test_a_non_finite_score_is_an_error():
    with pytest.raises(ValueError, match="not finite"):
        equal_quality_point([(4,), (2,)], lambda b: float("nan"), 1.0)


def test_uniform_candidates():
    assert uniform_candidates(4, 2) == [(4, 4), (3, 3), (2, 2)]
    with pytest.raises(ValueError):
        uniform_candidates(4, 0)
    with pytest.raises(ValueError):
        uniform_candidates(1, 1)
    with pytest.raises(TypeError):
        uniform_candidates(4.0, 1)
