"""``selattn train`` and ``selattn eval``: the training subcommands of the ``selattn`` CLI.

``selattn train`` builds one ``TrainConfig`` from the options (the task's own options, the
model, the optimisation), checks every output path before the first step, and runs the one
training loop of ``selattn_lm.training``: the run state goes to ``RUN.npz`` every
``--checkpoint-every`` steps and on SIGINT/SIGTERM, and ``selattn train --resume RUN.npz``
continues it exactly.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import fields
from pathlib import Path
from typing import List, Optional

from . import corpora
from .backends import BACKENDS
from .output_files import check_output_path
from .stop_signals import TrainingStopped
from .task_assign import AssignTask
from .task_registry import TASKS
from .task_text import TextTask
from .threads import set_threads
from .training import TrainConfig, evaluate_checkpoint, load_resume, save_run, train

DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.name != "task"}
ASSIGN_DEFAULTS = {f.name: f.default for f in fields(AssignTask)}
TEXT_DEFAULTS = {f.name: f.default for f in fields(TextTask)}
TASK_OPTIONS = {"assign": tuple(ASSIGN_DEFAULTS), "text": tuple(TEXT_DEFAULTS)}
CHECKPOINT_EVERY = 100
RUN_SUFFIX = ".run.npz"


def add_commands(subparsers) -> None:
    """Add ``train`` and ``eval`` to the ``selattn`` parser's subparsers."""
    add_train(subparsers)
    add_eval(subparsers)


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """--backend and --threads, shared by every command that runs the model."""
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="attention kernels: the C extension, the NumPy reference, or auto "
                        "(C when the extension imports) [auto]")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the C kernels and of NumPy's BLAS alike (default: every "
                        "core this process may use)")


def _task_defaults(name: str) -> str:
    return ", ".join(f"{cls.NAME} {cls.DEFAULTS.get(name, 'its own')}" for cls in
                     TASKS.values())


def add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model on the variable-assignment task or on real text",
        description="Train the tiny selective-attention LM (or, with --standard, the baseline) on "
                    "the variable-assignment task (--task assign) or byte by byte on a text "
                    "corpus (--task text); write the checkpoint and a JSON log. The run state is "
                    "saved every --checkpoint-every steps and on Ctrl-C or SIGTERM; --resume "
                    "continues it.")
    p.add_argument("--task", choices=tuple(TASKS), default="assign",
                   help="assign: the variable-assignment task; text: byte-level language "
                        "modelling of a corpus [assign]")
    p.add_argument("--out", type=Path, default=None,
                   help="checkpoint to write [model.npz]")
    p.add_argument("--log", type=Path, default=None,
                   help="JSON log of the run (default: the checkpoint's name with .json)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of init and data")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_runtime_options(p)

    g = p.add_argument_group("stopping and resuming")
    g.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY, metavar="K",
                   help="write the run state (weights, optimizer, step, random streams, log) "
                        f"every K steps; 0: only when stopped by a signal [{CHECKPOINT_EVERY}]")
    g.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR",
                   help="where the run state goes, as <checkpoint name>" + RUN_SUFFIX +
                        " (default: beside the checkpoint)")
    g.add_argument("--resume", type=Path, default=None, metavar="RUN.npz",
                   help="continue the run saved in RUN.npz with its own settings and outputs "
                        "(only --backend, --threads, --quiet and --checkpoint-every may be given)")

    g = p.add_argument_group("text task (--task text)")
    g.add_argument("--corpus", choices=corpora.names(), default=TEXT_DEFAULTS["corpus"],
                   help="the text: " + "; ".join(f"{n}: {corpora.get(n).DESCRIPTION}"
                                                 for n in corpora.names()) +
                        f" [{TEXT_DEFAULTS['corpus']}]")
    g.add_argument("--corpus-path", type=str, default=None, metavar="PATH",
                   help="read the corpus' source from PATH instead of its usual place")
    g.add_argument("--eval-windows", type=int, default=TEXT_DEFAULTS["eval_windows"],
                   help="validation windows scored at every evaluation "
                        f"[{TEXT_DEFAULTS['eval_windows']}]")

    g = p.add_argument_group("variable-assignment task (--task assign)")
    g.add_argument("--n-vars", type=int, default=ASSIGN_DEFAULTS["n_vars"])
    g.add_argument("--n-assignments", type=int, default=ASSIGN_DEFAULTS["n_assignments"])
    g.add_argument("--max-value", type=int, default=ASSIGN_DEFAULTS["max_value"])
    g.add_argument("--min-assignments", type=int, default=ASSIGN_DEFAULTS["min_assignments"],
                   help="vary the number of assignments from this to --n-assignments")
    g.add_argument("--fixed-width", action="store_true",
                   help="zero-pad every value to the width of --max-value (c=07;)")
    g.add_argument("--train-min-assignments", type=int,
                   default=ASSIGN_DEFAULTS["train_min_assignments"],
                   help="training batches get a number of assignments drawn from this to "
                        "--n-assignments (the held-out set does not)")
    g.add_argument("--heldout-size", type=int, default=ASSIGN_DEFAULTS["heldout_size"])
    g.add_argument("--heldout-seed", type=int, default=ASSIGN_DEFAULTS["heldout_seed"])

    g = p.add_argument_group("model")
    g.add_argument("--standard", action="store_true",
                   help="standard causal attention (the baseline) instead of selective")
    g.add_argument("--n-layers", type=int, default=None, help=f"[{_task_defaults('n_layers')}]")
    g.add_argument("--n-heads", type=int, default=DEFAULTS["n_heads"])
    g.add_argument("--d-model", type=int, default=None, help=f"[{_task_defaults('d_model')}]")
    g.add_argument("--mlp-ratio", type=int, default=DEFAULTS["mlp_ratio"])
    g.add_argument("--context", type=int, default=None,
                   help="context length (assign: the task's longest input; text: "
                        f"{TextTask.DEFAULTS['context']} bytes)")
    g.add_argument("--eps", type=float, default=DEFAULTS["eps"],
                   help=f"weight of the memory loss [{DEFAULTS['eps']}]")
    g.add_argument("--tau", type=float, default=DEFAULTS["tau"], help="memory-loss tau")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help=f"[{_task_defaults('steps')}]")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"[{_task_defaults('batch_size')}]")
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
    g.add_argument("--eval-every", type=int, default=DEFAULTS["eval_every"])

    g = p.add_argument_group("start (default: a fresh initialisation)")
    g.add_argument("--init-from", type=str, default=DEFAULTS["init_from"], metavar="CHECKPOINT",
                   help="start from this checkpoint of selattn train (same task and data; the "
                        "model options must describe it, except --standard: a standard model "
                        "can be fine-tuned into a selective one; with --insert-layer the grown "
                        "model)")
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
    p.set_defaults(run=run_train)
    p.set_defaults(train_defaults={a.dest: a.default for a in p._actions})


