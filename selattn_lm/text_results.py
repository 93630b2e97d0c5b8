"""Bits per byte against KV budget on real text: the selective model's pruned cache against a
standard model of the same size with a sliding window and with H2O.

``selattn text-results`` (``run``) scores two checkpoints of ``selattn train --task text`` (by
default the bundled ones) on the test split of ``selattn_lm.text``:

- both models with the full cache;
- the selective model with a pruned cache of ``fraction x context`` slots in every layer
  (``selattn_c.forward(budget=)``: the KV cache's own eviction rule), and with per-layer budgets
  found by the greedy search of ``selattn_lm.calibrate`` on the validation split (criterion: bits
  per byte). The search runs once with no tolerance, down to the smallest budgets, and each
  fraction takes the first budgets on its path that fit (``budgets_on_path``); the "calibrated"
  budgets are the smallest on the path whose validation bits per byte are within
  ``tolerance`` (relative, 1 %) of the full cache's;
- the standard model under ``SlidingWindow`` (BOS plus the most recent tokens) and
  ``HeavyHitters`` (H2O) with the same number of slots in every layer
  (``selattn_reference.eviction_baselines``).

It prints a Markdown table, writes the numbers as JSON and the curve as a PNG (with matplotlib),
and can rewrite the table inside ``docs/results-text.md`` between its markers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from selattn_reference.eviction_baselines import HeavyHitters, SlidingWindow

from .backends import CAttention
from .calibrate import Score, greedy_calibrate
from .doc_markers import replace_between_markers
from .progress import progress_bar
from .task_registry import load_task_checkpoint
from .task_text import bits_per_byte
from .text import eval_windows
from .threads import set_threads

DATA = Path(__file__).with_name("data")
DEFAULT_SELECTIVE = DATA / "text-selective.npz"
DEFAULT_STANDARD = DATA / "text-standard.npz"
DEFAULT_FRACTIONS = (1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32)
DEFAULT_TOLERANCE = 0.01          # calibrated: within 1 % of the full cache's bits per byte
SEARCH_FRACTIONS = (0.5, 0.75)    # the greedy search's reductions of one layer's budget per step
TABLE_BEGIN = "<!-- text-results table: begin (selattn text-results --update-doc) -->"
TABLE_END = "<!-- text-results table: end -->"


def budgets_on_path(path: Sequence[Tuple[Tuple[int, ...], float]], context: int,
                    fraction: float) -> Optional[Tuple[int, ...]]:
    """The first budgets of a search path (a list of (budgets, score), memory decreasing) whose
    total is at most ``fraction`` of the full cache (layers x context), or None."""
    for budgets, _ in path:
        if sum(budgets) <= fraction * len(budgets) * context + 1e-9:
            return budgets
    return None


def calibrated_on_path(path: Sequence[Tuple[Tuple[int, ...], float]], full: float,
                       tolerance: float) -> Tuple[Tuple[int, ...], float]:
    """The smallest budgets on the path whose score is within ``tolerance`` (relative) of
    ``full``; the path starts at the full cache, so there always is one."""
    ok = [(b, s) for b, s in path if s <= full * (1.0 + tolerance) + 1e-12]
    return min(ok, key=lambda bs: (sum(bs[0]), bs[1]))


def search_path(score: Callable[[Tuple[int, ...]], float], n_layers: int, context: int,
                minimum: int = 2, log=None, tolerance: float = 1e30
                ) -> List[Tuple[Tuple[int, ...], float]]:
    """The greedy per-layer search (``greedy_calibrate``, criterion loss): from the full cache
    down to ``minimum`` slots per layer, or until no reduction keeps the score within
    ``tolerance`` (absolute) of the full cache's (default: no limit). Returns [(budgets,
    score), ...] from the full cache on."""
    cal = greedy_calibrate(lambda b: Score(accuracy=0.0, loss=score(b)), n_layers, context,
                           tolerance=tolerance, criterion="loss", fractions=SEARCH_FRACTIONS,
                           minimum=minimum, log=log or (lambda line: None))
    return [((context,) * n_layers, cal.unpruned.loss)] + \
        [(tuple(s.budgets), s.score.loss) for s in cal.steps]


def evaluate(selective_path: Path, standard_path: Path, *, fractions=DEFAULT_FRACTIONS,
             tolerance: float = DEFAULT_TOLERANCE, test_windows: Optional[int] = None,
             valid_windows: int = 64, corpus: Optional[str] = None,
             log=None) -> Dict[str, object]:
    """All the numbers of the table (see the module docstring). Returns a JSON-able dict."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    sel_params, sel_cfg, sel_task, _ = load_task_checkpoint(selective_path, expect="text")
    std_params, std_cfg, std_task, _ = load_task_checkpoint(standard_path, expect="text")
    if sel_task.corpus != std_task.corpus:
        raise ValueError(f"the models were trained on different corpora ({sel_task.corpus} and "
                         f"{std_task.corpus})")
    if not sel_cfg.selective or std_cfg.selective:
        raise ValueError("the first checkpoint must be a selective model and the second a "
                         "standard one")
    if sel_cfg.context != std_cfg.context:
        raise ValueError(f"the models have different contexts ({sel_cfg.context} and "
                         f"{std_cfg.context})")
    N = sel_cfg.context
    text = replace(sel_task, corpus_path=corpus if corpus is not None else
                   sel_task.corpus_path).text()
    test = eval_windows(text.test, N, test_windows)
    valid = eval_windows(text.valid, N, valid_windows)
    c_attention = CAttention()
    t0 = time.perf_counter()

    def bpb(params, cfg, windows, attention, budgets=None):
        return bits_per_byte(params, cfg, *windows, attention=attention, budgets=budgets)

    full = {"selective": bpb(sel_params, sel_cfg, test, c_attention),
            "standard": bpb(std_params, std_cfg, test, c_attention)}
    log(f"text-results: full cache: selective {full['selective']:.4f}, standard "
        f"{full['standard']:.4f} bits per byte on {len(test[0])} test windows")

    memo: Dict[Tuple[int, ...], float] = {}

    def valid_score(budgets: Tuple[int, ...]) -> float:
        if budgets not in memo:
            memo[budgets] = bpb(sel_params, sel_cfg, valid, c_attention, list(budgets))
        return memo[budgets]

    path = search_path(valid_score, sel_cfg.n_layers, N, log=log)
    cal_budgets, cal_valid = calibrated_on_path(path, path[0][1], tolerance)
    calibrated = {"budgets": list(cal_budgets),
                  "kept_fraction": sum(cal_budgets) / (len(cal_budgets) * N),
                  "valid_bpb": cal_valid, "valid_bpb_full": path[0][1],
                  "test_bpb": bpb(sel_params, sel_cfg, test, c_attention, list(cal_budgets))}
    log(f"text-results: calibrated budgets {list(cal_budgets)} "
        f"({calibrated['kept_fraction']:.4f} of the cache): test {calibrated['test_bpb']:.4f}")

    rows = []
    for f in progress_bar(fractions, desc="text-results: budgets", unit="budget"):
        slots = max(2, int(round(f * N)))
        per_layer = budgets_on_path(path, N, f)
        row = {"fraction": f, "slots": slots,
               "selective_uniform": bpb(sel_params, sel_cfg, test, c_attention,
                                        [slots] * sel_cfg.n_layers),
               "selective_per_layer_budgets": None if per_layer is None else list(per_layer),
               "selective_per_layer": None if per_layer is None else
               bpb(sel_params, sel_cfg, test, c_attention, list(per_layer)),
               "standard_window": bpb(std_params, std_cfg, test, SlidingWindow(),
                                      [slots] * std_cfg.n_layers),
               "standard_h2o": bpb(std_params, std_cfg, test, HeavyHitters(),
                                   [slots] * std_cfg.n_layers)}
        rows.append(row)
        log(f"text-results: 1/{1 / f:g} of the cache ({slots} slots): " + ", ".join(
            f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and k != "fraction"))
    return {
        "context": N, "n_layers": sel_cfg.n_layers, "test_windows": len(test[0]),
        "valid_windows": len(valid[0]), "tolerance": tolerance,
        "checkpoints": {"selective": Path(selective_path).name,
                        "standard": Path(standard_path).name},
        "corpus": text.summary(), "full": full, "calibrated": calibrated, "rows": rows,
        "search_path": [{"budgets": list(b), "valid_bpb": s} for b, s in path],
        "seconds": round(time.perf_counter() - t0, 1),
    }


