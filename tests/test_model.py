"""Properties of the tiny LM (selattn_lm/model.py): the contract's parameter names and shapes,
causality, the baseline (selective=False), padding, budgets, float32 vs float64, and clear errors
for bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_float32_grads_close
from selattn_lm import model as M
from tolerances import MODEL_FLOAT32_RTOL, REORDERED_FLOAT64

seeds = st.integers(0, 2**32 - 1)
SMALL = dict(vocab_size=9, context=12, n_layers=2, n_heads=3, d_model=12, mlp_ratio=2)


def problem(cfg: M.ModelConfig, seed: int, B: int = 2, N: int = None, weight_std: float = 0.3,
            dtype=np.float64):
    """Params with O(1) attention logits, non-PAD tokens, targets and a mask on every position."""
    rng = np.random.default_rng(seed)
    params = M.init_params(cfg, seed=seed, dtype=np.float64)
    for p in params.values():
        p += weight_std * rng.standard_normal(p.shape)
    params = {name: p.astype(dtype) for name, p in params.items()}
    N = cfg.context if N is None else N
    tokens = rng.integers(1, cfg.vocab_size, (B, N))                       # (B, N)
    targets = rng.integers(1, cfg.vocab_size, (B, N))                      # (B, N)
    return params, tokens, targets


# ----------------------------------------------------------------------------------------------
# Config and parameters


def test_parameter_names_and_shapes_follow_the_contract():
    cfg = M.ModelConfig(vocab_size=20, context=16, n_layers=2, n_heads=4, d_model=8)
    params = M.init_params(cfg)
    d = 8
    expected = {"wte": (20, d), "wpe": (16, d), "lnf.g": (d,), "lnf.b": (d,)}
    for l in range(2):
        expected.update({
            f"h{l}.ln1.g": (d,), f"h{l}.ln1.b": (d,), f"h{l}.attn.wqkv": (d, 3 * d),
            f"h{l}.attn.bqkv": (3 * d,), f"h{l}.attn.wo": (d, d), f"h{l}.attn.bo": (d,),
            f"h{l}.ln2.g": (d,), f"h{l}.ln2.b": (d,), f"h{l}.mlp.w1": (d, 4 * d),
            f"h{l}.mlp.b1": (4 * d,), f"h{l}.mlp.w2": (4 * d, d), f"h{l}.mlp.b2": (d,)})
    assert {name: p.shape for name, p in params.items()} == expected
    assert all(p.dtype == np.float32 for p in params.values())
    assert M.num_params(params) == sum(int(np.prod(s)) for s in expected.values())
    assert cfg.head_dim == 2
    # same seed, same weights; another seed, other weights
    again, other = M.init_params(cfg, seed=0), M.init_params(cfg, seed=1)
    assert all(np.array_equal(params[n], again[n]) for n in params)
    assert not np.array_equal(params["wte"], other["wte"])


def test_qkv_columns_are_q_k_v_with_contiguous_heads():
    cfg = M.ModelConfig(**SMALL)
    params, tokens, _ = problem(cfg, 0)
    h = np.random.default_rng(1).standard_normal((2, 5, cfg.d_model))       # (B, N, d)
    q, k, v = M.qkv_heads(h, params, 1, cfg)
    w, b, d, hd = params["h1.attn.wqkv"], params["h1.attn.bqkv"], cfg.d_model, cfg.head_dim
    for part, x in enumerate((q, k, v)):
        for head in range(cfg.n_heads):
            cols = slice(part * d + head * hd, part * d + (head + 1) * hd)
            np.testing.assert_allclose(x[:, head], h @ w[:, cols] + b[cols], rtol=1e-13)
    np.testing.assert_array_equal(M.merge_heads(q), (h @ w + b)[..., :d])


def test_config_round_trips_and_validates():
    cfg = M.ModelConfig(vocab_size=20, context=64, selective=False, eps=0.5, tau=2)
    assert M.ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(cfg.tau, float)
    bad = [
        (dict(vocab_size=20, context=0), ValueError, "context"),
        (dict(vocab_size=20.0, context=8), TypeError, "vocab_size"),
        (dict(vocab_size=20, context=8, d_model=10, n_heads=4), ValueError, "divisible"),
        (dict(vocab_size=20, context=8, selector_head=4), ValueError, "selector_head"),
        (dict(vocab_size=20, context=8, eps=-0.1), ValueError, "eps"),
        (dict(vocab_size=20, context=8, tau=0.0), ValueError, "tau"),
        (dict(vocab_size=20, context=8, selective=1), TypeError, "selective"),
        (dict(vocab_size=20, context=8, n_layers=True), TypeError, "n_layers"),
    ]
    for fields, error, word in bad:
        with pytest.raises(error, match=word):
            M.ModelConfig(**fields)
    with pytest.raises(ValueError, match="unknown.*dropout"):
        M.ModelConfig.from_dict(dict(cfg.to_dict(), dropout=0.1))
    with pytest.raises(ValueError, match="missing.*context"):
        M.ModelConfig.from_dict({"vocab_size": 20})
    with pytest.raises(TypeError, match="dict"):
        M.ModelConfig.from_dict([("vocab_size", 20)])


# ----------------------------------------------------------------------------------------------
# Properties of the forward pass


@given(seeds, st.integers(0, SMALL["context"] - 1), st.booleans())
def test_causality(seed, t, selective):
    """Changing token t changes no logit before t (and the memory mask F before row t + 1)."""
    cfg = M.ModelConfig(**SMALL, selective=selective)
    params, tokens, _ = problem(cfg, seed)
    changed = tokens.copy()
    changed[:, t] = 1 + (tokens[:, t] % (cfg.vocab_size - 1))              # another non-PAD id
    logits, _, _ = M.forward(params, cfg, tokens)
    logits_changed, _, _ = M.forward(params, cfg, changed)
    np.testing.assert_allclose(logits_changed[:, :t], logits[:, :t], rtol=REORDERED_FLOAT64,
                               atol=REORDERED_FLOAT64)
    assert not np.allclose(logits_changed[:, t], logits[:, t])             # t itself does change


@given(seeds)
def test_baseline_has_no_mask_and_no_memory_loss(seed):
    cfg = M.ModelConfig(**SMALL, selective=False, eps=1.0)
    params, tokens, targets = problem(cfg, seed)
    _, losses, cache = M.forward(params, cfg, tokens, targets)
    assert losses["mem"] == 0.0 and losses["total"] == losses["ce"]
    assert cache.memory_masks is None
    for ctx in cache.attention_contexts:
        assert not ctx.F.any()
    # and its gradient is the cross-entropy's alone: eps does not matter
    _, _, cache0 = M.forward(params, M.ModelConfig(**SMALL, selective=False, eps=0.0), tokens,
                             targets)
    grads, grads0 = M.backward(cache), M.backward(cache0)
    assert all(np.array_equal(grads[n], grads0[n]) for n in grads)


@given(seeds)
def test_selective_model_has_a_positive_memory_loss_and_total_adds_it(seed):
    cfg = M.ModelConfig(**SMALL, eps=0.3)
    params, tokens, targets = problem(cfg, seed)
    _, losses, cache = M.forward(params, cfg, tokens, targets)
    assert 0 < losses["mem"] <= 1.0   # each sequence keeps at most all its N tokens: mem <= 1
    assert losses["total"] == pytest.approx(losses["ce"] + 0.3 * losses["mem"], rel=1e-12)
    # the definition, layer by layer, on the reference's memory_loss
    from selattn_reference import memory_loss
    B, N = tokens.shape
    expected = sum(memory_loss(ctx.F, cfg.tau).sum() for ctx in cache.attention_contexts)
    assert losses["mem"] == pytest.approx(expected / (cfg.n_layers * B * N), rel=1e-12)


@given(seeds, st.integers(2, 8), st.integers(1, 4), st.booleans())
def test_right_padding_changes_nothing(seed, N, n_pad, selective):
    """Appending PAD tokens (masked out of the cross-entropy) leaves the logits of the real
    positions, both losses, and every gradient unchanged."""
    cfg = M.ModelConfig(**SMALL, selective=selective, eps=1.0)
    params, tokens, targets = problem(cfg, seed, N=N)
    n_pad = min(n_pad, cfg.context - N)
    padded = np.concatenate([tokens, np.zeros((2, n_pad), dtype=tokens.dtype)], axis=1)
    padded_targets = np.concatenate([targets, np.zeros((2, n_pad), dtype=targets.dtype)], axis=1)
    mask = padded != M.PAD
    logits, losses, cache = M.forward(params, cfg, tokens, targets)
    logits_p, losses_p, cache_p = M.forward(params, cfg, padded, padded_targets, mask)
    np.testing.assert_allclose(logits_p[:, :N], logits, rtol=REORDERED_FLOAT64, atol=1e-13)
    for key in ("ce", "mem", "total"):
        assert losses_p[key] == pytest.approx(losses[key], rel=1e-12, abs=1e-14)
    grads, grads_p = M.backward(cache), M.backward(cache_p)
    for name in grads:
        np.testing.assert_allclose(grads_p[name], grads[name], rtol=1e-9, atol=1e-12,
                                   err_msg=name)


@given(seeds, st.booleans(), st.integers(0, 3))
def test_budget_at_least_n_equals_no_budget(seed, selective, extra):
    cfg = M.ModelConfig(**SMALL, selective=selective)
    params, tokens, targets = problem(cfg, seed)
    N = tokens.shape[1]
    logits, losses, _ = M.forward(params, cfg, tokens, targets)
    for budgets in ([N + extra, N + extra], [None, N + extra]):
        logits_b, losses_b, cache_b = M.forward(params, cfg, tokens, targets, budgets=budgets)
        np.testing.assert_array_equal(logits_b, logits)
        assert losses_b == losses
        with pytest.raises(ValueError, match="budget"):
            M.backward(cache_b)


def test_a_small_budget_changes_the_logits_and_needs_one_entry_per_layer():
    cfg = M.ModelConfig(**SMALL)
    params, tokens, _ = problem(cfg, 3, weight_std=1.0)
    logits, _, _ = M.forward(params, cfg, tokens)
    pruned, _, _ = M.forward(params, cfg, tokens, budgets=[3, 3])
    np.testing.assert_array_equal(pruned[:, :3], logits[:, :3])   # the first 3 tokens all fit
    assert not np.allclose(pruned, logits)
    with pytest.raises(ValueError, match="one entry per layer"):
        M.forward(params, cfg, tokens, budgets=[3])


@given(seeds, st.booleans())
def test_float32_model_matches_float64(seed, selective):
    cfg = M.ModelConfig(**SMALL, selective=selective, eps=1.0)
    params, tokens, targets = problem(cfg, seed)
    params32 = {n: p.astype(np.float32) for n, p in params.items()}
    logits, losses, cache = M.forward(params, cfg, tokens, targets)
    logits32, losses32, cache32 = M.forward(params32, cfg, tokens, targets)
    assert logits32.dtype == np.float32
    np.testing.assert_allclose(logits32, logits, rtol=MODEL_FLOAT32_RTOL,
                               atol=MODEL_FLOAT32_RTOL * np.abs(logits).max())
    for key in losses:
        assert losses32[key] == pytest.approx(losses[key], rel=MODEL_FLOAT32_RTOL, abs=1e-6)
    assert_float32_grads_close(M.backward(cache32), M.backward(cache), MODEL_FLOAT32_RTOL)


def test_embed_with_start_is_the_slice_of_a_longer_embedding():
    cfg = M.ModelConfig(**SMALL)
    params, tokens, _ = problem(cfg, 0)
    full = M.embed(params, tokens)
    np.testing.assert_array_equal(M.embed(params, tokens[:, 4:7], start=4), full[:, 4:7])


# ----------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_raise_errors_naming_the_argument():
    cfg = M.ModelConfig(**SMALL)
    params, tokens, targets = problem(cfg, 0)
    with pytest.raises(ValueError, match="tokens must be in"):
        M.forward(params, cfg, tokens + cfg.vocab_size)
    with pytest.raises(TypeError, match="tokens must be an integer"):
        M.forward(params, cfg, tokens.astype(float))
    with pytest.raises(ValueError, match="context"):
        M.forward(params, cfg, np.ones((1, cfg.context + 1), dtype=int))
    with pytest.raises(ValueError, match="targets must have the shape"):
        M.forward(params, cfg, tokens, targets[:, :-1])
    with pytest.raises(ValueError, match="target_mask selects no position"):
        M.forward(params, cfg, tokens, targets, np.zeros(tokens.shape, dtype=bool))
    with pytest.raises(ValueError, match="target_mask must be finite and >= 0"):
        M.forward(params, cfg, tokens, targets, -np.ones(tokens.shape))
    with pytest.raises(ValueError, match="all PAD"):
        M.forward(params, cfg, np.zeros_like(tokens), targets)
    with pytest.raises(ValueError, match="missing.*wte"):
        M.forward({n: p for n, p in params.items() if n != "wte"}, cfg, tokens)
    with pytest.raises(ValueError, match=r"params\['wpe'\] has shape"):
        M.forward(dict(params, wpe=params["wpe"][:-1]), cfg, tokens)
    with pytest.raises(TypeError, match="cfg must be a ModelConfig"):
        M.forward(params, cfg.to_dict(), tokens)
    _, _, cache = M.forward(params, cfg, tokens)
    with pytest.raises(ValueError, match="without targets"):
        M.backward(cache)
