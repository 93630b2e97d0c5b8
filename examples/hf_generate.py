"""Selective attention in Hugging Face transformers: train a step, generate with pruned caches.

    python examples/hf_generate.py              # 100 held-out questions
    python examples/hf_generate.py --n 20

Needs ``pip install '.[hf]'``; nothing is downloaded. Two parts:

1. A tiny Llama (2 layers, 4 query heads over 2 key/value heads) built from a config with
   ``attn_implementation="selective"``: one AdamW step on random tokens (the loss, before and
   after), then ``generate`` through a ``SelectiveCache`` of 6 and 4 slots per layer.
2. The bundled selective checkpoint (``selattn_lm/data/selective.npz``) as a
   ``GPT2LMHeadModel`` (``selattn_lm.hf_gpt2.to_gpt2``): held-out questions answered by
   ``model.generate(..., cache=SelectiveCache(config, budgets))`` with full caches and with the
   calibrated per-layer budgets; prints the accuracy and how many answers equal this project's
   runner's (``selattn_lm.runner.ModelRunner``, the same weights).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import selattn_c
import selattn_lm
from selattn_c.hf import SelectiveCache
from selattn_lm.hf_gpt2 import to_gpt2
from selattn_lm.runner import ModelRunner

DATA = Path(selattn_lm.__file__).with_name("data")


def tiny_llama() -> None:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None, selattn_selector_head=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation="selective")
    ids = torch.randint(0, 64, (4, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = model(ids, labels=ids).loss
    print(f"llama: loss {loss.item():.4f} -> {after.item():.4f} after one AdamW step")
    cache = SelectiveCache(model.config, budgets=[6, 4])
    out = model.generate(ids[:1, :10], cache=cache, max_new_tokens=12, do_sample=False)
    held = [int(layer.held.max()) for layer in cache.layers]
    print(f"llama: generated {out.shape[1] - 10} tokens; tokens seen {cache.get_seq_length()}, "
          f"held per layer {held}")


def bundled_gpt2(n: int) -> None:
    runner = ModelRunner.load(DATA / "selective.npz")
    budgets = json.loads((DATA / "selective.budgets.json").read_text())["budgets"]
    stop = runner.tokenizer.encode(";")[0]
    model = to_gpt2(runner.params, runner.cfg, eos_token_id=stop)
    examples = runner.heldout(n)
    max_answer = len(str(runner.task.max_value)) + 1                      # digits and ';'
    for label, b in (("full", None), ("calibrated", budgets)):
        theirs = runner.answers([prompt for prompt, _ in examples], b)
        correct = same = 0
        for (prompt, answer), their_answer in zip(examples, theirs):
            ids = torch.from_numpy(runner.encode(prompt))                  # (1, N) BOS + prompt
            out = model.generate(ids, cache=SelectiveCache(model.config, b),
                                 max_new_tokens=max_answer, do_sample=False)
            text = runner.tokenizer.decode(out[0, ids.shape[1]:].tolist())
            mine = text[: text.index(";") + 1] if ";" in text else text
            correct += mine == answer
            same += mine == their_answer
        print(f"gpt2 {label:<10} budgets {str(b):<12} accuracy {100 * correct / n:.1f} % of "
              f"{n}; answers equal to the project's runner's: {same}/{n}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="held-out questions (default 100)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads of the kernels and of torch (default 1: the models are tiny)")
    args = p.parse_args(argv)
    selattn_c.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    tiny_llama()
    bundled_gpt2(args.n)


if __name__ == "__main__":
    main()
