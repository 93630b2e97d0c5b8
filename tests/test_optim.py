"""AdamW and gradient clipping (selattn_lm/optim.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from selattn_lm.optim import AdamW, clip_grad_norm, global_norm
from tolerances import REORDERED_FLOAT64

seeds = st.integers(0, 2**32 - 1)


def random_params(seed: int, dtype=np.float64):
    """A matrix, a vector and an embedding-like matrix, plus gradients of the same shapes."""
    rng = np.random.default_rng(seed)
    shapes = {"w": (3, 4), "b": (4,), "wte": (5, 3)}
    params = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    grads = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    return params, grads


def test_first_step_by_hand():
    """t = 1: m_hat = g and v_hat = g^2, so the step is lr * g / (|g| + eps), after decaying the
    matrix by (1 - lr * wd); the vector is not decayed."""
    params = {"w": np.array([[1.0, -2.0]]), "b": np.array([0.5, 3.0])}
    grads = {"w": np.array([[0.1, 4.0]]), "b": np.array([-2.0, 0.0])}
    opt = AdamW(params, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt.step(params, grads)
    decay = 1.0 - 0.01 * 0.1
    expected_w = np.array([[1.0 * decay - 0.01 * 0.1 / (0.1 + 1e-8),
                            -2.0 * decay - 0.01 * 4.0 / (4.0 + 1e-8)]])
    expected_b = np.array([0.5 + 0.01 * 2.0 / (2.0 + 1e-8), 3.0])
    np.testing.assert_allclose(params["w"], expected_w, rtol=REORDERED_FLOAT64)
    np.testing.assert_allclose(params["b"], expected_b, rtol=REORDERED_FLOAT64)
    assert opt.t == 1


@given(seeds, st.integers(1, 5), st.sampled_from([0.0, 0.1, 0.5]))
def test_steps_match_the_textbook_recursion(seed, n_steps, weight_decay):
    params, _ = random_params(seed)
    expected = {n: p.copy() for n, p in params.items()}
    m = {n: np.zeros_like(p) for n, p in params.items()}
    v = {n: np.zeros_like(p) for n, p in params.items()}
    lr, (b1, b2), eps = 3e-3, (0.8, 0.99), 1e-6
    opt = AdamW(params, lr=1.0, betas=(b1, b2), eps=eps, weight_decay=weight_decay)
    rng = np.random.default_rng(seed + 1)
    for t in range(1, n_steps + 1):
        grads = {n: rng.standard_normal(p.shape) for n, p in params.items()}
        opt.step(params, grads, lr=lr)
        for n, p in expected.items():
            m[n] = b1 * m[n] + (1 - b1) * grads[n]
            v[n] = b2 * v[n] + (1 - b2) * grads[n] ** 2
            if p.ndim == 2:
                p -= lr * weight_decay * p
            p -= lr * (m[n] / (1 - b1**t)) / (np.sqrt(v[n] / (1 - b2**t)) + eps)
    for n in params:
        np.testing.assert_allclose(params[n], expected[n], rtol=1e-12, atol=1e-15)


def test_weight_decay_only_on_matrices():
    """With zero gradients Adam's update is 0, so only the decay moves parameters: matrices
    (including the embedding) shrink by exactly (1 - lr * wd), vectors do not move."""
    params, grads = random_params(0)
    before = {n: p.copy() for n, p in params.items()}
    zeros = {n: np.zeros_like(g) for n, g in grads.items()}
    AdamW(params, lr=0.1, weight_decay=0.5).step(params, zeros)
    np.testing.assert_array_equal(params["b"], before["b"])
    for n in ("w", "wte"):
        np.testing.assert_allclose(params[n], before[n] * (1 - 0.1 * 0.5), rtol=1e-15)


def test_float32_stays_float32():
    params, grads = random_params(0, np.float32)
    opt = AdamW(params, lr=1e-3)
    opt.step(params, grads)
    assert all(p.dtype == np.float32 for p in params.values())
    assert all(a.dtype == np.float32 for a in opt.m.values())


def test_state_dict_resumes_exactly():
    params, grads = random_params(0)
    opt = AdamW(params, lr=1e-2)
    opt.step(params, grads)
    copy = {n: p.copy() for n, p in params.items()}
    resumed = AdamW(copy, lr=1e-2)
    resumed.load_state_dict(opt.state_dict())
    opt.step(params, grads)
    resumed.step(copy, grads)
    assert all(np.array_equal(params[n], copy[n]) for n in params)


def test_bad_arguments():
    params, grads = random_params(0)
    with pytest.raises(ValueError, match="lr"):
        AdamW(params, lr=0.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW(params, lr=1e-3, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay"):
        AdamW(params, lr=1e-3, weight_decay=-1.0)
    opt = AdamW(params, lr=1e-3)
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        opt.step(params, {n: g for n, g in grads.items() if n != "b"})
    with pytest.raises(ValueError, match="grads\\['w'\\] has shape"):
        opt.step(params, dict(grads, w=grads["w"].T))
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(grads, 0.0)


@given(seeds, st.floats(0.01, 100.0), st.sampled_from([np.float32, np.float64]))
def test_clipping_scales_to_max_norm_exactly(seed, max_norm, dtype):
    _, grads = random_params(seed, dtype)
    before = {n: g.copy() for n, g in grads.items()}
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    returned = clip_grad_norm(grads, max_norm)
    assert returned == pytest.approx(norm, rel=1e-12)
    rounding = 10 * float(np.finfo(dtype).eps)        # one multiply per entry
    if norm > max_norm:
        assert global_norm(grads) == pytest.approx(max_norm, rel=rounding)
        for n in grads:   # the direction is kept: every entry scaled by the same factor
            np.testing.assert_allclose(grads[n], before[n] * (max_norm / norm), rtol=rounding)
    else:
        assert all(np.array_equal(grads[n], before[n]) for n in grads)


def test_clipping_refuses_a_diverged_gradient():
    _, grads = random_params(0)
    grads["w"][0, 0] = np.inf
    with pytest.raises(ValueError, match="diverged"):
        clip_grad_norm(grads, 1.0)
