"""Token-by-token generation in PyTorch with pruned KV caches, on the bundled selective model.

    python examples/torch_generate.py              # 200 held-out questions
    python examples/torch_generate.py --n 50

Loads the bundled checkpoint (``selattn_lm/data/selective.npz``) into the torch port
(``selattn_lm.torch_model.TinyLM``), then answers held-out questions greedily: each prompt is
prefilled through one ``selattn_c.torch.TorchKVCache`` per layer and every answer token is one
``step`` per layer, first with full caches, then with the calibrated per-layer budgets
(``selective.budgets.json``). Prints the accuracy of both and whether every answer equals the
NumPy runner's (``selattn_lm.runner.ModelRunner``, the same C caches driven from NumPy).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import selattn_c
from selattn_lm.runner import ModelRunner
from selattn_lm.torch_model import TinyLM
import selattn_lm

DATA = Path(selattn_lm.__file__).with_name("data")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="held-out questions (default 200)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads of the kernels and of torch (default 1: the model is tiny, and "
                        "on a busy machine idle-waiting threads cost more than they bring)")
    args = p.parse_args(argv)
    selattn_c.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    runner = ModelRunner.load(DATA / "selective.npz")
    model = TinyLM.from_reference(runner.params, runner.cfg)
    budgets = json.loads((DATA / "selective.budgets.json").read_text())["budgets"]
    tokenizer = runner.tokenizer
    stop = tokenizer.encode(";")[0]
    max_answer = len(str(runner.task.max_value)) + 1                      # digits and ';'
    examples = runner.heldout(args.n)
    prompts = [prompt for prompt, _ in examples]
    for label, b in (("full", None), ("calibrated", budgets)):
        numpy_answers = runner.answers(prompts, b)
        seconds, tokens_out, correct, same = 0.0, 0, 0, 0
        for (prompt, answer), theirs in zip(examples, numpy_answers):
            tokens = torch.from_numpy(runner.encode(prompt))               # (1, N) BOS + prompt
            t0 = time.perf_counter()
            new = model.generate(tokens, max_answer, budgets=b, stop_token=stop)   # (1, T)
            seconds += time.perf_counter() - t0
            tokens_out += new.shape[1]
            text = tokenizer.decode(new[0].tolist())
            mine = text[: text.index(";") + 1] if ";" in text else text
            correct += mine == answer
            same += mine == theirs
        print(f"{label:<10} budgets {str(b or 'none'):<11} accuracy "
              f"{100 * correct / len(examples):5.1f} % of {len(examples)}; answers equal to the "
              f"NumPy runner's: {same}/{len(examples)}; {tokens_out / seconds:,.0f} tokens/s "
              "(prefill included)")


if __name__ == "__main__":
    main()