def add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="score a checkpoint on its task (held-out accuracy, validation bpb)",
        description="Score a checkpoint written by 'selattn train' with its task's evaluation: "
                    "held-out exact-match accuracy (assign), validation bits per byte (text).")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--n", type=int, default=None,
                   help="score only the first N held-out examples or validation windows "
                        "(default: the task's own evaluation)")
    p.add_argument("--budgets", type=str, default=None,
                   help="pruned KV cache: one budget for every layer, or one per layer "
                        "separated by commas (e.g. 8,24)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_runtime_options(p)
    p.set_defaults(run=run_eval)


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


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's settings from the options; an option of the other task, when set, is refused."""
    for other, names in TASK_OPTIONS.items():
        if other == args.task:
            continue
        defaults = ASSIGN_DEFAULTS if other == "assign" else TEXT_DEFAULTS
        for name in names:
            if name not in TASK_OPTIONS[args.task] and getattr(args, name) != defaults[name]:
                raise ValueError(f"--{name.replace('_', '-')} is an option of --task {other}, "
                                 f"not of --task {args.task}")
    task_cls = TASKS[args.task]
    task = task_cls(**{name: getattr(args, name) for name in TASK_OPTIONS[args.task]})
    settings = {name: getattr(args, name) for name in DEFAULTS if name != "soft_budgets"}
    n_layers = args.n_layers if args.n_layers is not None else task.DEFAULTS["n_layers"]
    settings["soft_budgets"] = parse_budgets(args.soft_budgets, n_layers, "--soft-budgets")
    return TrainConfig(task=task, **settings)


def _given_training_options(args: argparse.Namespace, parser_defaults) -> List[str]:
    allowed = {"backend", "threads", "quiet", "checkpoint_every", "resume", "run", "command",
               "train_defaults"}
    return [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
            if k not in allowed and parser_defaults.get(k, v) != v]


def run_train(args: argparse.Namespace) -> int:
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    command = "selattn " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    resume = None
    if args.resume is not None:
        given = _given_training_options(args, args.train_defaults)
        if given:
            raise ValueError(f"--resume continues a run with its own settings and outputs; "
                             f"{', '.join(given)} cannot be given with it")
        cfg, resume = load_resume(args.resume)
        outputs = resume["state"].get("outputs") or {}
        out = Path(outputs.get("out", "model.npz"))
        log = None if outputs.get("log") is None else Path(outputs["log"])
        run_path = args.resume
        if resume["state"]["step"] >= cfg.steps:
            raise ValueError(f"{args.resume}: the run already finished all {cfg.steps} steps")
    else:
        cfg = config_from_args(args)
        out = args.out if args.out is not None else Path("model.npz")
        log = args.log
        run_dir = args.checkpoint_dir if args.checkpoint_dir is not None else out.parent
        if args.checkpoint_dir is not None and not args.checkpoint_dir.is_dir():
            raise ValueError(f"--checkpoint-dir {str(args.checkpoint_dir)!r} is not an "
                             "existing directory")
        run_path = run_dir / (out.stem + RUN_SUFFIX)
    # every output path is checked before the first step
    check_output_path(out, "--out")
    check_output_path(out.with_suffix(".json") if log is None else log, "--log")
    check_output_path(run_path, "--checkpoint-dir" if args.resume is None else "--resume")
    set_threads(args.threads, args.backend)
    if resume is not None:
        resume["state"] = dict(resume["state"])
    outputs = {"out": str(out), "log": None if log is None else str(log)}
    try:
        params, model_cfg, run_log = train(
            cfg, backend=args.backend, quiet=args.quiet, run_path=run_path,
            checkpoint_every=args.checkpoint_every, resume=resume, handle_signals=True,
            command=command, outputs=outputs)
    except TrainingStopped as stop:
        print(f"selattn train: {stop}", file=sys.stderr)
        return stop.exit_status
    log_path = save_run(params, model_cfg, run_log, out, log)
    task = cfg.task
    kind = "standard" if cfg.standard else "selective"
    value = run_log[f"final_{task.METRIC}"]
    print(f"{kind} model on {task.describe()}: {task.METRIC} {task.format_metric(value)} after "
          f"{cfg.steps} steps, {run_log['train_seconds']:.0f} s of training")
    print(f"wrote {out} and {log_path} (run state: {run_path})")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    set_threads(args.threads, args.backend)
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
        count = "" if args.n is None else f", first {args.n}"
        print(f"{args.checkpoint}: {result['task']} task, {result['metric']} "
              f"{result['formatted']} ({kind} attention{pruned}{count}, {result['backend']} "
              "backend)")
    return 0
