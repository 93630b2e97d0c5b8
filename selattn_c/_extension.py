"""The compiled kernels (``ffi``, ``lib``), or stand-ins that say why they are missing.

``pip install .`` compiles ``selattn_c._selattn_cffi`` from ``csrc/``. When that is impossible (no
C compiler, or ``SELATTN_NO_EXTENSION=1``) the install still succeeds, with a warning, and the
package keeps working where it does not need C: ``selattn train`` and ``selattn eval`` run the
NumPy reference attention instead (``training.make_attention('auto')``), and everything in
``selattn_reference`` works as always. Anything that does need the kernels (``forward``,
``KVCache``, ``selattn demo``, ...) raises ``ExtensionNotBuilt`` on first use, with the reason and
how to fix it, instead of the whole package failing to import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


class ExtensionNotBuilt(ImportError):
    """The C extension of selattn_c is not installed; the message says why and what to do."""


try:
    from ._selattn_cffi import ffi, lib
except ImportError as e:  # a pure-Python install, or a broken build
    ffi = lib = None
    REASON = f"{type(e).__name__}: {e}"
else:
    REASON = ""


def extension_built() -> bool:
    """True when the compiled kernels imported (False: only the NumPy paths work)."""
    return lib is not None


def extension_reason() -> str:
    """Why the extension did not import ("" when it did)."""
    return REASON


def _source_checkout() -> Optional[Path]:
    """The checkout this selattn_c was imported from (its setup.py and csrc/ beside it), or None
    for an installed copy."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "setup.py").is_file() and (root / "csrc").is_dir() else None


def require_extension(what: str) -> None:
    """Raise ``ExtensionNotBuilt`` naming ``what`` needed the kernels, unless they are built."""
    if lib is not None:
        return
    checkout = _source_checkout()
    if checkout is not None:
        raise ExtensionNotBuilt(
            f"{what} needs selattn_c's compiled C extension, but this selattn_c is the source "
            f"checkout in {checkout}, which has none ({REASON}). Either the checkout was never "
            "built in place, or it shadows an installed copy: Python puts the current directory "
            "first on sys.path for `python -m ...` and `python -c ...`, so run those from another "
            "directory (or run `pytest` rather than `python -m pytest`). Developer set-up: `pip "
            "install -e '.[test]'` in the checkout builds the extension in place (after changing "
            "C code: `pip install -e . --no-deps`). The NumPy reference, selattn_reference, "
            "needs no compiler.")
    raise ExtensionNotBuilt(
        f"{what} needs selattn_c's compiled C extension, which is not installed ({REASON}). "
        "Reinstall with a working C compiler (pip install --force-reinstall .), "
        "or use the NumPy reference, selattn_reference, which needs no compiler.")
