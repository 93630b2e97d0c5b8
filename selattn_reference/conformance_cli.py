"""``python -m selattn_reference check TARGET``: the conformance kit on the command line.

TARGET is ``FILE.py:FUNCTION`` or ``MODULE:FUNCTION`` (FUNCTION may be dotted, e.g.
``Class.method``). The check runs in a child process, so that nothing the candidate does (a
segfault in a C extension, ``os._exit``, a hang that holds the GIL) can take the command with it:
the parent waits at most ``--total-timeout`` seconds, kills the child if it overruns, and says in
one line what happened. Within the child, each call of the candidate has its own time limit
(``--timeout``, ``conformance_calls``).

Exit status: 0 conformant, 1 not conformant (or the check could not finish), 2 bad argument
(including a TARGET that does not load).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Tuple

EXIT_CONFORMANT, EXIT_NOT_CONFORMANT, EXIT_BAD_ARGUMENT = 0, 1, 2
CHILD_FLAG = "--child-process"   # internal: run the check here instead of in a child
VERDICT = "verdict: "            # the report's last line starts with it


class BadTarget(Exception):
    """TARGET does not name a callable that can be loaded."""


def add_check_parser(commands) -> None:
    """Add the ``check`` command to the subcommands of ``python -m selattn_reference``."""
    p = commands.add_parser(
        "check",
        help="check a selective-attention function (or, with --cache, a KV cache) against "
             "the reference and name known mistakes",
        description="Check fn(q, k, v) -> out (NumPy float64 (B, H, N, D) in and out; selector "
                    "head 0, BOS protected, scale 1/sqrt(D), causal), or with --cache a factory "
                    "make(batch, heads, head_dim, budget) whose object has step(q, k, v) -> out "
                    "(each (B, H, D)). Exit status 0 conformant, 1 not, 2 bad argument.",
    )
    p.add_argument("target", metavar="FILE.py:FUNCTION | MODULE:FUNCTION")
    p.add_argument("--cache", action="store_true",
                   help="TARGET is a KV-cache factory make(batch, heads, head_dim, budget)")
    p.add_argument("--selector-head-arg", metavar="NAME",
                   help="TARGET takes the selector head as keyword argument NAME")
    p.add_argument("--protect-bos-arg", metavar="NAME",
                   help="TARGET takes BOS protection (bool) as keyword argument NAME")
    p.add_argument("--scale-arg", metavar="NAME",
                   help="TARGET takes the logit scale as keyword argument NAME")
    p.add_argument("--torch", action="store_true",
                   help="TARGET takes and returns torch tensors (a function, or an nn.Module "
                        "object: FILE.py:attention where attention = MyAttention())")
    p.add_argument("--dtype", choices=("float64", "float32"),
                   help="with --torch: the tensors' dtype (default: a module's parameters', "
                        "else float64)")
    p.add_argument("--timeout", type=_positive, default=10.0, metavar="SECONDS",
                   help="time limit of one call of TARGET (default 10)")
    p.add_argument("--total-timeout", type=_positive, default=600.0, metavar="SECONDS",
                   help="time limit of the whole check (default 600)")
    p.add_argument(CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def split_target(target: str) -> Tuple[str, str, bool]:
    """``(where, name, is_file)`` of TARGET, without importing anything; ``BadTarget`` if it is
    malformed or names a file that does not exist."""
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise BadTarget(f"TARGET must be FILE.py:FUNCTION or MODULE:FUNCTION, got {target!r}")
    is_file = where.endswith(".py") or os.sep in where or "/" in where
    if is_file and not Path(where).is_file():
        raise BadTarget(f"no such file: {where}")
    return where, name, is_file


def load_target(target: str) -> Any:
    """The object TARGET names: ``FILE.py:NAME`` (the file's folder goes on sys.path, for its own
    imports) or ``MODULE:NAME``; NAME may be dotted. ``BadTarget`` says what is wrong."""
    where, name, is_file = split_target(target)
    try:
        if is_file:
            path = Path(where).resolve()
            sys.path.insert(0, str(path.parent))
            spec = importlib.util.spec_from_file_location(f"_conformance_target_{path.stem}",
                                                          path)
            if spec is None or spec.loader is None:
                raise BadTarget(f"cannot load {where} as Python source")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except BadTarget:
        raise
    except BaseException as exc:  # noqa: B902 - the user's module failing to import is the finding
        raise BadTarget(f"importing {where} raised {type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise BadTarget(f"{where} has no attribute {name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BadTarget(f"{target} is of type {type(obj).__name__}, not a callable")
    return obj


def run_here(args: argparse.Namespace) -> int:
    """Load TARGET and run the check in this process; print the report; return the exit code."""
    from .conformance import check_cache, check_forward

    try:
        candidate = load_target(args.target)
    except BadTarget as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENT
    options = dict(selector_head=args.selector_head_arg, protect_bos=args.protect_bos_arg,
                   scale=args.scale_arg, dtype=args.dtype, timeout=args.timeout,
                   name=args.target)
    try:
        if args.cache:
            report = check_cache(candidate, torch=args.torch, **options)
        else:
            report = check_forward(candidate, torch=True if args.torch else None, **options)
    except (TypeError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENT
    print(report.render(), flush=True)
    return EXIT_CONFORMANT if report.passed else EXIT_NOT_CONFORMANT


def run_in_child(argv: List[str], args: argparse.Namespace) -> int:
    """Run the check in a child interpreter and relay its report; one line if it dies."""
    try:
        split_target(args.target)
    except BadTarget as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENT
    command = [sys.executable, "-m", "selattn_reference", *argv, CHILD_FLAG]
    try:
        child = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                               timeout=args.total_timeout)
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        sys.stdout.write(partial)
        print(f"verdict: NOT CONFORMANT (the check did not finish within "
              f"{args.total_timeout:g} s and was stopped)")
        return EXIT_NOT_CONFORMANT
    sys.stdout.write(child.stdout)
    sys.stderr.write(child.stderr)
    lines = child.stdout.strip().splitlines()
    finished = bool(lines) and lines[-1].startswith(VERDICT)
    if child.returncode == EXIT_BAD_ARGUMENT and not finished:
        return EXIT_BAD_ARGUMENT
    if child.returncode in (EXIT_CONFORMANT, EXIT_NOT_CONFORMANT) and finished:
        return child.returncode
    if child.returncode < 0:
        why = f"the process was killed by signal {-child.returncode} (a crash in the candidate)"
    else:
        why = f"the process ended with status {child.returncode} before the report was complete"
    print(f"verdict: NOT CONFORMANT ({why})")
    return EXIT_NOT_CONFORMANT


def main_check(argv: List[str], args: argparse.Namespace) -> int:
    """The ``check`` command: argv is the command line after ``python -m selattn_reference``."""
    if args.dtype is not None and not args.torch:
        print("error: --dtype applies to --torch only (a NumPy function gets float64 arrays)",
              file=sys.stderr)
        return EXIT_BAD_ARGUMENT
    if getattr(args, CHILD_FLAG.lstrip("-").replace("-", "_")):
        return run_here(args)
    return run_in_child(argv, args)
