"""Command line: ``python -m selattn_reference explain`` prints a worked example."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m selattn_reference",
        description="Selective attention (Leviathan et al. 2024): the NumPy reference.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "explain",
        help="print a 5-token worked example step by step (L, S, F, attention weights, budget)",
    )
    args = parser.parse_args(argv)
    if args.command == "explain":
        from .explain import print_worked_example

        print_worked_example()
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
