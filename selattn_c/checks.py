"""What the C wrappers check before handing memory to C, beyond the shared checks of
``selattn_reference.validation``: the float32 layout the kernels read, finiteness, buffer sizes
that the C code can index (a ``Context`` is checked by ``backward`` itself).

The kernels trust their arguments (C: callers own memory, inputs const), so everything that could
make them read or write out of bounds is refused here, with a ``ValueError`` or ``TypeError``
naming the argument, before anything is allocated or any state changes.
"""

from __future__ import annotations

import struct
from typing import Optional, Tuple

import numpy as np

from selattn_reference.validation import as_float_array, check_budget

TILE = 64  # rows and columns of a tile (csrc/tile_kernels.h SELATTN_TILE)

# The largest buffer any call may need, in bytes. The C code indexes with size_t and the buffers
# are NumPy arrays (signed intp), so every byte count must fit in both; beyond that a product
# like B * H * N * D * 4 would wrap around and the kernels would index a buffer smaller than they
# think. Sizes below this limit are computed correctly (all indexing is 64-bit) or fail to
# allocate with a MemoryError.
MAX_BUFFER_BYTES = min(int(np.iinfo(np.intp).max), 2 ** (8 * struct.calcsize("N")) - 1)

# set_num_threads refuses more: each thread of a call allocates its own scratch and OpenMP makes
# one OS thread each, so a number like 10**6 would exhaust the process rather than speed it up.
MAX_THREADS = 1024


