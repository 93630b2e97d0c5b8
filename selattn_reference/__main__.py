"""Command line: ``python -m selattn_reference explain`` prints a worked example;
``python -m selattn_reference check FILE.py:FUNCTION`` checks an implementation against the
reference (docs/conformance.md)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m selattn_reference",
        description="Selective attention (Leviathan et al. 2024): the NumPy reference.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "explain",
        help="print a 5-token worked example step by step (L, S, F, attention weights, budget)",
    )
    from .conformance_cli import add_check_parser, main_check

    add_check_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "explain":
        from .explain import print_worked_example

        print_worked_example()
    elif args.command == "check":
        return main_check(argv, args)
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
