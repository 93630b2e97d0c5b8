"""``selattn train`` and ``selattn eval``: the training subcommands of the ``selattn`` CLI."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import List, Optional

from .backends import BACKENDS
from .text_training import TextTrainConfig, save_text_run, train_text
from .training import TrainConfig, evaluate_checkpoint, save_run, train

DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
TEXT_DEFAULTS = {f.name: f.default for f in fields(TextTrainConfig)}
TASKS = ("assign", "text")
# Options whose default depends on --task: the parser leaves them None and run_train fills in
# the task's own default (TrainConfig's or TextTrainConfig's).
TASK_DEPENDENT = ("n_layers", "d_model", "context", "steps", "batch_size")


def add_commands(subparsers) -> None:
    """Add ``train`` and ``eval`` to the ``selattn`` parser's subparsers."""
    add_train(subparsers)
    add_eval(subparsers)


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="attention kernels: the C extension, the NumPy reference, or auto "
                        "(C when the extension imports) [auto]")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the C attention kernels (default: the OpenMP default)")


def add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model on the variable-assignment task or on real text",
        description="Train the tiny selective-attention LM (or, with --standard, the baseline) on "
                    "the variable-assignment task (--task assign) or byte by byte on a Wikipedia "
                    "sample (--task text); write the checkpoint and a JSON log.")
    p.add_argument("--task", choices=TASKS, default="assign",
                   help="assign: the variable-assignment task; text: byte-level language "
                        "modelling of real text (selattn_lm.text) [assign]")
    p.add_argument("--out", type=Path, default=Path("model.npz"),
                   help="checkpoint to write [model.npz]")
    p.add_argument("--log", type=Path, default=None,
                   help="JSON log of the run (default: the checkpoint's name with .json)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of init and data")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_runtime_options(p)

    g = p.add_argument_group("text task (--task text)")
    g.add_argument("--corpus", type=str, default=None, metavar="DUMP",
                   help="a MediaWiki XML dump (.xml or .xml.bz2) (default: the Wikipedia sample "
                        "in the gensim wheel: pip install '.[text]')")
    g.add_argument("--eval-windows", type=int, default=TEXT_DEFAULTS["eval_windows"],
                   help="validation windows scored at every evaluation "
                        f"[{TEXT_DEFAULTS['eval_windows']}]")

    g = p.add_argument_group("variable-assignment task (--task assign)")
    g.add_argument("--n-vars", type=int, default=DEFAULTS["n_vars"])
    g.add_argument("--n-assignments", type=int, default=DEFAULTS["n_assignments"])
    g.add_argument("--max-value", type=int, default=DEFAULTS["max_value"])
    g.add_argument("--min-assignments", type=int, default=DEFAULTS["min_assignments"],
                   help="vary the number of assignments from this to --n-assignments")
    g.add_argument("--fixed-width", action="store_true",
                   help="zero-pad every value to the width of --max-value (c=07;)")
    g.add_argument("--train-min-assignments", type=int,
                   default=DEFAULTS["train_min_assignments"],
                   help="training batches get a number of assignments drawn from this to "
                        "--n-assignments (the held-out set does not)")

    g = p.add_argument_group("model")
    g.add_argument("--standard", action="store_true",
                   help="standard causal attention (the baseline) instead of selective")
    g.add_argument("--n-layers", type=int, default=None,
                   help=f"[assign {DEFAULTS['n_layers']}, text {TEXT_DEFAULTS['n_layers']}]")
    g.add_argument("--n-heads", type=int, default=DEFAULTS["n_heads"])
    g.add_argument("--d-model", type=int, default=None,
                   help=f"[assign {DEFAULTS['d_model']}, text {TEXT_DEFAULTS['d_model']}]")
    g.add_argument("--mlp-ratio", type=int, default=DEFAULTS["mlp_ratio"])
    g.add_argument("--context", type=int, default=None,
                   help="context length (assign: the task's longest input; text: "
                        f"{TEXT_DEFAULTS['context']} bytes)")
    g.add_argument("--eps", type=float, default=DEFAULTS["eps"],
                   help=f"weight of the memory loss [{DEFAULTS['eps']}]")
    g.add_argument("--tau", type=float, default=DEFAULTS["tau"], help="memory-loss tau")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None,
                   help=f"[assign {DEFAULTS['steps']}, text {TEXT_DEFAULTS['steps']}]")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"[assign {DEFAULTS['batch_size']}, text {TEXT_DEFAULTS['batch_size']}]")
    g.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=DEFAULTS["min_lr"],
                   help="learning rate at the end of the cosine")
    g.add_argument("--warmup-steps", type=int, default=DEFAULTS["warmup_steps"])
    g.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    g.add_argument("--grad-clip", type=float, default=DEFAULTS["grad_clip"])
    g.add_argument("--eps-start", type=int, default=DEFAULTS["eps_start"],
                   help="step at which the memory loss switches on")
    g.add_argument("--eps-ramp", type=int, default=DEFAULTS["eps_ramp"],
                   help="steps over which its weight grows linearly to --eps")

    g = p.add_argument_group("start (default: a fresh initialisation)")
    g.add_argument("--init-from", type=str, default=DEFAULTS["init_from"], metavar="CHECKPOINT",
                   help="start from this checkpoint of selattn train (same task; the model "
                        "options must describe it, with --insert-layer the grown model)")
    g.add_argument("--insert-layer", type=int, default=DEFAULTS["insert_layer"], metavar="L",
                   help="with --init-from: insert a new identity layer (zero output "
                        "projections) before layer L of the checkpoint, then train")

    g = p.add_argument_group("pruning-aware training (selective models only)")
    g.add_argument("--soft-budgets", type=str, default=None, metavar="B0,B1,...",
                   help="KV budgets to train for, one per layer (or one for all): steps add "
                        "the rank penalty of those budgets, masking harder the keys a pruned "
                        "cache would drop")
    g.add_argument("--soft-strength", type=float, default=DEFAULTS["soft_strength"],
                   help=f"slope of the rank penalty [{DEFAULTS['soft_strength']:g}]")
    g.add_argument("--soft-share", type=float, default=DEFAULTS["soft_share"],
                   help=f"share of the steps (drawn at random) that get the penalty "
                        f"[{DEFAULTS['soft_share']:g}]")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=DEFAULTS["eval_every"])
    g.add_argument("--heldout-size", type=int, default=DEFAULTS["heldout_size"])
    g.add_argument("--heldout-seed", type=int, default=DEFAULTS["heldout_seed"])
    p.set_defaults(run=run_train)


