"""The C-backed inference runner (selattn_lm.runner.ModelRunner) against the NumPy reference model:
no budget -> the reference's logits within RUNNER_LOGITS_RTOL; with budgets -> the reference's
``budgets=`` forward; decode (one token at a time) = prefill; greedy generation = argmax of the
logits; clear errors for bad input. The runner on a trained checkpoint (task, tokenizer, answers,
calibration) is tested in tests/test_demo.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from selattn_lm.runner import ModelRunner
from selattn_lm import model as M
from tolerances import RUNNER_DECISION_MARGIN, RUNNER_LOGITS_RTOL

seeds = st.integers(0, 2**32 - 1)


def random_runner(cfg: M.ModelConfig, seed: int, attn_scale: float = 5.0):
    """A runner on random float32 weights whose attention logits are O(1..10) (``attn_scale``
    times the default init of the QKV projection), so that F is large enough to matter."""
    params = M.init_params(cfg, seed=seed)
    for l in range(cfg.n_layers):
        params[f"h{l}.attn.wqkv"] *= attn_scale
    return ModelRunner(params, cfg), params


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (logits of a tiny model are O(1))."""
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def reference(params, cfg, tokens, budgets=None):
    """Logits (float64) of the reference model on the float32 weights, and its per-layer contexts."""
    params64 = {name: p.astype(np.float64) for name, p in params.items()}
    logits, _, cache = M.forward(params64, cfg, tokens, budgets=budgets)
    return logits, cache.attention_contexts


def decisions_are_robust(contexts, budgets) -> bool:
    """True when float32 rounding cannot change which key a budgeted layer evicts: in every
    budgeted layer, no selector logit lies within the margin of relu's kink at 0 (where F would
    switch between exactly 0 and a tiny value, changing the oldest-first tie-break) and no two
    different F values of a query row that evicts are within the margin of each other."""
    for ctx, budget in zip(contexts, budgets):
        N = ctx.F.shape[-1]
        if budget is None or budget >= N:
            continue                                                       # never evicts
        L_sel = ctx.L[:, ctx.selector_head]                                # (B, N, N)
        below = np.tri(N, k=-1, dtype=bool)
        below[:, 0] = False                                                # BOS: never in S
        margin = RUNNER_DECISION_MARGIN * (1 + np.abs(L_sel[:, below]).max(initial=0.0))
        if (np.abs(L_sel[:, below]) < margin).any():
            return False
        margin = RUNNER_DECISION_MARGIN * (1 + ctx.F.max())
        for row in ctx.F[:, budget - 1:].reshape(-1, N):                   # rows that evict
            if (np.diff(np.unique(row)) < margin).any():
                return False
    return True


@st.composite
def problems(draw, selective=None):
    """A random small model, a batch of tokens and per-layer budgets."""
    n_heads = draw(st.integers(1, 4))
    cfg = M.ModelConfig(
        vocab_size=draw(st.integers(4, 20)), context=draw(st.integers(4, 32)),
        n_layers=draw(st.integers(1, 3)), n_heads=n_heads,
        d_model=n_heads * draw(st.sampled_from([2, 4, 8, 16])), mlp_ratio=2,
        selective=draw(st.booleans()) if selective is None else selective,
        selector_head=draw(st.integers(0, n_heads - 1)))
    seed = draw(seeds)
    B, N = draw(st.integers(1, 2)), draw(st.integers(1, cfg.context))
    tokens = np.random.default_rng(seed).integers(1, cfg.vocab_size, (B, N))   # (B, N)
    budgets = draw(st.lists(st.one_of(st.none(), st.integers(2, N + 2)), min_size=cfg.n_layers,
                            max_size=cfg.n_layers))
    attn_scale = draw(st.sampled_from([1.0, 5.0, 10.0]))
    return cfg, seed, tokens, budgets, attn_scale


# ----------------------------------------------------------------------------------------------
# Equivalence with the reference model


@given(problems())
def test_no_budget_equals_the_reference_model(problem):
    cfg, seed, tokens, _, attn_scale = problem
    runner, params = random_runner(cfg, seed, attn_scale)
    expected, _ = reference(params, cfg, tokens)
    logits = runner.logits(tokens)
    assert logits.shape == expected.shape and logits.dtype == np.float32
    assert rel_error(logits, expected) <= RUNNER_LOGITS_RTOL


