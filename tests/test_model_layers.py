"""Each forward/backward pair of the tiny LM against centred finite differences, in float64.

Every pair is checked through the scalar ``sum(out * dout)`` with a random upstream ``dout``, over
Hypothesis-drawn shapes and seeds. The layers here are smooth (LayerNorm, GELU, linear, the
embedding, the tied head, the masked cross-entropy), so no input needs to be skipped.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from helpers import numerical_gradient, rel_error
from selattn_lm import model as M
from tolerances import FD_MAX_REL_ERROR, FD_STEP, REORDERED_FLOAT64

EPS64 = float(np.finfo(np.float64).eps)

seeds = st.integers(0, 2**32 - 1)
small = st.integers(1, 4)


def check_pair(f, arrays, analytic, dout_size: float = 1.0) -> None:
    """Compare ``analytic`` gradients of ``sum(f() * dout)`` with centred differences over each
    array in ``arrays`` (perturbed in place). ``f`` returns the layer's output; the terms of the
    scalar are returned to ``numerical_gradient`` unsummed (it cancels them term by term)."""
    for name, x in arrays.items():
        numeric = numerical_gradient(f, x, FD_STEP)
        # rounding noise of one difference: eps64 * |largest term| / h (see FD_NOISE_FACTOR)
        noise = EPS64 * (1.0 + np.abs(f()).max()) * dout_size / FD_STEP
        error = rel_error(analytic[name], numeric, floor=noise / FD_MAX_REL_ERROR)
        assert error <= FD_MAX_REL_ERROR, f"{name}: relative error {error:.3g}"


@given(seeds, small, small, st.integers(1, 9))
def test_layernorm_pair(seed, B, N, d):
    rng = np.random.default_rng(seed)
    # LayerNorm's n-th derivatives grow as 1 / std(row)^n, so a row of nearly equal entries makes
    # the centred difference's truncation error large (std 0.1 already gives 1e-6). Rows are
    # drawn with std exactly 3 around a random mean (d = 1: a constant row, y = b exactly).
    z = rng.standard_normal((B, N, d))                                     # (B, N, d)
    if d > 1:
        z = (z - z.mean(axis=-1, keepdims=True)) / z.std(axis=-1, keepdims=True)
    x = 3.0 * z + rng.standard_normal((B, N, 1))                           # (B, N, d)
    g, b = rng.standard_normal(d), rng.standard_normal(d)                  # (d,)
    dy = rng.standard_normal((B, N, d))                                    # (B, N, d)
    _, cache = M.layernorm_forward(x, g, b)
    dx, dg, db = M.layernorm_backward(dy, cache)
    check_pair(lambda: M.layernorm_forward(x, g, b)[0] * dy, {"x": x, "g": g, "b": b},
               {"x": dx, "g": dg, "b": db})


@given(seeds)
def test_gelu_pair(seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((3, 5, 7)) * 3.0                               # (B, N, r d)
    dy = rng.standard_normal(a.shape)
    da = M.gelu_backward(dy, M.gelu_forward(a)[1])
    check_pair(lambda: M.gelu_forward(a)[0] * dy, {"a": a}, {"a": da})


def test_gelu_is_the_tanh_approximation():
    a = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    expected = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
    np.testing.assert_allclose(M.gelu_forward(a)[0], expected, rtol=REORDERED_FLOAT64,
                               atol=REORDERED_FLOAT64)


@given(seeds, small, small, st.integers(1, 3), st.integers(1, 2))
def test_mlp_pair(seed, B, N, heads, ratio):
    d = 2 * heads
    cfg = M.ModelConfig(vocab_size=5, context=N, n_layers=1, n_heads=heads, d_model=d,
                        mlp_ratio=ratio)
    rng = np.random.default_rng(seed)
    params = {name: rng.standard_normal(shape)
              for name, shape in M.param_shapes(cfg).items()}
    h = rng.standard_normal((B, N, d))                                     # (B, N, d)
    dy = rng.standard_normal((B, N, d))
    dh, grads = M.mlp_backward(dy, M.mlp_forward(h, params, 0)[1])
    names = ["h0.mlp.w1", "h0.mlp.b1", "h0.mlp.w2", "h0.mlp.b2"]
    assert sorted(grads) == sorted(names)
    check_pair(lambda: M.mlp_forward(h, params, 0)[0] * dy,
               {"h": h, **{n: params[n] for n in names}}, {"h": dh, **grads})


@given(seeds, small, st.integers(1, 6))
def test_embedding_and_tied_head_pair(seed, B, N):
    """logits = lnf(wte[tokens] + wpe[:N]) @ wte.T: wte gets both the head's and the
    embedding's share, which is what the model's backward adds up."""
    cfg = M.ModelConfig(vocab_size=6, context=7, n_layers=1, n_heads=1, d_model=4)
    rng = np.random.default_rng(seed)
    params = {name: rng.standard_normal(shape) for name, shape in M.param_shapes(cfg).items()}
    tokens = rng.integers(0, cfg.vocab_size, (B, N))                       # (B, N)
    dlogits = rng.standard_normal((B, N, cfg.vocab_size))                  # (B, N, V)

    def logits():
        return M.head_logits(M.embed(params, tokens), params)              # (B, N, V)

    dx, grads = M.head_backward(dlogits, M.head_forward(M.embed(params, tokens), params)[1])
    dwte, dwpe = M.embed_backward(dx, tokens, cfg.vocab_size, cfg.context)
    analytic = {"wte": grads["wte"] + dwte, "wpe": dwpe, "lnf.g": grads["lnf.g"],
                "lnf.b": grads["lnf.b"]}
    check_pair(lambda: logits() * dlogits, {n: params[n] for n in analytic}, analytic)


@given(seeds, small, small, st.booleans())
def test_cross_entropy_pair_with_mask(seed, B, N, float_weights):
    V = 5
    rng = np.random.default_rng(seed)
    logits = 3.0 * rng.standard_normal((B, N, V))                          # (B, N, V)
    targets = rng.integers(0, V, (B, N))                                   # (B, N)
    weights = rng.random((B, N)) if float_weights else (rng.random((B, N)) < 0.5) * 1.0
    weights[0, 0] = 1.0                                                    # a non-empty mask
    loss, cache = M.cross_entropy_forward(logits, targets, weights)
    # the definition: the weighted mean of -log softmax at the targets
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, (weights * nll).sum() / weights.sum(), rtol=1e-12)
    dlogits = M.cross_entropy_backward(1.0, cache)
    # masked-out positions get no gradient at all
    assert np.all(dlogits[weights == 0] == 0)
    check_pair(lambda: np.atleast_1d(M.cross_entropy_forward(logits, targets, weights)[0]),
               {"logits": logits}, {"logits": dlogits})


@given(seeds, small, small, st.integers(1, 3), st.integers(1, 3))
def test_head_split_and_merge_are_adjoint_to_their_backward(seed, B, N, H, hd):
    """<split(x), g> == <x, split_backward(g)> (and the same for merge): the backward of a pure
    reshape/transpose is its adjoint, exactly."""
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, N, 3 * H * hd))                          # (B, N, 3d)
    grads = [rng.standard_normal((B, H, N, hd)) for _ in range(3)]         # (B, H, N, hd) x 3
    lhs = sum(np.vdot(part, g) for part, g in zip(M.split_heads(qkv, H), grads))
    rhs = np.vdot(qkv, M.split_heads_backward(*grads))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)
    o, dy = grads[0], rng.standard_normal((B, N, H * hd))
    np.testing.assert_allclose(np.vdot(M.merge_heads(o), dy),
                               np.vdot(o, M.merge_heads_backward(dy, H)), rtol=1e-12)


@given(seeds, small, small)
def test_linear_pair(seed, B, N):
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((B, N, 3)), rng.standard_normal((3, 4)), rng.standard_normal(4)
    dy = rng.standard_normal((B, N, 4))
    dx, dw, db = M.linear_backward(dy, M.linear_forward(x, w, b)[1])
    check_pair(lambda: M.linear_forward(x, w, b)[0] * dy, {"x": x, "w": w, "b": b},
               {"x": dx, "w": dw, "b": db})
