"""What a trained checkpoint gets wrong on its held-out set, and whether a value's digits can see
the name they belong to in the first layer.

    python tools/analyse_errors.py selattn_lm/data/selective-2layer.npz   # needs an installed selattn_c

Prints, for the checkpoint's own held-out set (the one ``selattn eval`` scores):

1. exact match, and the wrong answers sorted by kind: the last value of another variable, an older
   value of the queried variable, an older value of another variable, or none of these;
2. which answer character is the first wrong one (the first digit, the second, or the ';');
3. the error rate by queried variable and by how many assignments ago it was last assigned;
4. (selective models) layer 0's accumulated mask F on the variable's *name* as seen from each
   character of its value (first digit, second digit, ';'), and each head's attention weight on
   that name: a character whose F on its name is large cannot read in layer 0 which variable it
   belongs to.

Every number comes from one teacher-forced forward pass of the NumPy reference model (float64).
"""

from __future__ import annotations

import argparse
import collections
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from selattn_lm.task_registry import load_task_checkpoint
from selattn_lm import model as lm
from selattn_lm.tasks import Example, encode_batch


def parse(prompt: str) -> Tuple[str, List[Tuple[int, str, str]]]:
    """The queried variable and the assignments of a prompt as (token position of the name, name,
    value); token positions count BOS as 0."""
    if len(prompt) < 2 or prompt[-1] != "=":
        raise ValueError(f"not a prompt of the task: {prompt!r}")
    assignments, pos = [], 1
    for part in prompt[:-2].split(";")[:-1]:
        assignments.append((pos, part[0], part[2:]))
        pos += len(part) + 1
    return prompt[-2], assignments


def kind_of_error(prompt: str, predicted: str) -> str:
    """Sort a wrong answer (without its ';') into one of four kinds."""
    query, assignments = parse(prompt)
    last = {name: value for _, name, value in assignments}
    if predicted in {v for n, v in last.items() if n != query}:
        return "last value of another variable"
    if predicted in {v for _, n, v in assignments if n == query}:
        return "older value of the queried variable"
    if predicted in {v for _, _, v in assignments}:
        return "older value of another variable"
    return "none of these"


def analyse(path: Path, n: int, out=sys.stdout) -> Dict[str, object]:
    """Run the analysis on the first ``n`` held-out examples of the checkpoint; print it to
    ``out`` and return the main counts."""
    params, cfg, assign, _ = load_task_checkpoint(path, expect="assign")
    examples: Sequence[Example] = assign.heldout[:n]
    tokenizer = assign.tokenizer
    tokens, targets, mask = encode_batch(tokenizer, examples, cfg.context)
    # eps > 0 makes forward keep every layer's F (it does not change the logits)
    run_cfg = replace(cfg, eps=1.0) if cfg.selective else cfg
    logits, _, cache = lm.forward(params, run_cfg, tokens, targets, mask)
    pred = logits.argmax(axis=-1)                                           # (B, N)
    right = ((pred == targets) | ~mask).all(axis=1)                          # (B,)
    print(f"{path}: {right.sum()} of {len(examples)} right "
          f"({100 * right.mean():.1f}% exact match)", file=out)

    kinds: collections.Counter = collections.Counter()
    first_wrong: collections.Counter = collections.Counter()
    by_var: Dict[str, List[int]] = collections.defaultdict(lambda: [0, 0])
    by_ago: Dict[int, List[int]] = collections.defaultdict(lambda: [0, 0])
    for b, (prompt, answer) in enumerate(examples):
        query, assignments = parse(prompt)
        ago = len(assignments) - 1 - max(i for i, a in enumerate(assignments) if a[1] == query)
        for table, key in ((by_var, query), (by_ago, min(ago, 8))):
            table[key][0] += 1
            table[key][1] += int(not right[b])
        if right[b]:
            continue
        cols = np.flatnonzero(mask[b])
        text = tokenizer.decode(pred[b, cols])
        kinds[kind_of_error(prompt, text.split(";")[0])] += 1
        wrong = int(np.flatnonzero(pred[b, cols] != targets[b, cols])[0])
        first_wrong["';'" if wrong == len(answer) - 1 else f"digit {wrong + 1}"] += 1
    print("wrong answers by kind: " + ", ".join(f"{k}: {v}" for k, v in kinds.most_common()),
          file=out)
    print("first wrong character: " + ", ".join(f"{k}: {v}" for k, v in
                                                sorted(first_wrong.items())), file=out)
    print("errors by queried variable: " + ", ".join(
        f"{k}: {e}/{t}" for k, (t, e) in sorted(by_var.items())), file=out)
    print("errors by assignments since the queried variable's last one (8 = 8 or more): " +
          ", ".join(f"{k}: {e}/{t}" for k, (t, e) in sorted(by_ago.items())), file=out)

    result: Dict[str, object] = {"right": int(right.sum()), "n": len(examples),
                                 "kinds": dict(kinds), "first_wrong": dict(first_wrong)}
    if not cfg.selective:
        return result
    F0 = cache.Fs[0]                                                         # (B, N, N)
    P0 = cache.attention_contexts[0].P                                       # (B, H, N, N)
    seen: Dict[str, List[np.ndarray]] = collections.defaultdict(list)
    for b, (prompt, _) in enumerate(examples):
        for name_pos, _, value in parse(prompt)[1]:
            for k in range(len(value) + 1):                # the value's digits, then its ';'
                row = name_pos + 2 + k
                label = (f"digit {k + 1}" if k < len(value) else "';'") + \
                    f" of a {len(value)}-digit value"
                seen[label].append(np.concatenate([[F0[b, row, name_pos]],
                                                   P0[b, :, row, name_pos]]))
    print("layer 0, each character of a value looking at its variable's name "
          "(medians over the examples):", file=out)
    heads = " ".join(f"weight h{h}" for h in range(P0.shape[1]))
    print(f"  {'character':26s} {'F on name':>9s} {heads}", file=out)
    medians = {}
    for label in sorted(seen):
        med = np.median(np.array(seen[label]), axis=0)
        medians[label] = med
        print(f"  {label:26s} {med[0]:9.2f} " + " ".join(f"{w:9.3f}" for w in med[1:]), file=out)
    result["layer0_name_medians"] = {k: v.tolist() for k, v in medians.items()}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--n", type=int, default=500, help="held-out examples to analyse [500]")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    analyse(args.checkpoint, args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