@given(problems())
def test_budgets_equal_the_reference_models_budgeted_forward(problem):
    cfg, seed, tokens, budgets, attn_scale = problem
    runner, params = random_runner(cfg, seed, attn_scale)
    expected, contexts = reference(params, cfg, tokens, budgets)
    assume(decisions_are_robust(contexts, budgets))
    assert rel_error(runner.logits(tokens, budgets), expected) <= RUNNER_LOGITS_RTOL


@given(problems())
def test_decode_equals_prefill(problem):
    cfg, seed, tokens, budgets, attn_scale = problem
    runner, params = random_runner(cfg, seed, attn_scale)
    _, contexts = reference(params, cfg, tokens, budgets)
    assume(decisions_are_robust(contexts, budgets))
    prefill = runner.logits(tokens, budgets)                               # (B, N, V)
    caches = runner.new_caches(tokens.shape[0], budgets)
    decode = np.concatenate([runner.forward(tokens[:, n:n + 1], caches)
                             for n in range(tokens.shape[1])], axis=1)     # (B, N, V)
    assert rel_error(decode, prefill) <= RUNNER_LOGITS_RTOL
    for cache, budget in zip(caches, runner.check_budgets(budgets)):
        assert cache.length == tokens.shape[1]
        if budget is not None:
            assert (cache.size <= budget).all()


def test_budgets_matter_and_a_large_budget_does_not():
    cfg = M.ModelConfig(vocab_size=12, context=32, n_layers=2, n_heads=2, d_model=16)
    runner, params = random_runner(cfg, 3)
    tokens = np.random.default_rng(3).integers(1, 12, (2, 32))
    full = runner.logits(tokens)
    assert rel_error(runner.logits(tokens, [32, None]), full) <= RUNNER_LOGITS_RTOL
    assert rel_error(runner.logits(tokens, [4, 4]), full) > 100 * RUNNER_LOGITS_RTOL


def test_standard_model_evicts_the_oldest_but_keeps_bos():
    cfg = M.ModelConfig(vocab_size=12, context=16, n_layers=1, n_heads=2, d_model=8,
                        selective=False)
    runner, _ = random_runner(cfg, 0)
    caches = runner.new_caches(1, [4])
    runner.forward(np.random.default_rng(0).integers(1, 12, (1, 10)), caches)
    positions, F = caches[0].held(0)
    assert positions.tolist() == [0, 7, 8, 9] and not F.any()


# ----------------------------------------------------------------------------------------------
# Generation, masks, memory


@given(problems(), st.integers(1, 6))
def test_greedy_generation_is_the_argmax_of_the_logits(problem, max_new):
    cfg, seed, tokens, budgets, attn_scale = problem
    assume(tokens.shape[1] + max_new - 1 <= cfg.context)
    runner, params = random_runner(cfg, seed, attn_scale)
    new = runner.generate(tokens, max_new, budgets)
    assert new.shape == (tokens.shape[0], max_new) and new.dtype.kind == "i"
    full = np.concatenate([tokens, new[:, :-1]], axis=1)                  # (B, N + T - 1)
    _, contexts = reference(params, cfg, full, budgets)
    assume(decisions_are_robust(contexts, budgets))
    logits = runner.logits(full, budgets)
    top2 = np.sort(logits[:, tokens.shape[1] - 1:], axis=-1)[..., -2:]
    assume((top2[..., 1] - top2[..., 0] > RUNNER_DECISION_MARGIN).all())  # no near-tie argmax
    np.testing.assert_array_equal(logits[:, tokens.shape[1] - 1:].argmax(axis=-1), new)


def test_generation_stops_when_every_row_has_stopped():
    cfg = M.ModelConfig(vocab_size=6, context=20, n_layers=1, n_heads=1, d_model=4)
    runner, _ = random_runner(cfg, 1)
    tokens = np.ones((1, 3), dtype=np.int64)
    free = runner.generate(tokens, 10)
    stop = int(free[0, 2])
    stopped = runner.generate(tokens, 10, stop_token=stop)
    first = int(np.flatnonzero(free[0] == stop)[0])
    np.testing.assert_array_equal(stopped[0], free[0, :first + 1])


@given(problems(selective=True))
def test_masks_are_the_reference_models_F(problem):
    cfg, seed, tokens, _, attn_scale = problem
    runner, params = random_runner(cfg, seed, attn_scale)
    expected, contexts = reference(params, cfg, tokens[:1])
    masks = [F[0] for F in runner.accumulated_masks(tokens[:1])]
    for F, ctx in zip(masks, contexts):
        assert F.shape == ctx.F.shape[1:]
        scale = 1 + np.abs(ctx.F).max()
        assert np.abs(F - ctx.F[0]).max() <= RUNNER_LOGITS_RTOL * scale