# ----------------------------------------------------------------------------------------------
# Output


def _rel(x: Optional[float], ref: float) -> str:
    return "n/a" if x is None else f"{x:.3f} ({100 * (x / ref - 1):+.1f} %)"


def markdown_table(results: Dict[str, object]) -> str:
    """The table of docs/results-text.md: bits per byte on the test split, and in brackets the
    change against the same model's full cache."""
    full = results["full"]
    fs, fd = full["selective"], full["standard"]
    lines = [
        f"Test split: {results['test_windows']} windows of {results['context']} bytes; "
        f"budgets in slots per layer ({results['n_layers']} layers).",
        "",
        "| KV cache | slots | selective, uniform | selective, per-layer | standard, sliding "
        "window | standard, H2O |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| full | {results['context']} | {fs:.3f} | {fs:.3f} | {fd:.3f} | {fd:.3f} |",
    ]
    for r in results["rows"]:
        per = r["selective_per_layer"]
        per_text = _rel(per, fs) if per is None else \
            f"{_rel(per, fs)} {','.join(map(str, r['selective_per_layer_budgets']))}"
        lines.append(f"| 1/{1 / r['fraction']:g} | {r['slots']} | "
                     f"{_rel(r['selective_uniform'], fs)} | {per_text} | "
                     f"{_rel(r['standard_window'], fd)} | {_rel(r['standard_h2o'], fd)} |")
    c = results["calibrated"]
    lines += ["", f"Calibrated per-layer budgets (validation split, within "
              f"{100 * results['tolerance']:g} % of the full cache): {c['budgets']} = "
              f"1/{1 / c['kept_fraction']:.1f} of the cache, test {c['test_bpb']:.3f} bits per "
              f"byte ({100 * (c['test_bpb'] / fs - 1):+.2f} % against the full cache)."]
    return "\n".join(lines)


