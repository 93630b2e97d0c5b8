"""The inference commands of the ``selattn`` console script: ``calibrate``, ``demo``, ``plot``.

``selattn_lm.cli.main`` builds the parser, calls ``add_commands(subparsers)`` of every command
module and runs the chosen command's ``run(args) -> exit code``. Bad input (a missing or corrupt
checkpoint, a malformed budgets file, bad numbers) raises ValueError / OSError here, or fails in
argparse, and ``main`` turns it into one line ``selattn <command>: error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

import selattn_c

from . import demo
from .calibrate import (
    DEFAULT_FRACTIONS,
    DEFAULT_TOLERANCE,
    Score,
    greedy_calibrate,
    write_budgets,
)
from .mask_plot import DEFAULT_VMAX, ascii_heatmap, have_matplotlib, save_png
from .runner import ModelRunner
from .threads import set_threads

CALIBRATION_SEED = 2024     # the calibration split's seed (disjoint from the held-out set)


def _fractions(text: str) -> List[float]:
    try:
        fractions = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}")
    if not all(0.0 < f < 1.0 for f in fractions):
        raise argparse.ArgumentTypeError(f"every fraction must be in (0, 1), got {text!r}")
    return fractions


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an int: {text!r}")
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _non_negative_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not (x >= 0 and x != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return x


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="threads of the C kernels and of NumPy's BLAS alike (default: every "
                             "core this process may use)")


def _use_kernels(args: argparse.Namespace) -> None:
    """Every command here runs the C kernels: on a pure-Python install say so at once (one line,
    exit 2, through the CLI's error handling) rather than after loading; then apply --threads."""
    selattn_c.require_extension(f"selattn {args.command}")
    set_threads(args.threads, "c")


# ----------------------------------------------------------------------------------------------
# selattn calibrate


def default_budgets_path(checkpoint: Path) -> Path:
    """``selective.npz`` -> ``selective.budgets.json`` next to it."""
    return checkpoint.with_name(checkpoint.stem + ".budgets.json")


def calibrate_command(args: argparse.Namespace) -> int:
    _use_kernels(args)
    runner = ModelRunner.load(args.checkpoint)
    examples = runner.calibration_split(args.examples, args.seed)

    def score(budgets) -> Score:
        return runner.evaluate(examples, list(budgets))

    result = greedy_calibrate(score, runner.cfg.n_layers, runner.cfg.context,
                              tolerance=args.tolerance, criterion=args.criterion,
                              fractions=args.fractions)
    out = args.out or default_budgets_path(Path(args.checkpoint))
    write_budgets(out, result, {
        "checkpoint": Path(args.checkpoint).name,
        "calibration_examples": args.examples,
        "calibration_seed": args.seed,
        "kv_bytes_full": runner.kv_bytes(None),
        "kv_bytes_calibrated": runner.kv_bytes(result.budgets),
    })
    print(f"budgets {result.budgets} ({result.kept_fraction:.3f} of the full cache, "
          f"{runner.kv_bytes(None) / runner.kv_bytes(result.budgets):.1f}x less KV memory); "
          f"calibration accuracy {100 * result.final.accuracy:.1f} % "
          f"(unpruned {100 * result.unpruned.accuracy:.1f} %); wrote {out}")
    return 0


# ----------------------------------------------------------------------------------------------
# selattn demo


def demo_command(args: argparse.Namespace) -> int:
    _use_kernels(args)
    demo.run_demo(selective=args.selective, standard=args.standard, budgets_path=args.budgets,
                  n_examples=args.examples, png=args.png, use_ascii=args.ascii)
    return 0


# ----------------------------------------------------------------------------------------------
# selattn plot


def plot_command(args: argparse.Namespace) -> int:
    _use_kernels(args)
    runner = ModelRunner.load(args.checkpoint)
    masks, labels = runner.masks(args.text)
    titles = [f"layer {l}" for l in range(len(masks))]
    if not args.ascii and have_matplotlib():
        save_png(args.out, masks, labels, titles=titles, vmax=args.vmax,
                 suptitle=f"accumulated masks F: {args.text}")
        print(f"wrote {args.out}")
    else:
        if not args.ascii:
            print("(matplotlib is not installed: pip install 'selattn[plot]' for a PNG; "
                  "ASCII instead)")
        for mask, title in zip(masks, titles):
            print(ascii_heatmap(mask, labels, title=title, vmax=args.vmax) + "\n")
    return 0


# ----------------------------------------------------------------------------------------------


def add_commands(subparsers) -> None:
    """Add ``calibrate``, ``demo`` and ``plot`` to the ``selattn`` parser's subcommands."""
    p = subparsers.add_parser(
        "calibrate", help="find per-layer KV budgets that keep held-out accuracy",
        description="Greedy per-layer KV budget calibration: start every layer at the full "
                    "context, repeatedly apply the single-layer reduction that hurts accuracy "
                    "least while it stays within --tolerance of the unpruned model, and write "
                    "the budgets as JSON. Progress goes to stderr.")
    p.add_argument("checkpoint", type=Path, help="checkpoint written by `selattn train`")
    p.add_argument("--out", type=Path, default=None,
                   help="budgets JSON (default: CHECKPOINT's name with .budgets.json)")
    p.add_argument("--tolerance", type=_non_negative_float, default=DEFAULT_TOLERANCE,
                   help="allowed accuracy drop, as a fraction (default %(default)s = 0.5 "
                        "points); with --criterion loss, allowed loss rise in nats")
    p.add_argument("--criterion", choices=("accuracy", "loss"), default="accuracy",
                   help="what must stay within the tolerance (default %(default)s)")
    p.add_argument("--fractions", type=_fractions, default=list(DEFAULT_FRACTIONS),
                   help="candidate budgets as fractions of a layer's current budget "
                        "(default %(default)s)")
    p.add_argument("--examples", type=_positive_int, default=500,
                   help="calibration examples, disjoint from the held-out set (default "
                        "%(default)s)")
    p.add_argument("--seed", type=int, default=CALIBRATION_SEED,
                   help="seed of the calibration examples (default %(default)s)")
    _add_threads(p)
    p.set_defaults(run=calibrate_command)

    p = subparsers.add_parser(
        "demo", help="pruned-KV-cache inference on the bundled models (the main job)",
        description="Answer held-out questions with the bundled selective and standard models, "
                    "with a full KV cache and with the calibrated per-layer budgets; print "
                    "accuracy, budgets, KV bytes, reduction and decode speed, and draw the "
                    "accumulated masks of one example.")
    p.add_argument("--selective", type=Path, default=demo.SELECTIVE, help="selective checkpoint")
    p.add_argument("--standard", type=Path, default=demo.STANDARD, help="standard checkpoint")
    p.add_argument("--budgets", type=Path, default=demo.BUDGETS,
                   help="budgets JSON from `selattn calibrate` of the selective checkpoint")
    p.add_argument("--examples", type=_positive_int, default=500,
                   help="held-out questions to answer (default %(default)s)")
    p.add_argument("--png", type=Path, default=Path("selattn-masks.png"),
                   help="mask picture to write (default %(default)s; needs matplotlib)")
    p.add_argument("--ascii", action="store_true", help="print ASCII heatmaps instead of a PNG")
    _add_threads(p)
    p.set_defaults(run=demo_command)

    p = subparsers.add_parser(
        "plot", help="draw the accumulated masks F of every layer for a text",
        description="Run CHECKPOINT on BOS + TEXT and draw every layer's accumulated mask F, "
                    "tokens on both axes (PNG with matplotlib, else ASCII).")
    p.add_argument("checkpoint", type=Path, help="checkpoint written by `selattn train`")
    p.add_argument("text", help='input text, e.g. "a=4;b=7;a=1;a="')
    p.add_argument("--out", type=Path, default=Path("selattn-masks.png"),
                   help="PNG to write (default %(default)s)")
    p.add_argument("--ascii", action="store_true", help="print ASCII heatmaps instead of a PNG")
    p.add_argument("--vmax", type=float, default=DEFAULT_VMAX,
                   help="F at which the colour saturates (default %(default)s)")
    _add_threads(p)
    p.set_defaults(run=plot_command)
