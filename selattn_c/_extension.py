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


def require_extension(what: str) -> None:
    """Raise ``ExtensionNotBuilt`` naming ``what`` needed the kernels, unless they are built."""
    if lib is None:
        raise ExtensionNotBuilt(
            f"{what} needs selattn_c's compiled C extension, which is not installed ({REASON}). "
            "Reinstall with a working C compiler (pip install --force-reinstall .), or use the "
            "NumPy reference, selattn_reference, which needs no compiler.")
