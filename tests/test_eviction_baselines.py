"""The eviction baselines of the text results (``selattn_reference.eviction_baselines``): a
sliding window with BOS, H2O, TOVA and the selective model's sliding window, checked against slow one-sequence-at-a-time versions written
here from their definitions, plus their invariants and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from selattn_reference import attention as ref
from selattn_lm import model as lm
from selattn_reference.eviction_baselines import (
    TOVA,
    HeavyHitters,
    SelectiveSlidingWindow,
    SlidingWindow,
    heavy_hitter_attention,
    sliding_window_mask,
    tova_attention,
)

from helpers import random_qkv
from tolerances import REORDERED_FLOAT64


def slow_h2o(q, k, v, budget, scale, recent):
    """H2O for one (H, N, D) sequence, a key at a time, from the rule in words."""
    H, N, D = q.shape
    held, score = [], {}
    out = np.zeros_like(q)
    for i in range(N):
        held.append(i)
        score[i] = 0.0
        if len(held) > budget:
            candidates = [j for j in held if j <= i - recent]        # outside the recent window
            victim = min(candidates, key=lambda j: (score[j], j))    # least attention, oldest
            held.remove(victim)
        for h in range(H):
            logits = np.array([scale * q[h, i] @ k[h, j] for j in held])
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[h, i] = sum(w * v[h, j] for w, j in zip(p, held))
            for w, j in zip(p, held):
                score[j] += w
    return out


@given(st.integers(1, 2), st.integers(1, 3), st.integers(2, 24), st.integers(2, 12),
       st.integers(0, 2**31), st.sampled_from([0.5, 1.0, 3.0]))
def test_h2o_matches_the_rule_in_words(B, H, N, budget, seed, input_scale):
    q, k, v = random_qkv(seed, (B, H, N, 4), input_scale)
    scale = 0.5
    out = heavy_hitter_attention(q, k, v, budget, scale)
    for b in range(B):
        expected = slow_h2o(q[b], k[b], v[b], budget, scale, budget // 2)
        np.testing.assert_allclose(out[b], expected, rtol=REORDERED_FLOAT64,
                                   atol=REORDERED_FLOAT64)


@given(st.integers(2, 20), st.integers(2, 25))
def test_sliding_window_mask(N, budget):
    m = sliding_window_mask(N, budget)
    assert (m.sum(axis=1) == np.minimum(np.arange(N) + 1, budget)).all()   # budget keys at most
    assert m[:, 0].all() and m[np.arange(N), np.arange(N)].all()           # BOS and self
    assert not np.triu(m, 1).any()                                          # causal
    for i in range(N):
        newest = [j for j in range(i + 1) if m[i, j] and j > 0]
        assert newest == list(range(max(1, i - budget + 2), i + 1))         # the latest ones


@pytest.mark.parametrize("baseline", [SlidingWindow(), HeavyHitters(), TOVA()])
@pytest.mark.parametrize("budget", [None, 9, 40])
def test_no_eviction_is_standard_attention(baseline, budget):
    q, k, v = random_qkv(3, (2, 3, 9, 4))
    out, F, ctx = baseline.forward(q, k, v, selective=False, selector_head=0, need_F=False,
                                   budget=budget)
    expected, _ = ref.forward(q, k, v, selective=False)
    np.testing.assert_allclose(out, expected, rtol=REORDERED_FLOAT64, atol=REORDERED_FLOAT64)
    assert F is None and ctx is None


def test_sliding_window_is_the_reference_with_that_mask():
    q, k, v = random_qkv(4, (1, 2, 12, 4))
    out, _, _ = SlidingWindow().forward(q, k, v, selective=False, selector_head=0,
                                        need_F=False, budget=4)
    L = (q @ k.swapaxes(-1, -2)) / 2.0                                      # scale 1/sqrt(4)
    L = np.where(sliding_window_mask(12, 4), L, -np.inf)
    P = np.exp(L - L.max(axis=-1, keepdims=True))
    P /= P.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(out, P @ v, rtol=REORDERED_FLOAT64, atol=REORDERED_FLOAT64)


def test_pruning_changes_the_output():
    q, k, v = random_qkv(5, (1, 2, 16, 4))
    full, _ = ref.forward(q, k, v, selective=False)
    for baseline in (SlidingWindow(), HeavyHitters(), TOVA()):
        out, _, _ = baseline.forward(q, k, v, selective=False, selector_head=0, need_F=False,
                                     budget=4)
        np.testing.assert_allclose(out[:, :, :4], full[:, :, :4], rtol=1e-12)  # nothing evicted
        assert np.abs(out[:, :, 4:] - full[:, :, 4:]).max() > 1e-3


def test_refusals():
    q, k, v = random_qkv(6, (1, 2, 8, 4))
    for baseline in (SlidingWindow(), HeavyHitters(), TOVA()):
        with pytest.raises(ValueError, match="standard attention"):
            baseline.forward(q, k, v, selective=True, selector_head=0, need_F=False, budget=4)
        with pytest.raises(ValueError, match="budget"):
            baseline.forward(q, k, v, selective=False, selector_head=0, need_F=False, budget=1)
        with pytest.raises(ValueError, match="no backward"):
            baseline.backward(q, None, None)


def test_a_standard_model_under_a_baseline():
    cfg = lm.ModelConfig(vocab_size=11, context=12, n_layers=2, n_heads=2, d_model=8,
                         selective=False, eps=0.0)
    params = lm.init_params(cfg, seed=1, dtype=np.float64)
    tokens = np.random.default_rng(0).integers(1, 11, size=(2, 12))
    full, _, _ = lm.forward(params, cfg, tokens)
    for baseline in (SlidingWindow(), HeavyHitters(), TOVA()):
        same, _, _ = lm.forward(params, cfg, tokens, attention=baseline, budgets=[12, 12])
        np.testing.assert_allclose(same, full, rtol=1e-10, atol=1e-12)
        pruned, _, _ = lm.forward(params, cfg, tokens, attention=baseline, budgets=[3, 12])
        assert np.abs(pruned - full).max() > 1e-6


# ----------------------------------------------------------------------------------------------
# TOVA


def slow_tova(q, k, v, budget, scale):
    """TOVA for one (H, N, D) sequence, a key at a time, from the rule in words: the query
    attends over the held keys and itself; then, if ``budget`` keys are held, the one with the
    smallest weight averaged over the heads goes (the oldest on ties)."""
    H, N, D = q.shape
    held = []
    out = np.zeros_like(q)
    for i in range(N):
        held.append(i)
        weights = np.zeros((H, len(held)))
        for h in range(H):
            logits = np.array([scale * q[h, i] @ k[h, j] for j in held])
            p = np.exp(logits - logits.max())
            weights[h] = p / p.sum()
            out[h, i] = sum(w * v[h, j] for w, j in zip(weights[h], held))
        if len(held) == budget:
            mean = weights.mean(axis=0)
            victim = min(range(len(held)), key=lambda n: (mean[n], held[n]))
            held.pop(victim)
    return out


@given(st.integers(1, 2), st.integers(1, 3), st.integers(2, 24), st.integers(2, 12),
       st.integers(0, 2**31), st.sampled_from([0.5, 1.0, 3.0]))
def test_tova_matches_the_rule_in_words(B, H, N, budget, seed, input_scale):
    q, k, v = random_qkv(seed, (B, H, N, 4), input_scale)
    scale = 0.5
    out = tova_attention(q, k, v, budget, scale)
    for b in range(B):
        np.testing.assert_allclose(out[b], slow_tova(q[b], k[b], v[b], budget, scale),
                                   rtol=REORDERED_FLOAT64, atol=REORDERED_FLOAT64)


def test_tova_keeps_what_the_current_query_attends_to():
    """One head, every query the same: query . key_j = keys[j], so each query ranks the keys
    alike and a 3-slot cache ends every step holding the two largest keys seen so far. The
    values are one-hot, so out[i] is query i's weights."""
    N = 8
    keys = np.array([0.0, 5.0, -1.0, 4.0, -2.0, 3.0, -3.0, 6.0])
    q = np.ones((1, 1, N, N))
    k = np.repeat(keys.reshape(1, 1, N, 1), N, axis=-1) / N               # q . k_j = keys[j]
    v = np.eye(N).reshape(1, 1, N, N)
    out = tova_attention(q, k, v, 3, 1.0)
    seen = out[0, 0] > 0                                     # (N, N) keys each query saw
    assert (seen.sum(axis=1) == np.minimum(np.arange(N) + 1, 3)).all()
    for i in range(2, N):
        before = sorted(range(i), key=lambda j: -keys[j])[:2]      # the two largest before i
        assert sorted(np.flatnonzero(seen[i])) == sorted(before + [i])