def save_figure(results: Dict[str, object], path: Path) -> None:
    """Bits per byte against the kept fraction of the cache (log scale), one line a method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    full = results["full"]
    rows = results["rows"]
    x = [1.0] + [r["fraction"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = (("selective_uniform", "selective, pruned cache (uniform)", "selective", "o-"),
              ("selective_per_layer", "selective, pruned cache (per-layer budgets)",
               "selective", "s-"),
              ("standard_window", "standard, sliding window (+BOS)", "standard", "^--"),
              ("standard_h2o", "standard, H2O", "standard", "v--"))
    for key, label, model, style in series:
        pts = [(1.0, full[model])] + [(r["fraction"], r[key]) for r in rows
                                      if r[key] is not None]
        ax.plot(*zip(*pts), style, label=label)
    c = results["calibrated"]
    ax.plot([c["kept_fraction"]], [c["test_bpb"]], "k*", markersize=12,
            label=f"selective, calibrated {c['budgets']}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x)
    ax.set_xticklabels(["1"] + [f"1/{1 / f:g}" for f in x[1:]])
    ax.invert_xaxis()
    ax.set_xlabel("KV cache kept (fraction of the context, per layer)")
    ax.set_ylabel("test bits per byte (lower is better)")
    ax.set_title(f"Byte-level LM on a Wikipedia sample, context {results['context']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_doc(doc: Path, table: str) -> None:
    """Replace the text between the table markers of ``doc`` with ``table``."""
    replace_between_markers(doc, TABLE_BEGIN, TABLE_END, table)


# ----------------------------------------------------------------------------------------------
# selattn text-results


def add_commands(subparsers) -> None:
    """Add ``text-results`` to the ``selattn`` parser's subparsers."""
    p = subparsers.add_parser(
        "text-results", help="bits per byte against KV budget on real text (docs/results-text.md)",
        description="Score a selective and a standard text model (selattn train --task text) on "
                    "the test split with pruned KV caches: the selective model's own eviction "
                    "(uniform and calibrated per-layer budgets) against a sliding window and "
                    "H2O on the standard model. Prints a Markdown table; writes JSON and a PNG.")
    p.add_argument("--selective", type=Path, default=DEFAULT_SELECTIVE,
                   help="selective checkpoint [the bundled text-selective.npz]")
    p.add_argument("--standard", type=Path, default=DEFAULT_STANDARD,
                   help="standard checkpoint [the bundled text-standard.npz]")
    p.add_argument("--test-windows", type=int, default=None,
                   help="score only the first N test windows (default: the whole split)")
    p.add_argument("--valid-windows", type=int, default=64,
                   help="validation windows of the per-layer budget search [64]")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="calibrated budgets: relative rise of bits per byte allowed [0.01]")
    p.add_argument("--corpus", type=str, default=None, metavar="PATH",
                   help="read the models' corpus from PATH (default: its usual place; for the "
                        "Wikipedia sample, the file in gensim)")
    p.add_argument("--json", type=Path, default=Path("text-results.json"),
                   help="where to write the numbers [text-results.json]")
    p.add_argument("--png", type=Path, default=Path("text-results.png"),
                   help="where to draw the curve (needs matplotlib) [text-results.png]")
    p.add_argument("--update-doc", type=Path, default=None, metavar="MARKDOWN",
                   help="rewrite the table between the markers of this file "
                        "(docs/results-text.md)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the C kernels and of NumPy's BLAS alike (default: every "
                        "core this process may use)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import selattn_c
    selattn_c.require_extension("selattn text-results")
    set_threads(args.threads, "c")
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise ValueError(f"--tolerance must be a finite number >= 0, got {args.tolerance}")
    results = evaluate(args.selective, args.standard, tolerance=args.tolerance,
                       test_windows=args.test_windows, valid_windows=args.valid_windows,
                       corpus=args.corpus)
    table = markdown_table(results)
    print(table)
    args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    from .mask_plot import have_matplotlib
    if have_matplotlib():
        save_figure(results, args.png)
        print(f"wrote {args.png}")
    else:
        print("no matplotlib: no PNG (pip install '.[plot]')")
    if args.update_doc is not None:
        update_doc(args.update_doc, table)
        print(f"updated the table in {args.update_doc}")
    return 0
