"""The ``selattn`` command line: one parser, subcommands contributed by command modules.

Each module in ``COMMAND_MODULES`` has ``add_commands(subparsers)``, which adds its subcommands and
sets ``run=function(args) -> int`` on each. ``main`` parses, runs, and turns every expected
failure (bad numbers, a missing or corrupt checkpoint, an unwritable file) into one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

from selattn_c._extension import ExtensionNotBuilt

# Modules that contribute subcommands. A module that is not installed is skipped, so a command
# module can be added (or left out of a build) without touching this file's logic.
COMMAND_MODULES = ("selattn_lm.cli_training", "selattn_lm.cli_inference", "selattn_lm.text_results",
                   "selattn_lm.cli_corpus", "selattn_lm.study")

USAGE_ERROR = 2
BROKEN_PIPE = 128 + 13  # what a shell reports for a program that SIGPIPE ended


class CommandError(Exception):
    """An expected failure of a subcommand; its message is printed as one line."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line ("selattn train: error: ...") and exit 2."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``selattn`` parser with the subcommands of every available command module."""
    parser = _Parser(prog="selattn", description="Selective attention: train and evaluate the "
                     "tiny language model on the variable-assignment task, and more.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:     # the module exists but one of its imports is missing: report
                raise
            continue
        module.add_commands(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``selattn`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # argparse: --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    try:
        status = int(args.run(args))
        sys.stdout.flush()        # here, not at exit, so that a closed pipe is caught below
        return status
    except KeyboardInterrupt:        # outside a training loop (which stops cleanly by itself)
        print(f"selattn {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``selattn ... | head``): not an error of ours to report. Point
        # stdout at /dev/null so that the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE
    except (CommandError, ValueError, OSError, ExtensionNotBuilt) as e:
        # ValueError covers CheckpointError and every settings check; OSError unreadable or
        # unwritable files; ExtensionNotBuilt a command that needs the C kernels on a
        # pure-Python install. Only the message: a traceback helps nobody who typed a bad number.
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"selattn {args.command}: error: {message}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
