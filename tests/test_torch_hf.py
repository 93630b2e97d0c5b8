"""Selective attention in Hugging Face transformers models (selattn_c.hf, selattn_lm.hf_gpt2):
attn_implementation="selective", SelectiveCache with generate(), on tiny models built from a
config (random weights, nothing downloaded) and on the bundled checkpoint as a GPT-2.

Skipped without torch or transformers (``pip install '.[hf]'``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import selattn_c  # noqa: E402
import selattn_lm  # noqa: E402
from selattn_c.hf import SelectiveCache, selective_attention_forward  # noqa: E402
from selattn_lm.hf_gpt2 import to_gpt2  # noqa: E402
from selattn_lm.runner import ModelRunner  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from helpers import assert_float32_grads_close  # noqa: E402
from tolerances import TORCH_MODEL_RTOL  # noqa: E402

DATA = Path(selattn_lm.__file__).with_name("data")
V = 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread for the kernels and torch (tiny calls; the results do not depend on it)."""
    before, before_torch = selattn_c.get_num_threads(), torch.get_num_threads()
    selattn_c.set_num_threads(1)
    torch.set_num_threads(1)
    yield
    selattn_c.set_num_threads(before)
    torch.set_num_threads(before_torch)


def llama_config(**kw):
    """2 layers, 4 query heads over 2 key/value heads (grouped-query), RoPE."""
    settings = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    initializer_range=0.2, bos_token_id=None, eos_token_id=None,
                    pad_token_id=None)
    settings.update(kw)
    return LlamaConfig(**settings)


def gpt2_config(**kw):
    settings = dict(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                    attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, initializer_range=0.2,
                    bos_token_id=None, eos_token_id=None, pad_token_id=None)
    settings.update(kw)
    return GPT2Config(**settings)


FAMILIES = {"llama": (LlamaForCausalLM, llama_config), "gpt2": (GPT2LMHeadModel, gpt2_config)}


def build(family: str, attn: str = "selective", seed: int = 0, **kw):
    cls, config = FAMILIES[family]
    torch.manual_seed(seed)
    return cls._from_config(config(**kw), attn_implementation=attn)


def tokens(B: int = 2, N: int = 16, seed: int = 1):
    return torch.randint(0, V, (B, N), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.detach().double().numpy().copy()
                         for n, p in model.named_parameters() if p.grad is not None}


def test_registered_as_selective():
    assert ALL_ATTENTION_FUNCTIONS["selective"] is selective_attention_forward
    assert build("llama").config._attn_implementation == "selective"


# ----------------------------------------------------------------------------------------------
# Training: the forward and every gradient


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_not_selective_is_what_sdpa_computes(family):
    """``selattn_selective=False`` in the config: the same weights with "sdpa" give the same loss
    and gradients (float32 rounding apart), so the layouts (heads, GQA, the scale, the output's
    transpose) are right."""
    ids = tokens()
    ours = build(family, selattn_selective=False)
    sdpa = build(family, attn="sdpa", selattn_selective=False)
    sdpa.load_state_dict(ours.state_dict())
    loss, grads = loss_and_grads(ours, ids)
    loss_sdpa, grads_sdpa = loss_and_grads(sdpa, ids)
    assert loss == pytest.approx(loss_sdpa, rel=TORCH_MODEL_RTOL)
    for name in grads_sdpa:
        diff = np.linalg.norm(grads[name] - grads_sdpa[name])
        assert diff <= 10 * TORCH_MODEL_RTOL * (np.linalg.norm(grads_sdpa[name]) + 1e-6), name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_gradients_match_the_float64_twin(family):
    """float32 (the C kernels) against the same model in float64 (the listing in torch
    operations): the loss and every gradient tensor within TORCH_MODEL_RTOL; and the selector
    is live (the loss differs from standard attention's)."""
    ids = tokens()
    model = build(family)
    twin = build(family).double()
    twin.load_state_dict({n: p.double() for n, p in model.state_dict().items()})
    loss, grads = loss_and_grads(model, ids)
    loss64, grads64 = loss_and_grads(twin, ids)
    assert loss == pytest.approx(loss64, rel=TORCH_MODEL_RTOL)
    assert_float32_grads_close({n: g.astype(np.float32) for n, g in grads.items()}, grads64,
                               TORCH_MODEL_RTOL)
    standard = build(family, selattn_selective=False)
    standard.load_state_dict(model.state_dict())
    assert abs(loss_and_grads(standard, ids)[0] - loss) > 10 * TORCH_MODEL_RTOL * loss


# ----------------------------------------------------------------------------------------------
# Decoding through SelectiveCache


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("budgets", [None, [6, 3]])
def test_decoding_token_by_token_equals_the_prefill(family, budgets):
    """Logits of a whole-sequence prefill through a SelectiveCache against a 5-token prefill then
    one token at a time through another; unbudgeted, both equal the forward without a cache."""
    model, ids = build(family), tokens(N=20)
    with torch.no_grad():
        whole = model(ids, cache=SelectiveCache(model.config, budgets), use_cache=True).logits
        cache = SelectiveCache(model.config, budgets)
        parts = [model(ids[:, :5], cache=cache, use_cache=True).logits]
        parts += [model(ids[:, i:i + 1], cache=cache, use_cache=True).logits
                  for i in range(5, 20)]
        no_cache = model(ids, use_cache=False).logits
    decoded = torch.cat(parts, dim=1)
    scale = float(whole.abs().max())
    assert float((decoded - whole).abs().max()) <= TORCH_MODEL_RTOL * scale
    assert cache.get_seq_length() == 20
    if budgets is None:
        assert float((whole - no_cache).abs().max()) <= TORCH_MODEL_RTOL * scale
    else:
        held = [int(layer.held.max()) for layer in cache.layers]
        assert held == budgets
        assert float((whole - no_cache).abs().max()) > TORCH_MODEL_RTOL * scale  # it prunes


