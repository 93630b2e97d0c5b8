"""``selattn demo``: the whole idea in a few seconds on the bundled checkpoints.

A selective and a standard model (same size, same training steps, both trained by ``selattn train``
on the variable-assignment task) answer held-out questions twice: with a full KV cache, and with
the per-layer budgets that ``selattn calibrate`` found for the selective model. The table shows
accuracy, budgets, KV-cache bytes and the reduction factor, and decode speed; the picture shows the
accumulated mask F of every layer on one example.

The standard model gets the same budgets for contrast: its F is zero, so its cache can only evict
the oldest token (a sliding window that keeps BOS), and a small window loses the assignments it
needs.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, TextIO, Tuple

import numpy as np

from .calibrate import read_budgets
from .mask_plot import ascii_heatmap, have_matplotlib, save_png
from .runner import ModelRunner

DATA = Path(__file__).with_name("data")
SELECTIVE = DATA / "selective.npz"
STANDARD = DATA / "standard.npz"
BUDGETS = DATA / "selective.budgets.json"
SPEED_SEQUENCES = 4     # sequences fed token by token to time decoding (batch 1)


@dataclass
class Row:
    """One line of the demo's table."""

    model: str                      # "selective" or "standard"
    cache: str                      # "full" or "calibrated"
    budgets: List[Optional[int]]
    kv_bytes: int                   # keys and values of one full-context sequence
    reduction: float                # full-cache bytes / these bytes
    accuracy: float                 # exact match of greedy answers, decoded through the caches
    decode_tokens_per_s: float      # batch 1, one KVCache.step per layer per token
    allocated_bytes: int            # what the C caches of one sequence really allocate


def decode_speed(runner: ModelRunner, token_rows: Sequence[np.ndarray], budgets
                 ) -> Tuple[float, int]:
    """Batch-1 decoding: each sequence (1, N) is fed one token at a time through fresh caches
    (the first token is a one-token prefill). Returns tokens per second and the most bytes the
    caches of one sequence allocated (whole 64-slot tiles, step scratch included)."""
    n_tokens, seconds, allocated = 0, 0.0, 0
    for tokens in token_rows:
        caches = runner.new_caches(1, budgets)
        t0 = time.perf_counter()
        for n in range(tokens.shape[1]):
            runner.forward(tokens[:, n:n + 1], caches)
        seconds += time.perf_counter() - t0
        n_tokens += tokens.shape[1]
        allocated = max(allocated, sum(c.nbytes for c in caches))
    return n_tokens / seconds, allocated


def measure(runner: ModelRunner, name: str, cache: str, budgets, examples, full_bytes: int
            ) -> Row:
    """Accuracy (greedy answers through the caches) and decode speed of one configuration."""
    answers = runner.answers([p for p, _ in examples], budgets)
    accuracy = float(np.mean([got == want for got, (_, want) in zip(answers, examples)]))
    speed_rows = [runner.encode(p + a[:-1]) for p, a in examples[:SPEED_SEQUENCES]]
    kv = runner.kv_bytes(budgets)
    speed, allocated = decode_speed(runner, speed_rows, budgets)
    return Row(model=name, cache=cache, budgets=runner.check_budgets(budgets), kv_bytes=kv,
               reduction=full_bytes / kv, accuracy=accuracy, decode_tokens_per_s=speed,
               allocated_bytes=allocated)


def format_table(rows: Sequence[Row], context: int) -> str:
    """The demo's table as aligned text."""
    header = ("model", "KV cache", "budgets per layer", "KV bytes/seq", "reduction",
              "accuracy", "decode tok/s")
    lines = []
    for r in rows:
        budgets = ", ".join(str(context if b is None else b) for b in r.budgets)
        lines.append((r.model, r.cache, budgets, f"{r.kv_bytes:,}", f"{r.reduction:.1f}x",
                      f"{100 * r.accuracy:.1f} %", f"{r.decode_tokens_per_s:,.0f}"))
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)         # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(l) for l in lines])


