"""Tests of the variable-assignment task (selattn_lm.tasks): answers, seeds, splits,
tokenizer, lengths and batch encoding."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from selattn_lm.tasks import (
    BOS,
    PAD,
    CharTokenizer,
    TaskConfig,
    encode_batch,
    generate_example,
    make_split,
    prompts,
)

ASSIGNMENT = re.compile(r"([a-z])=(\d+);")


@st.composite
def task_configs(draw) -> TaskConfig:
    """Small and large tasks: 1..26 variables, 1..40 assignments, values up to 99999, fixed or
    varying numbers of assignments."""
    n_assignments = draw(st.integers(1, 40))
    varying = draw(st.booleans())
    return TaskConfig(
        n_vars=draw(st.integers(1, 26)),
        n_assignments=n_assignments,
        max_value=draw(st.sampled_from([0, 1, 9, 10, 99, 100, 999, 99999])),
        min_assignments=draw(st.integers(1, n_assignments)) if varying else None,
        fixed_width=draw(st.booleans()),
    )


def parse(prompt: str, task: TaskConfig):
    """(assignments as a list of (name, value), queried name) of a prompt, independently of the
    generator: the prompt must be exactly assignments followed by 'x=', and every value must be
    written in plain decimal, or zero-padded to the width of max_value when fixed_width."""
    body, query = prompt[:-2], prompt[-2:]
    assert re.fullmatch(r"[a-z]=", query), prompt
    assignments = ASSIGNMENT.findall(body)
    assert "".join(f"{n}={v};" for n, v in assignments) == body, prompt
    width = len(str(task.max_value))
    for _, v in assignments:
        assert len(v) == width if task.fixed_width else str(int(v)) == v, prompt
    return [(n, int(v)) for n, v in assignments], query[0]


@given(task_configs(), st.integers(0, 2**32 - 1))
def test_answer_is_the_last_value_of_the_queried_variable(task, seed):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        prompt, answer = generate_example(rng, task)
        assignments, query = parse(prompt, task)
        lo = task.n_assignments if task.min_assignments is None else task.min_assignments
        assert lo <= len(assignments) <= task.n_assignments
        assert all(n in task.variables and 0 <= v <= task.max_value for n, v in assignments)
        values_of_query = [v for n, v in assignments if n == query]
        assert values_of_query, "the queried variable must have been assigned"
        assert answer == f"{task.format_value(values_of_query[-1])};"
        assert len(answer) - 1 == (len(str(task.max_value)) if task.fixed_width
                                   else len(str(values_of_query[-1])))


@given(task_configs(), st.integers(0, 2**32 - 1), st.integers(1, 30))
def test_same_seed_same_split(task, seed, n):
    try:
        first = make_split(task, n, seed)
    except ValueError:   # a task too small to have n distinct prompts: also reproducibly so
        with pytest.raises(ValueError):
            make_split(task, n, seed)
        return
    assert make_split(task, n, seed) == first
    assert len(first) == n and len(prompts(first)) == n       # distinct prompts


def test_different_seeds_give_different_splits():
    task = TaskConfig()
    assert make_split(task, 20, 0) != make_split(task, 20, 1)


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_train_and_heldout_never_share_a_sequence(seed_a, seed_b):
    # A task with only 2 * 3 = 6 possible prompts ("a=1;a=": the query is the one variable
    # assigned) forces collisions, so the exclusion itself is exercised, not just the rarity of
    # collisions in a big task.
    task = TaskConfig(n_vars=2, n_assignments=1, max_value=2)
    heldout = make_split(task, 2, seed_a)
    train = make_split(task, 4, seed_b, exclude=prompts(heldout))
    assert not prompts(heldout) & prompts(train)
    assert len(prompts(heldout) | prompts(train)) == 6        # together: every prompt once
    with pytest.raises(ValueError, match="too small"):
        make_split(task, 5, seed_b, exclude=prompts(heldout))


@given(task_configs(), st.integers(0, 2**32 - 1))
def test_length_bounds(task, seed):
    tokenizer = CharTokenizer.for_task(task)
    examples = make_split(task, 8, seed) if task.max_value >= 9 else [
        generate_example(np.random.default_rng(seed), task)]
    tokens, targets, mask = encode_batch(tokenizer, examples, task.max_tokens)
    assert tokens.shape[1] <= task.max_tokens
    lengths = (tokens != PAD).sum(axis=1)
    for (prompt, answer), n in zip(examples, lengths):
        assert n == 1 + len(prompt) + len(answer) - 1
    # the bound is attained: all assignments with the largest value and the largest answer
    worst = "".join(f"a={task.max_value};" for _ in range(task.n_assignments)) + "a="
    longest, _, _ = encode_batch(tokenizer, [(worst, f"{task.max_value};")], task.max_tokens)
    assert longest.shape[1] == task.max_tokens
    with pytest.raises(ValueError, match="context"):
        encode_batch(tokenizer, [(worst, f"{task.max_value};")], task.max_tokens - 1)


@given(st.text(alphabet="0123456789abcxyz=;", max_size=60),
       st.sampled_from(["abc", "xyz", "abcxyz", "cab"]))
def test_encode_decode_round_trip(text, variables):
    tokenizer = CharTokenizer(variables)
    allowed = set("0123456789=;") | set(variables)
    if set(text) <= allowed:
        ids = tokenizer.encode(text)
        assert all(2 <= i < tokenizer.vocab_size for i in ids)     # never PAD or BOS
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode([BOS] + ids + [PAD, PAD]) == text  # BOS, PAD are dropped
    else:
        with pytest.raises(ValueError, match="vocabulary"):
            tokenizer.encode(text)


def test_tokenizer_vocabulary():
    tokenizer = CharTokenizer.for_task(TaskConfig(n_vars=3))
    assert tokenizer.vocab_size == 2 + 10 + 3 + 2                    # PAD BOS digits abc = ;
    assert len(set(tokenizer.encode("0123456789abc=;"))) == 15
    with pytest.raises(ValueError, match="vocabulary"):
        tokenizer.decode([tokenizer.vocab_size])


@given(task_configs(), st.integers(0, 2**32 - 1))
def test_encode_batch_targets_and_mask(task, seed):
    tokenizer = CharTokenizer.for_task(task)
    rng = np.random.default_rng(seed)
    examples = [generate_example(rng, task) for _ in range(4)]
    tokens, targets, mask = encode_batch(tokenizer, examples, task.max_tokens)
    assert tokens.shape == targets.shape == mask.shape
    for b, (prompt, answer) in enumerate(examples):
        n = len(prompt) + len(answer)                      # inputs: BOS + all but the last char
        assert tokens[b, 0] == BOS
        assert tokenizer.decode(tokens[b, :n]) == (prompt + answer)[:-1]
        assert tokenizer.decode(targets[b, :n]) == prompt + answer   # next token
        assert (tokens[b, n:] == PAD).all() and (targets[b, n:] == PAD).all()
        assert tokenizer.decode(targets[b][mask[b]]) == answer       # mask: the answer only
        assert mask[b].sum() == len(answer)


@pytest.mark.parametrize("kwargs, error", [
    (dict(n_vars=0), ValueError), (dict(n_vars=27), ValueError),
    (dict(n_assignments=0), ValueError), (dict(max_value=-1), ValueError),
    (dict(n_vars=2.0), TypeError), (dict(n_vars=True), TypeError),
    (dict(min_assignments=0), ValueError), (dict(n_assignments=3, min_assignments=4), ValueError),
    (dict(fixed_width="yes"), TypeError),
])
def test_bad_task_settings(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        TaskConfig(**kwargs)


def test_task_settings_round_trip():
    task = TaskConfig(n_vars=4, n_assignments=7, max_value=999, min_assignments=2,
                      fixed_width=True)
    assert TaskConfig.from_dict(task.to_dict()) == task
    with pytest.raises(ValueError, match="unknown"):
        TaskConfig.from_dict(dict(task.to_dict(), colour="red"))