def test_generate_through_the_cache_equals_generate_without_one():
    model, ids = build("llama"), tokens(B=2, N=8)
    cached = model.generate(ids, cache=SelectiveCache(model.config), max_new_tokens=6,
                            do_sample=False)
    uncached = model.generate(ids, use_cache=False, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, uncached)


def test_the_bundled_model_as_gpt2_equals_the_projects_runner():
    """The bundled selective checkpoint loaded into a GPT2LMHeadModel: logits as the runner's, and
    generate() with SelectiveCache and the calibrated per-layer budgets answers exactly as
    ModelRunner.generate does (one prompt at a time, and a batch of equal-length prompts)."""
    runner = ModelRunner.load(DATA / "selective.npz")
    budgets = json.loads((DATA / "selective.budgets.json").read_text())["budgets"]
    stop = runner.tokenizer.encode(";")[0]
    model = to_gpt2(runner.params, runner.cfg, eos_token_id=stop)
    examples = runner.heldout(40)
    first = runner.encode(examples[0][0])
    with torch.no_grad():
        logits = model(torch.from_numpy(first)).logits.numpy()
    want = runner.logits(first)
    assert float(np.abs(logits - want).max()) <= TORCH_MODEL_RTOL * float(np.abs(want).max())
    for prompt, _ in examples[:8]:
        ids = runner.encode(prompt)
        out = model.generate(torch.from_numpy(ids), cache=SelectiveCache(model.config, budgets),
                             max_new_tokens=3, do_sample=False)
        np.testing.assert_array_equal(out[:, ids.shape[1]:].numpy(),
                                      runner.generate(ids, 3, budgets, stop))
    by_length = {}
    for prompt, _ in examples:
        ids = runner.encode(prompt)
        by_length.setdefault(ids.shape[1], []).append(ids)
    batch = np.concatenate(max(by_length.values(), key=len))               # (B, N)
    assert batch.shape[0] >= 2
    out = model.generate(torch.from_numpy(batch), cache=SelectiveCache(model.config, budgets),
                         max_new_tokens=3, do_sample=False)
    new = out[:, batch.shape[1]:].numpy()
    want = runner.generate(batch, 3, budgets, stop)
    # generate pads a row that stopped early with PAD; the runner keeps decoding it
    for row, want_row in zip(new, want):
        n = int(np.argmax(want_row == stop)) + 1 if (want_row == stop).any() else len(want_row)
        np.testing.assert_array_equal(row[:n], want_row[:n])


# ----------------------------------------------------------------------------------------------
# What it refuses


def test_decoding_without_a_selective_cache_is_refused():
    model = build("llama")
    with pytest.raises(ValueError, match="SelectiveCache"):
        model.generate(tokens(N=6), max_new_tokens=3, do_sample=False)


def test_padding_dropout_beam_search_and_bad_budgets_are_refused():
    model, ids = build("gpt2"), tokens(N=6)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padding"):
        model(ids, attention_mask=mask)
    model(ids, attention_mask=torch.ones_like(ids))                      # no padding: fine
    dropping = build("gpt2", attn_pdrop=0.1).train()
    with pytest.raises(ValueError, match="attn_pdrop"):
        dropping(ids)
    with pytest.raises(ValueError, match="beam search"):
        model.generate(ids, cache=SelectiveCache(model.config), num_beams=2, max_new_tokens=3,
                       do_sample=False)
    with pytest.raises(ValueError, match="2 layers"):
        SelectiveCache(model.config, [4, 4, 4])
    with pytest.raises(ValueError, match="budget"):
        SelectiveCache(model.config, 1)


def test_masks_other_than_causal_are_refused():
    from selattn_c.hf import selective_mask
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function
    assert selective_mask(2, 5, 5, attention_mask=torch.ones(2, 5, dtype=torch.bool)) is None
    with pytest.raises(ValueError, match="sliding windows"):
        selective_mask(2, 5, 5, mask_function=sliding_window_causal_mask_function(3))
    with pytest.raises(ValueError, match="padding"):
        selective_mask(2, 5, 5, mask_function=causal_mask_function,
                       attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]).bool())


def test_the_example_runs():
    root = Path(__file__).resolve().parent.parent
    script = root / "examples" / "hf_generate.py"
    if not script.exists():
        pytest.skip("examples/ is not next to the tests")
    proc = subprocess.run([sys.executable, str(script), "--n", "4"], capture_output=True,
                          text=True, timeout=600, cwd=root / "examples")
    assert proc.returncode == 0, proc.stderr
    assert "held per layer [6, 4]" in proc.stdout
    assert proc.stdout.count("answers equal to the project's runner's: 4/4") == 2
