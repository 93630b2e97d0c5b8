"""The tiny LM of ``selattn_lm.model`` as a Hugging Face ``GPT2LMHeadModel``.

Optional: ``pip install '.[hf]'``. The tiny LM is GPT-2's architecture (token and learned
positional embeddings, pre-LayerNorm blocks with a fused [q | k | v] projection and a GELU (tanh)
MLP, a final LayerNorm, a head tied to the token embedding; LayerNorm epsilon 1e-5), and GPT-2's
``Conv1D`` stores its weights as (in, out), as ``selattn_lm.model`` does, so every parameter
copies over unchanged. With ``attn_implementation="selective"`` (``selattn_c.hf``) the
transformers model computes what ``selattn_lm.runner.ModelRunner`` computes, and
``model.generate(..., cache=selattn_c.hf.SelectiveCache(config, budgets))`` decodes through
the same pruned KV caches (examples/hf_generate.py; tests/test_torch_hf.py checks the answers).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import selattn_c.hf  # noqa: F401  (registers attn_implementation="selective")

from . import model as lm
from .model import LAYERNORM_EPS, PAD

__all__ = ["gpt2_config", "to_gpt2"]

# selattn_lm.model name (block l) -> GPT2LMHeadModel name
_BLOCK_NAMES = {
    "ln1.g": "ln_1.weight", "ln1.b": "ln_1.bias",
    "attn.wqkv": "attn.c_attn.weight", "attn.bqkv": "attn.c_attn.bias",
    "attn.wo": "attn.c_proj.weight", "attn.bo": "attn.c_proj.bias",
    "ln2.g": "ln_2.weight", "ln2.b": "ln_2.bias",
    "mlp.w1": "mlp.c_fc.weight", "mlp.b1": "mlp.c_fc.bias",
    "mlp.w2": "mlp.c_proj.weight", "mlp.b2": "mlp.c_proj.bias",
}


def gpt2_config(cfg: lm.ModelConfig, **overrides) -> GPT2Config:
    """The ``GPT2Config`` of the tiny LM ``cfg``: no dropout, the selector options of ``cfg``
    (``selattn_selector_head``, ``selattn_selective``), PAD as the pad token; ``overrides``
    (e.g. ``eos_token_id``) are passed on."""
    settings = dict(
        vocab_size=cfg.vocab_size, n_positions=cfg.context, n_embd=cfg.d_model,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.mlp_ratio * cfg.d_model,
        activation_function="gelu_new", layer_norm_epsilon=LAYERNORM_EPS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=PAD,
        selattn_selector_head=cfg.selector_head, selattn_selective=cfg.selective,
    )
    settings.update(overrides)
    return GPT2Config(**settings)


def to_gpt2(params: lm.Params, cfg: lm.ModelConfig, *, attn_implementation: str = "selective",
            **config_overrides) -> GPT2LMHeadModel:
    """A float32 ``GPT2LMHeadModel`` (eval mode) holding ``params`` (the names and shapes of
    ``selattn_lm.model``, e.g. from ``selattn_lm.checkpoint.load_checkpoint``).

    Parameters
    ----------
    params : dict name -> array, checked against ``cfg``
    cfg : lm.ModelConfig
    attn_implementation : "selective" (default), or e.g. "sdpa" / "eager" for a standard model
    config_overrides : passed to ``gpt2_config``

    Returns
    -------
    model : GPT2LMHeadModel
    """
    lm.check_params(params, cfg)
    config = gpt2_config(cfg, **config_overrides)
    model = GPT2LMHeadModel._from_config(config, attn_implementation=attn_implementation)
    state = {"transformer.wte.weight": params["wte"], "transformer.wpe.weight": params["wpe"],
             "transformer.ln_f.weight": params["lnf.g"], "transformer.ln_f.bias": params["lnf.b"]}
    for l in range(cfg.n_layers):
        for ours, theirs in _BLOCK_NAMES.items():
            state[f"transformer.h.{l}.{theirs}"] = params[f"h{l}.{ours}"]
    tensors = {name: torch.from_numpy(np.asarray(value, dtype=np.float32))
               for name, value in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # the head is tied to wte: its weight is not a separate entry to load
    if unexpected or [name for name in missing if name != "lm_head.weight"]:
        raise ValueError(f"GPT-2 parameters not matched: missing {missing}, unexpected "
                         f"{unexpected}")
    model.tie_weights()
    return model.float().eval()
