"""The whole tiny LM's ``backward`` against centred finite differences of ``forward``, in float64.

Tiny configs (vocabulary 7, context 8, 2 layers, 2 heads, d_model 8), weights drawn large enough
that attention logits are of order 1, and eps = 1.0 so the memory loss weighs as much as the
cross-entropy. The loss is only piecewise smooth: relu(selector logit) has a kink at 0, min(F, tau)
at tau, and the memory loss' max over rows switches where two rows tie. A centred step that
crosses one of these measures neither one-sided derivative, so each perturbed component whose
"kink signature" (every relu gate, every argmax row, every F < tau gate of those rows; with soft
budgets, every rank-penalty cut) differs at x - h, x or x + h is skipped, and counted: at most
MODEL_FD_MAX_SKIPPED of a tensor may be.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import pytest

from helpers import rel_error, soft_signature
from selattn_lm import model as M
from selattn_reference.attention import rank_penalty, selection_constraints
from tolerances import (
    FD_STEP,
    MODEL_FD_MAX_REL_ERROR,
    MODEL_FD_MAX_SKIPPED,
    MODEL_FD_NOISE_TERMS,
)

EPS64 = float(np.finfo(np.float64).eps)
TINY = dict(vocab_size=7, context=8, n_layers=2, n_heads=2, d_model=8, mlp_ratio=2)


def tiny_problem(cfg: M.ModelConfig, seed: int, weight_std: float):
    """float64 params (init plus N(0, weight_std) so logits are O(1)), tokens in 1..V-1 with the
    last two positions of batch element 1 padded, random targets and a random target mask."""
    rng = np.random.default_rng(seed)
    params = M.init_params(cfg, seed=seed, dtype=np.float64)
    for name, p in params.items():
        p += weight_std * rng.standard_normal(p.shape)
    B, N = 2, cfg.context
    tokens = rng.integers(1, cfg.vocab_size, (B, N))                       # (B, N) no PAD
    tokens[1, -2:] = M.PAD                                                 # right padding
    targets = rng.integers(1, cfg.vocab_size, (B, N))                      # (B, N)
    target_mask = (rng.random((B, N)) < 0.7) & (tokens != M.PAD)           # (B, N)
    target_mask[0, -1] = True                                              # never empty
    return params, tokens, targets, target_mask


def kink_signature(cache: M.ModelCache) -> Tuple:
    """Every discrete choice the loss makes: the relu gates of the selector logits that can enter
    S, and, with the memory loss, each layer's argmax row and the F < tau gates of that row."""
    cfg = cache.cfg
    if not cfg.selective:
        return ()
    N = cache.tokens.shape[1]
    allowed = selection_constraints(N, protect_bos=True)                   # (N, N)
    parts = []
    for ctx in cache.attention_contexts:
        parts.append((ctx.L[:, cfg.selector_head][:, allowed] > 0).tobytes())
        parts.append(soft_signature(ctx))                # the rank penalty's cuts (§ 10)
    for F in cache.memory_masks or []:
        kept = np.where(np.tri(N, dtype=bool), 1.0 - np.minimum(F, cfg.tau) / cfg.tau, 0.0)
        row = kept.sum(axis=-1).argmax(axis=-1)                            # (B,)
        parts.append(row.tobytes())
        parts.append((F[np.arange(len(row)), row] < cfg.tau).tobytes())
    return tuple(parts)


def whole_model_errors(cfg: M.ModelConfig, seed: int, weight_std: float, soft_budgets=None
                       ) -> Dict[str, Tuple[float, float]]:
    """Per parameter tensor: (CS231n relative error, share of components skipped at a kink)."""
    params, tokens, targets, target_mask = tiny_problem(cfg, seed, weight_std)
    _, losses, cache = M.forward(params, cfg, tokens, targets, target_mask,
                                 soft_budgets=soft_budgets)
    analytic = M.backward(cache)
    base = kink_signature(cache)
    noise = EPS64 * (1.0 + abs(losses["total"])) * MODEL_FD_NOISE_TERMS / FD_STEP
    floor = noise / MODEL_FD_MAX_REL_ERROR

    def total_and_signature():
        _, losses, cache = M.forward(params, cfg, tokens, targets, target_mask,
                                     soft_budgets=soft_budgets)
        return losses["total"], kink_signature(cache)

    results = {}
    for name, x in params.items():
        numeric = np.zeros_like(x)
        checked = np.zeros(x.shape, dtype=bool)
        for index in np.ndindex(x.shape):
            old = x[index]
            x[index] = old + FD_STEP
            plus, sig_plus = total_and_signature()
            x[index] = old - FD_STEP
            minus, sig_minus = total_and_signature()
            x[index] = old
            if sig_plus == base and sig_minus == base:
                numeric[index] = (plus - minus) / (2.0 * FD_STEP)
                checked[index] = True
        error = rel_error(analytic[name][checked], numeric[checked], floor=floor)
        results[name] = (error, 1.0 - checked.mean())
    return results