# ----------------------------------------------------------------------------------------------
# The selective model under a sliding window


def slow_selective_window(q, k, v, budget, scale, selector_head):
    """One (H, N, D) sequence from the definitions: S[m, j] = relu(selector logit) for
    0 < j < m, F[i, j] = sum_{m < i} S[m, j]; query i attends to BOS and its ``budget - 1``
    most recent keys with logits ``scale q_i . k_j - F[i, j]``."""
    H, N, D = q.shape
    s = selector_head
    S = np.zeros((N, N))
    for m in range(N):
        for j in range(1, m):
            S[m, j] = max(scale * q[s, m] @ k[s, j], 0.0)
    out = np.zeros_like(q)
    for i in range(N):
        window = [0] + [j for j in range(max(1, i - budget + 2), i + 1)]
        for h in range(H):
            logits = np.array([scale * q[h, i] @ k[h, j] - sum(S[m, j] for m in range(i))
                               for j in window])
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[h, i] = sum(w * v[h, j] for w, j in zip(p, window))
    return out


@given(st.integers(1, 2), st.integers(1, 3), st.integers(2, 14), st.integers(2, 16),
       st.integers(0, 2**31), st.sampled_from([0.5, 1.0, 3.0]))
def test_selective_window_matches_the_definition(B, H, N, budget, seed, input_scale):
    q, k, v = random_qkv(seed, (B, H, N, 4), input_scale)
    s = H - 1
    out, F, ctx = SelectiveSlidingWindow().forward(q, k, v, selective=True, selector_head=s,
                                                   need_F=True, budget=budget)
    assert ctx is None
    np.testing.assert_allclose(F, ref.accumulated_mask(q, k, selector_head=s),
                               rtol=REORDERED_FLOAT64, atol=REORDERED_FLOAT64)
    for b in range(B):
        expected = slow_selective_window(q[b], k[b], v[b], budget, 0.5, s)
        np.testing.assert_allclose(out[b], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("budget", [None, 10, 30])
def test_selective_window_without_eviction_is_the_reference(budget):
    q, k, v = random_qkv(7, (2, 3, 10, 4), 2.0)
    out, F, _ = SelectiveSlidingWindow().forward(q, k, v, selective=True, selector_head=1,
                                                 need_F=False, budget=budget)
    expected, _ = ref.forward(q, k, v, selector_head=1, selective=True)
    np.testing.assert_allclose(out, expected, rtol=REORDERED_FLOAT64, atol=REORDERED_FLOAT64)
    assert F is None


def test_selective_window_is_not_the_kv_cache_rule():
    """Hard masks (input scale 10): the largest-F eviction and recency keep different keys, so
    the outputs differ; the window's F is the reference's (the window does not change F)."""
    q, k, v = random_qkv(8, (1, 2, 16, 4), 10.0)
    window, _, _ = SelectiveSlidingWindow().forward(q, k, v, selective=True, selector_head=0,
                                                    need_F=False, budget=4)
    cache, _ = ref.forward(q, k, v, selective=True, budget=4)
    assert np.abs(window - cache).max() > 1e-3


def test_selective_window_refusals():
    q, k, v = random_qkv(9, (1, 2, 8, 4))
    control = SelectiveSlidingWindow()
    with pytest.raises(ValueError, match="selective models"):
        control.forward(q, k, v, selective=False, selector_head=0, need_F=False, budget=4)
    with pytest.raises(ValueError, match="budget"):
        control.forward(q, k, v, selective=True, selector_head=0, need_F=False, budget=1)
    with pytest.raises(ValueError, match="selector_head|selector"):
        control.forward(q, k, v, selective=True, selector_head=5, need_F=False, budget=4)
    with pytest.raises(ValueError, match="no backward"):
        control.backward(q, None, None)


def test_a_selective_model_under_its_sliding_window():
    cfg = lm.ModelConfig(vocab_size=11, context=12, n_layers=2, n_heads=2, d_model=8,
                         selective=True, eps=0.0)
    params = lm.init_params(cfg, seed=2, dtype=np.float64)
    tokens = np.random.default_rng(1).integers(1, 11, size=(2, 12))
    full, _, _ = lm.forward(params, cfg, tokens)
    same, _, _ = lm.forward(params, cfg, tokens, attention=SelectiveSlidingWindow(),
                            budgets=[12, None])
    np.testing.assert_allclose(same, full, rtol=1e-10, atol=1e-12)
    pruned, _, _ = lm.forward(params, cfg, tokens, attention=SelectiveSlidingWindow(),
                              budgets=[3, 12])
    assert np.abs(pruned - full).max() > 1e-6
