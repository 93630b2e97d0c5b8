"""Text corpora for byte-level language modelling, one module per corpus.

A corpus module in this package is found by its file alone: adding a corpus means adding a module
here, and nothing else changes. Every corpus module exposes

- ``NAME``: the corpus' name on the command line (``selattn train --task text --corpus NAME``);
- ``DESCRIPTION``: one line, what the text is;
- ``LICENCE``: the licence of the text;
- ``load(path=None) -> selattn_lm.text.TextCorpus``: the train / valid / test split, fixed for a
  given source (``path`` overrides where the source file is looked for), cached per process;
- ``fetch``: a function that brings the source onto this machine (through pip only), or None when
  installing an extra is the way (the error of ``load`` then says which).

``names()`` lists the corpora, ``get(name)`` returns a corpus' module, ``load(name, path)`` its
split.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Dict, List, Optional

REQUIRED = ("NAME", "DESCRIPTION", "LICENCE", "load", "fetch")


def _modules() -> Dict[str, ModuleType]:
    found: Dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        missing = [attr for attr in REQUIRED if not hasattr(module, attr)]
        if missing:
            raise ImportError(f"corpus module {module.__name__} lacks {', '.join(missing)}")
        found[module.NAME] = module
    return dict(sorted(found.items()))


def names() -> List[str]:
    """The names of the corpora in this package, sorted."""
    return list(_modules())


def get(name: str) -> ModuleType:
    """The module of corpus ``name``; ValueError naming the known corpora otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"corpus must be a str, got {type(name).__name__}")
    modules = _modules()
    if name not in modules:
        raise ValueError(f"unknown corpus {name!r}; the corpora are: {', '.join(modules)}")
    return modules[name]


def load(name: str, path: Optional[str] = None):
    """The split corpus ``name`` (``selattn_lm.text.TextCorpus``), its source read from ``path``
    when given."""
    return get(name).load(path)