def as_c_float32(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as a C-contiguous, aligned float32 array: ``x`` itself when it already is one, else
    a copy (any strides, byte order or float dtype). Values beyond float32's range become inf,
    which the finiteness check then reports."""
    if x.dtype == np.float32 and x.flags.c_contiguous and x.flags.aligned and \
            x.dtype.isnative:
        return x
    with np.errstate(over="ignore"):      # overflow to inf is reported by check_all_finite
        return np.require(x, dtype=np.float32, requirements=["C", "A"])


def check_all_finite(x: np.ndarray, name: str) -> None:
    """ValueError when the float32 array ``x`` holds NaN or infinity."""
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinity (after conversion to float32); pass "
                         "check_finite=False to skip this check")


def check_scale_float32(scale: float) -> float:
    """The C kernels take the (already finite) scale as a float32: refuse one that overflows it."""
    with np.errstate(over="ignore"):
        as_float32 = np.float32(scale)
    if not np.isfinite(as_float32):
        raise ValueError(f"scale must be finite as a float32 (|scale| < 3.4e38), got {scale!r}")
    return scale


# The forward hands its Fstart rows (B, ceil(N / 64), N) to the backward through the Context when
# they take at most this many bytes per batch element: up to N = 4096, where the forward holds
# every row during the call anyway (csrc/selattn_forward.c, RING_BYTES), so keeping them costs
# no peak memory and saves the backward one selector product per tile. Longer inputs let the
# backward rebuild them, so a long forward's memory stays O(N) per head.
KEEP_FSTART_BYTES = 1 << 20


def fstart_shape(B: int, N: int) -> Optional[Tuple[int, int, int]]:
    """Shape of the Fstart rows a selective forward of (B, ., N, .) keeps for the backward, or
    None when it keeps none (N = 0, or more than KEEP_FSTART_BYTES per batch element)."""
    nqb = -(-N // TILE)                                       # ceil(N / 64) query blocks
    if N == 0 or 4 * nqb * N > KEEP_FSTART_BYTES:
        return None
    return (B, nqb, N)


def largest_buffer_bytes(B: int, H: int, N: int, D: int, *, mask: bool = False) -> int:
    """Bytes of the largest buffer a forward, backward or accumulated_mask of (B, H, N, D)
    allocates (with ``mask``: including the (B, N, N) output of accumulated_mask)."""
    nqb = -(-N // TILE)                                       # ceil(N / 64) query blocks
    sizes = [
        4 * B * H * nqb * TILE * D,    # transposed key tiles (B, H, nqb, D, 64) >= q, k, v, out
        4 * B * nqb * N,               # Fstart (B, nqb, N)
        8 * B * N,                     # eviction schedule of a budgeted forward (B, N) int64
        4 * H * TILE * D,              # per-thread accumulators (H, 64, D)
    ]
    if mask:
        sizes.append(4 * B * N * N)    # F (B, N, N)
    return max(sizes)


def check_buffer_sizes(shape: tuple, what: str, *, mask: bool = False) -> None:
    """ValueError when a call on ``shape`` (B, H, N, D) would need a buffer too large to index."""
    need = largest_buffer_bytes(*shape, mask=mask)
    if need > MAX_BUFFER_BYTES:
        raise ValueError(f"{what}: shape {tuple(shape)} is too large: it needs a buffer of "
                         f"{need:.3g} bytes, more than the {MAX_BUFFER_BYTES:.3g} the C code can "
                         "index")


def check_cache_bytes(B: int, H: int, D: int, capacity: int) -> None:
    """ValueError when a KV cache of ``capacity`` slots would be too large to index."""
    need = 4 * B * H * capacity * D                           # keys (and values) (B, H, cap, D)
    if need > MAX_BUFFER_BYTES:
        raise ValueError(f"a KVCache of {capacity} slots for (batch, heads, head_dim) = "
                         f"({B}, {H}, {D}) needs {need:.3g} bytes per buffer, more than the "
                         f"{MAX_BUFFER_BYTES:.3g} the C code can index: lower the budget")


def check_row_index(index, name: str, B: int, N: int) -> np.ndarray:
    """``index`` (B, R) of row numbers in [0, N), or -1 for an unused slot, as a C-contiguous
    int64 array; TypeError unless it is an integer array, ValueError on its shape or values."""
    index = np.asarray(index)
    if index.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {index.dtype}")
    if index.ndim != 2 or index.shape[0] != B:
        raise ValueError(f"{name} must have shape (B, R) = ({B}, R), got {index.shape}")
    if index.size and not ((index >= -1) & (index < N)).all():
        bad = index[(index < -1) | (index >= N)].flat[0]
        raise ValueError(f"{name} holds {bad}: each entry must be a row in [0, {N}) or -1 "
                         "(an unused slot)")
    return np.ascontiguousarray(index, dtype=np.int64)


def check_df_rows(dF_rows, dF_row_index, B: int, N: int) -> Tuple[np.ndarray, np.ndarray]:
    """The extra gradient on F as rows, for ``selattn_c.backward``: ``dF_rows`` (B, R, N) float
    (as a C-contiguous float32 array, not yet scanned for NaN) and ``dF_row_index`` (B, R) int64
    (``check_row_index``). Both or neither must be given (None, None is returned for neither)."""
    if (dF_rows is None) != (dF_row_index is None):
        given, missing = (("dF_rows", "dF_row_index") if dF_row_index is None
                          else ("dF_row_index", "dF_rows"))
        raise ValueError(f"{given} needs {missing}: the extra gradient on F is given as rows "
                         "(dF_rows) and which rows of F they are (dF_row_index)")
    if dF_rows is None:
        return None, None
    rows = as_float_array(dF_rows, "dF_rows")
    index = check_row_index(dF_row_index, "dF_row_index", B, N)
    R = index.shape[1]
    if rows.shape != (B, R, N):
        raise ValueError(f"dF_rows must have shape (B, R, N) = ({B}, {R}, {N}) (R from "
                         f"dF_row_index {index.shape}), got {rows.shape}")
    return as_c_float32(rows, "dF_rows"), index


def check_soft_budget(soft_budget, protect_bos: bool, budget) -> Optional[int]:
    """The rank penalty's budget (pruning-aware training, docs/selective-attention.md § 10): None,
    or an int >= 2 with BOS protection (>= 1 without), as ``selattn_reference.forward`` takes
    it; not together with ``budget`` (the pruned inference forward has no backward)."""
    soft_budget = check_budget(soft_budget, protect_bos, "soft_budget")
    if soft_budget is None:
        return None
    if budget is not None:
        raise ValueError("soft_budget (the rank penalty of training) and budget (the pruned "
                         "inference forward, which has no backward) cannot be combined")
    return soft_budget


def check_strength_float32(strength: float) -> float:
    """The C kernels take the (already finite, >= 0) soft_strength as a float32: refuse one that
    overflows it, and return the float32 value as a float."""
    with np.errstate(over="ignore"):
        as_float32 = np.float32(strength)
    if not np.isfinite(as_float32):
        raise ValueError(f"soft_strength must be finite as a float32 (< 3.4e38), got "
                         f"{strength!r}")
    return float(as_float32)


# Dead keys (docs/kernel-design.md): a key whose weight is provably below e^-t of its row's total
# in every head and every later row is skipped. t = 32: even N = 2^20 such keys together hold less
# than 2^20 e^-32 = 1.3e-8 of a row's weight, below float32's rounding (2^-24 = 6e-8 relative).
DEFAULT_DEAD_KEY_THRESHOLD = 32.0


def check_dead_key_threshold(threshold) -> float:
    """The dead-key threshold t as the float32 the kernels take: None (exact: nothing skipped)
    gives 0.0; otherwise a real number > 0, finite as a float32."""
    if threshold is None:
        return 0.0
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating,
                                                                 np.integer)):
        raise TypeError(f"dead_key_threshold must be a float or None, got "
                        f"{type(threshold).__name__}")
    with np.errstate(over="ignore"):
        as_float32 = float(np.float32(threshold))
    if not (np.isfinite(as_float32) and as_float32 > 0.0):
        raise ValueError(f"dead_key_threshold must be > 0 and finite as a float32 (or None for "
                         f"the exact kernel), got {threshold!r}")
    return as_float32


def check_flag(value, name: str) -> bool:
    """``value`` as a bool; TypeError naming ``name`` unless it is a bool (or NumPy bool): a
    truthy string such as 'no' must not silently mean True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} "
                        f"{value!r:.40}")
    return bool(value)