def test_standard_models_masks_are_zero():
    cfg = M.ModelConfig(vocab_size=6, context=8, n_layers=2, n_heads=2, d_model=4,
                        selective=False)
    runner, _ = random_runner(cfg, 0)
    masks = runner.accumulated_masks(np.ones((1, 5), dtype=np.int64))
    assert len(masks) == 2 and all(F.shape == (1, 5, 5) and not F.any() for F in masks)


def test_kv_bytes():
    cfg = M.ModelConfig(vocab_size=6, context=64, n_layers=2, n_heads=4, d_model=32)
    runner, _ = random_runner(cfg, 0)
    per_slot = 2 * 4 * 8 * 4                            # K and V, 4 heads x 8 dims, float32
    assert runner.kv_bytes() == 2 * 64 * per_slot
    assert runner.kv_bytes([8, 4]) == 12 * per_slot
    assert runner.kv_bytes([1000, None], batch=3) == 3 * 128 * per_slot   # capped at context
    caches = runner.new_caches(1, [8, 4])
    runner.forward(np.ones((1, 64), dtype=np.int64), caches)
    held = sum(int(c.size[0]) for c in caches)
    assert held * per_slot == runner.kv_bytes([8, 4])   # what the caches really hold


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture(scope="module")
def small_runner():
    cfg = M.ModelConfig(vocab_size=8, context=10, n_layers=2, n_heads=2, d_model=8)
    return random_runner(cfg, 0)[0]


@pytest.mark.parametrize("call, error, words", [
    (lambda r: r.logits(np.array([[1, 8]])), ValueError, r"tokens must be in \[0, 8\)"),
    (lambda r: r.logits(np.array([[1, -1]])), ValueError, r"tokens must be in \[0, 8\)"),
    (lambda r: r.logits(np.ones((1, 11), dtype=int)), ValueError, "context of 10"),
    (lambda r: r.logits(np.ones((1, 2)) * 1.5), TypeError, "tokens must be an integer array"),
    (lambda r: r.logits(np.ones(3, dtype=int)), ValueError, r"shape \(B, N\)"),
    (lambda r: r.logits(np.ones((1, 3), dtype=int), [4]), ValueError, "one entry per layer"),
    (lambda r: r.logits(np.ones((1, 3), dtype=int), [4, 1]), ValueError,
     r"budgets\[1\]: budget 1 is too small"),
    (lambda r: r.logits(np.ones((1, 3), dtype=int), [4, 2.0]), TypeError, r"budgets\[1\]"),
    (lambda r: r.logits(np.ones((1, 3), dtype=int), 4), TypeError, "sequence"),
    (lambda r: r.generate(np.ones((1, 3), dtype=int), 0), ValueError, "max_new_tokens"),
    (lambda r: r.generate(np.ones((1, 8), dtype=int), 4), ValueError, "does not fit"),
    (lambda r: r.generate("a=1;a=", 2), ValueError, "no tokenizer"),
    (lambda r: r.forward(np.ones((1, 3), dtype=int), r.new_caches(1)[:1]), TypeError,
     "2 KVCache"),
    (lambda r: r.forward(np.ones((2, 3), dtype=int), r.new_caches(1)), ValueError, "batch 2"),
    (lambda r: r.new_caches(0), ValueError, "batch must be >= 1"),
    (lambda r: r.kv_bytes(None, batch=0), ValueError, "batch must be >= 1"),
    (lambda r: r.kv_bytes([4, 0]), ValueError, r"budgets\[1\]: budget 0 is too small"),
])
def test_bad_input_is_refused(small_runner, call, error, words):
    with pytest.raises(error, match=words):
        call(small_runner)


def test_decoding_past_the_context_is_refused(small_runner):
    caches = small_runner.new_caches(1)
    small_runner.forward(np.ones((1, 10), dtype=int), caches)
    with pytest.raises(ValueError, match="context of 10"):
        small_runner.forward(np.ones((1, 1), dtype=int), caches)


def test_bad_weights_are_refused():
    cfg = M.ModelConfig(vocab_size=8, context=10, n_layers=1, n_heads=2, d_model=8)
    params = M.init_params(cfg)
    with pytest.raises(TypeError, match="cfg must be a ModelConfig"):
        ModelRunner(params, cfg.to_dict())
    del params["lnf.b"]
    with pytest.raises(ValueError, match=r"missing \['lnf.b'\]"):
        ModelRunner(params, cfg)