def run_demo(selective: Path = SELECTIVE, standard: Path = STANDARD, budgets_path: Path = BUDGETS,
             n_examples: int = 500, png: Optional[Path] = Path("selattn-masks.png"),
             use_ascii: bool = False, out: Optional[TextIO] = None) -> List[Row]:
    """Run the demo and print its report to ``out``.

    Parameters
    ----------
    selective, standard : checkpoints of ``selattn train`` (default: the bundled ones)
    budgets_path : JSON written by ``selattn calibrate`` for the selective checkpoint
    n_examples : held-out examples to answer (the first n of the selective model's held-out set)
    png : where to write the mask picture (needs matplotlib); None or ``use_ascii``: print an
        ASCII heatmap instead
    out : text stream for the report (default: sys.stdout)

    Returns
    -------
    rows : the table, selective full / calibrated, then standard full / calibrated
    """
    t_start = time.perf_counter()
    out = sys.stdout if out is None else out
    sel = ModelRunner.load(selective)
    std = ModelRunner.load(standard)
    budgets = read_budgets(budgets_path, sel.cfg.n_layers)
    if std.cfg.n_layers != sel.cfg.n_layers:
        raise ValueError(f"the standard model has {std.cfg.n_layers} layers but the selective "
                         f"one {sel.cfg.n_layers}: the budgets cannot be shared")
    if std.task != sel.task:
        raise ValueError("the two checkpoints were trained on different tasks")
    examples = sel.heldout(n_examples)
    cfg, task = sel.cfg, sel.task
    print(f"selattn demo: {len(examples)} held-out questions of the variable-assignment task "
          f"({task.n_vars} variables, up to {task.n_assignments} assignments, values 0-"
          f"{task.max_value}); {cfg.n_layers} layers x {cfg.n_heads} heads, d_model "
          f"{cfg.d_model}, context {cfg.context}", file=out)
    print(f"example: {examples[0][0]}  ->  {examples[0][1]}\n", file=out)

    rows = []
    for name, runner in (("selective", sel), ("standard", std)):
        full_bytes = runner.kv_bytes(None)
        for cache, b in (("full", None), ("calibrated", budgets)):
            rows.append(measure(runner, name, cache, b, examples, full_bytes))
    print(format_table(rows, cfg.context), file=out)
    sel_full, sel_cal, std_full, std_cal = rows
    print(f"\nKV bytes/seq: keys and values a full-context sequence keeps (float32). The C caches "
          f"allocate whole 64-slot tiles plus step scratch: {sel_full.allocated_bytes:,} bytes "
          f"unpruned, {sel_cal.allocated_bytes:,} with the budgets.", file=out)
    print(f"\nThe selective model keeps {sum(budgets)} of {cfg.n_layers} x {cfg.context} key/value "
          f"slots ({sel_cal.reduction:.1f}x less KV memory) and answers "
          f"{100 * sel_cal.accuracy:.1f} % right (full cache: {100 * sel_full.accuracy:.1f} %). "
          f"The standard model under the same budgets: {100 * std_cal.accuracy:.1f} % "
          f"(full cache: {100 * std_full.accuracy:.1f} %).", file=out)

    prompt, answer = examples[0]
    masks, labels = sel.masks(prompt + answer[:-1])
    kept = sel.held_positions(prompt + answer[:-1], budgets)
    titles = [f"layer {l}: F (budget {b})" for l, b in enumerate(budgets)]
    if png is not None and not use_ascii and have_matplotlib():
        save_png(png, masks, labels, titles=titles, kept=kept,
                 suptitle=f"selective model, accumulated masks F: {prompt} -> {answer}")
        print(f"\nwrote {png}: the accumulated mask F of every layer for the example above "
              "(rows: queries, columns: keys)", file=out)
    else:
        if png is not None and not use_ascii:
            print("\n(matplotlib is not installed: pip install 'selattn[plot]' for a PNG; "
                  "ASCII instead)", file=out)
        for mask, title, held in zip(masks, titles, kept):
            print("\n" + ascii_heatmap(mask, labels, title=title, kept=held), file=out)
    print(f"\n(demo took {time.perf_counter() - t_start:.1f} s)", file=out)
    return rows