@pytest.mark.parametrize("options, seed, weight_std, soft_budgets", [
    (dict(selective=True, eps=1.0, tau=1.0), 0, 0.3, None),
    (dict(selective=True, eps=1.0, tau=0.3, selector_head=1), 1, 0.5, None),
    (dict(selective=False, eps=1.0), 2, 0.5, None),
    (dict(selective=True, eps=1.0, tau=1.0), 3, 0.5, [3, 4]),      # pruning-aware training
])
def test_whole_model_gradient_matches_finite_differences(options, seed, weight_std, soft_budgets):
    cfg = M.ModelConfig(**TINY, **options)
    results = whole_model_errors(cfg, seed, weight_std, soft_budgets)
    assert set(results) == set(M.param_shapes(cfg))
    worst = {name: error for name, (error, _) in results.items()
             if error > MODEL_FD_MAX_REL_ERROR}
    assert not worst, f"relative errors above {MODEL_FD_MAX_REL_ERROR}: {worst}"
    skipped = {name: share for name, (_, share) in results.items()
               if share > MODEL_FD_MAX_SKIPPED}
    assert not skipped, f"too many components skipped at kinks: {skipped}"


def test_the_memory_loss_term_is_live_in_the_gradcheck():
    """The selective configs above must actually exercise the memory loss: mem > 0 with a
    gradient that changes the selector head's weights (otherwise the check proves nothing)."""
    cfg = M.ModelConfig(**TINY, selective=True, eps=1.0, tau=1.0)
    params, tokens, targets, target_mask = tiny_problem(cfg, 0, 0.3)
    _, losses, cache = M.forward(params, cfg, tokens, targets, target_mask)
    with_mem = M.backward(cache)
    _, _, cache = M.forward(params, M.ModelConfig(**TINY, selective=True, eps=0.0), tokens,
                            targets, target_mask)
    without_mem = M.backward(cache)
    assert losses["mem"] > 0.1
    hd = cfg.head_dim
    selector_q = slice(cfg.selector_head * hd, (cfg.selector_head + 1) * hd)
    change = with_mem["h0.attn.wqkv"][:, selector_q] - without_mem["h0.attn.wqkv"][:, selector_q]
    assert np.abs(change).max() > 1e-3


def test_the_rank_penalty_is_live_in_the_gradcheck():
    """The soft-budget config above must have keys past a cut in both layers and a loss and a
    gradient that differ from the plain model's (otherwise its check proves nothing)."""
    cfg = M.ModelConfig(**TINY, selective=True, eps=1.0, tau=1.0)
    params, tokens, targets, target_mask = tiny_problem(cfg, 3, 0.5)
    _, plain, plain_cache = M.forward(params, cfg, tokens, targets, target_mask)
    _, soft, soft_cache = M.forward(params, cfg, tokens, targets, target_mask,
                                    soft_budgets=[3, 4])
    for ctx, budget in zip(soft_cache.attention_contexts, [3, 4]):
        F_soft, _ = rank_penalty(ctx.F, budget)
        assert (F_soft > ctx.F).any()
    assert soft["ce"] != plain["ce"]
    g_plain, g_soft = M.backward(plain_cache), M.backward(soft_cache)
    assert rel_error(g_soft["h0.attn.wqkv"], g_plain["h0.attn.wqkv"]) > 1e-3
    with pytest.raises(ValueError, match="soft_budgets must have one entry per layer"):
        M.forward(params, cfg, tokens, targets, target_mask, soft_budgets=[3])
