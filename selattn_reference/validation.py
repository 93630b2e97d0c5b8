"""Input checks shared by the reference and the C wrappers.

Every public entry point validates its arguments here first, so a wrong shape, dtype or option
raises a clear ``ValueError`` / ``TypeError`` naming the problem instead of silently broadcasting
into a wrong answer.
"""

from __future__ import annotations

import math
from typing import List, Optional

import numpy as np


def as_float_array(x, name: str) -> np.ndarray:
    """Return ``x`` as a floating NumPy array, or raise ``TypeError``."""
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:  # pragma: no cover - numpy raises many kinds here
            raise TypeError(f"{name} must be array-like, got {type(x).__name__}") from exc
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return x


def check_qkv(q, k, v=None, *, check_finite: bool = True):
    """Check that q, k (and v) are floating (B, H, N, D) arrays of one shape and dtype, and (with
    ``check_finite``) free of NaN and infinity.

    Returns the arrays (as ndarrays) followed by the shape ``(B, H, N, D)``.
    """
    arrays = [as_float_array(q, "q"), as_float_array(k, "k")]
    if v is not None:
        arrays.append(as_float_array(v, "v"))
    names = "qkv"
    for name, a in zip(names, arrays):
        if a.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions (B, H, N, D), got shape {a.shape}")
    shape = arrays[0].shape
    for name, a in zip(names[1:], arrays[1:]):
        if a.shape != shape:
            raise ValueError(f"shape mismatch: q is {shape} but {name} is {a.shape}")
        if a.dtype != arrays[0].dtype:
            raise TypeError(f"dtype mismatch: q is {arrays[0].dtype} but {name} is {a.dtype}")
    if min(shape) < 1:
        raise ValueError(f"every dimension of (B, H, N, D) must be >= 1, got {shape}")
    if check_finite:
        for name, a in zip(names, arrays):
            if not np.isfinite(a).all():
                raise ValueError(f"{name} contains NaN or infinity")
    return (*arrays, shape)


def check_selector_head(selector_head, H: int) -> int:
    """Check the selector head index against the number of heads H."""
    if isinstance(selector_head, bool) or not isinstance(selector_head, (int, np.integer)):
        raise TypeError(f"selector_head must be an int, got {type(selector_head).__name__}")
    if not 0 <= selector_head < H:
        raise ValueError(f"selector_head {selector_head} is out of range for H = {H} heads")
    return int(selector_head)


def resolve_scale(scale: Optional[float], D: int) -> float:
    """Return the logit scale: ``1/sqrt(D)`` when ``scale`` is None, else a finite float."""
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def check_budget(budget, protect_bos: bool, name: str = "budget") -> Optional[int]:
    """Check a KV budget: None (no pruning), or an int >= 2 with BOS protection, >= 1 without.
    ``name`` is the argument's name in the error messages."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise TypeError(f"{name} must be an int or None, got {type(budget).__name__}")
    smallest = 2 if protect_bos else 1
    if budget < smallest:
        why = "BOS and the current token" if protect_bos else "the current token"
        raise ValueError(
            f"{name} {budget} is too small: it must be >= {smallest} to hold {why}"
        )
    return int(budget)


def check_budgets(budgets, n_layers: int, name: str = "budgets",
                  protect_bos: bool = True) -> List[Optional[int]]:
    """Check per-layer KV budgets, the one check of every entry point that takes them.

    Parameters
    ----------
    budgets : None (no pruning in any layer) or a sequence of ``n_layers`` entries, each None
        (that layer unpruned) or an int (``check_budget``: >= 2 with BOS protection)
    n_layers : int, the model's number of layers
    name : str, the argument's name in the error messages (``"soft_budgets"``, ``"--budgets"``)

    Returns
    -------
    list of ``n_layers`` entries, each None or a Python int
    """
    if budgets is None:
        return [None] * n_layers
    if isinstance(budgets, (str, bytes)) or not hasattr(budgets, "__len__"):
        raise TypeError(f"{name} must be a sequence of per-layer ints (or None), got "
                        f"{type(budgets).__name__}")
    if len(budgets) != n_layers:
        raise ValueError(f"{name} must have one entry per layer ({n_layers}), got "
                         f"{len(budgets)}")
    out = []
    for layer, b in enumerate(budgets):
        try:
            out.append(check_budget(b, protect_bos))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}[{layer}]: {exc}") from None
    return out


def check_strength(strength) -> float:
    """The rank penalty's slope (training only): a finite float >= 0."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer,
                                                                np.floating)):
        raise TypeError(f"soft_strength must be a number, got {type(strength).__name__}")
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"soft_strength must be a finite number >= 0, got {strength}")
    return float(strength)


def check_threshold(evict_threshold) -> Optional[float]:
    """None, or a finite float >= 0 (a held token is dropped once its F exceeds it)."""
    if evict_threshold is None:
        return None
    if isinstance(evict_threshold, bool) or not isinstance(
            evict_threshold, (int, float, np.integer, np.floating)):
        raise TypeError(f"evict_threshold must be a number or None, got "
                        f"{type(evict_threshold).__name__}")
    t = float(evict_threshold)
    if not np.isfinite(t) or t < 0:
        raise ValueError(f"evict_threshold must be a finite number >= 0, got {evict_threshold!r}")
    return t


def check_cache_dims(batch, heads, head_dim) -> tuple:
    """(B, H, D) as ints >= 1."""
    dims = []
    for name, x in (("batch", batch), ("heads", heads), ("head_dim", head_dim)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(x).__name__}")
        if x < 1:
            raise ValueError(f"{name} must be >= 1, got {x}")
        dims.append(int(x))
    return tuple(dims)


def check_tau(tau) -> float:
    """Check the memory-loss threshold tau > 0."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating, np.integer)):
        raise TypeError(f"tau must be a real number, got {type(tau).__name__}")
    tau = float(tau)
    if not (tau > 0.0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    return tau


def check_mask(F, name: str = "F") -> np.ndarray:
    """Check an accumulated mask: a floating (B, N, N) array."""
    F = as_float_array(F, name)
    if F.ndim != 3 or F.shape[1] != F.shape[2]:
        raise ValueError(f"{name} must have shape (B, N, N), got {F.shape}")
    return F


def check_like(x, name: str, shape) -> np.ndarray:
    """Check that an upstream gradient has the expected shape."""
    x = as_float_array(x, name)
    if x.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {x.shape}")
    return x