def add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="held-out exact-match accuracy of a checkpoint",
        description="Score a checkpoint written by 'selattn train' on its held-out set: the "
                    "fraction of examples whose whole answer is the model's greedy prediction.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--n", type=int, default=None,
                   help="score only the first N held-out examples (default: all)")
    p.add_argument("--budgets", type=str, default=None,
                   help="pruned KV cache: one budget for every layer, or one per layer "
                        "separated by commas (e.g. 8,24)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_runtime_options(p)
    p.set_defaults(run=run_eval)


def _set_threads(threads: Optional[int], backend: str) -> None:
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if backend != "numpy":
        import selattn_c
        selattn_c.set_num_threads(threads)


def parse_budgets(text: Optional[str], n_layers: int, option: str = "--budgets"
                  ) -> Optional[List[Optional[int]]]:
    """'16' -> [16] * n_layers; '8,24' -> [8, 24]; None -> None. Raises ValueError."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} must be integers separated by commas, got {text!r}") from None
    if len(values) == 1:
        values = values * n_layers
    if len(values) != n_layers:
        raise ValueError(f"{option} needs 1 or {n_layers} values (one per layer), "
                         f"got {len(values)}")
    return values


def run_train(args: argparse.Namespace) -> int:
    if args.task == "text":
        return run_train_text(args)
    settings = {name: getattr(args, name) for name in DEFAULTS}
    for name in TASK_DEPENDENT:
        if settings[name] is None:
            settings[name] = DEFAULTS[name]
    for name in ("corpus", "eval_windows"):
        if getattr(args, name) != TEXT_DEFAULTS[name]:
            raise ValueError(f"--{name.replace('_', '-')} is an option of --task text")
    settings["soft_budgets"] = parse_budgets(args.soft_budgets, settings["n_layers"],
                                             "--soft-budgets")
    cfg = TrainConfig(**settings)
    _set_threads(args.threads, args.backend)
    params, model_cfg, log = train(cfg, backend=args.backend, quiet=args.quiet)
    log_path = save_run(params, model_cfg, log, args.out, args.log)
    first = log["first_99"]
    reached = ("never reached 99%" if first is None else
               f"reached 99% at step {first['step']} ({first['seconds']:.0f} s)")
    print(f"held-out exact-match accuracy {100 * log['final_heldout_accuracy']:.2f}% "
          f"({log['heldout_size']} examples) after {cfg.steps} steps, "
          f"{log['train_seconds']:.0f} s of training; {reached}")
    print(f"wrote {args.out} and {log_path}")
    return 0


def run_train_text(args: argparse.Namespace) -> int:
    """``selattn train --task text``: the text settings from the shared options; options of the
    variable-assignment task are refused when set."""
    for name, default in DEFAULTS.items():
        if name not in TEXT_DEFAULTS and name not in TASK_DEPENDENT and name != "soft_budgets" \
                and getattr(args, name) != default:
            raise ValueError(f"--{name.replace('_', '-')} is an option of --task assign, not "
                             "of --task text")
    if args.soft_budgets is not None:
        raise ValueError("--soft-budgets is an option of --task assign, not of --task text")
    settings = {name: getattr(args, name) for name in TEXT_DEFAULTS}
    for name in TASK_DEPENDENT:
        if settings[name] is None:
            settings[name] = TEXT_DEFAULTS[name]
    cfg = TextTrainConfig(**settings)
    _set_threads(args.threads, args.backend)
    params, model_cfg, log = train_text(cfg, backend=args.backend, quiet=args.quiet)
    log_path = save_text_run(params, model_cfg, log, args.out, args.log)
    kind = "standard" if cfg.standard else "selective"
    print(f"{kind} model: validation {log['final_valid_bpb']:.4f} bits per byte "
          f"({cfg.eval_windows} windows of {cfg.context} bytes) after {cfg.steps} steps, "
          f"{log['train_seconds']:.0f} s of training")
    print(f"wrote {args.out} and {log_path}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    _set_threads(args.threads, args.backend)
    from .checkpoint import load_checkpoint
    if args.budgets is not None:
        _, model_cfg, _ = load_checkpoint(args.checkpoint)
        budgets = parse_budgets(args.budgets, model_cfg.n_layers)
    else:
        budgets = None
    result = evaluate_checkpoint(args.checkpoint, backend=args.backend, n=args.n,
                                 budgets=budgets)
    result["checkpoint"] = str(args.checkpoint)
    result["budgets"] = budgets
    if args.json:
        json.dump(result, sys.stdout)
        print()
    else:
        kind = "selective" if result["selective"] else "standard"
        pruned = "" if budgets is None else f", KV budgets {budgets}"
        print(f"{args.checkpoint}: held-out exact-match accuracy "
              f"{100 * result['accuracy']:.2f}% ({result['n']} examples, {kind} attention"
              f"{pruned}, {result['backend']} backend)")
    return 0
