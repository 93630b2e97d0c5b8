"""The paper's memory loss on the C kernels, without any N x N buffer (docs § 8).

``selattn_reference.memory_loss(F, tau)`` needs F (B, N, N); here the kernels build F tile by
tile from the selector head and keep only what the loss needs:

    kept[b, i] = sum_{j <= i} (1 - min(F[b, i, j], tau) / tau)    (B, N)  memory_rows
    mem[b]     = max_i kept[b, i],  row[b] = its argmax (the first on ties)     memory_loss
    dF[b, row[b], j] = -dmem[b] / tau  where j <= row[b] and F[b, row[b], j] < tau

The gradient is one row of F per batch element, returned as ``DFRows`` (rows (B, 1, N), index
(B, 1)) for ``selattn_c.backward(dout, ctx, dF_rows=..., dF_row_index=...)``, which adds it
inside the tiled backward. ``mask_rows`` gives any rows of F. Each call reads the selector
head's q and k only (1/H of the forward's products; with a ``Context`` from a forward up to
N = 4096 it reuses the forward's ``fstart``). Results are bitwise the same for any thread count.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import numpy as np

from selattn_reference.validation import (
    check_like,
    check_qkv,
    check_selector_head,
    check_tau,
    resolve_scale,
)

from . import Context, _c_inputs, _check_context, _check_rc, _ptr, _threads_arg, overflow
from ._extension import ffi, lib, require_extension
from .checks import check_buffer_sizes, check_flag, check_row_index, check_scale_float32

Source = Union[Context, Tuple[np.ndarray, np.ndarray]]


class DFRows(NamedTuple):
    """A gradient on F given as rows, for ``selattn_c.backward(dout, ctx, dF_rows=rows,
    dF_row_index=index)``: ``rows[b, e]`` is the gradient on ``F[b, index[b, e], :]``."""

    rows: np.ndarray   # (B, R, N) float32
    index: np.ndarray  # (B, R) int64, -1 = unused slot


class _Selector(NamedTuple):
    """What the kernels read to build F: the float32 q, k and the options, plus the forward's
    Fstart rows when a Context has them."""

    q: np.ndarray       # (B, H, N, D) float32, C-contiguous
    k: np.ndarray       # (B, H, N, D)
    fstart: Optional[np.ndarray]
    selector_head: int
    protect_bos: bool
    scale: float
    selective: bool


def _selector(source, *, selector_head, protect_bos, scale, check_finite, what) -> _Selector:
    """The selector of a ``Context`` (its options; the keywords must be left at None), or of a
    pair (q, k) with the keywords' options (the defaults of ``forward`` for None)."""
    require_extension(f"selattn_c.{what}")
    if isinstance(source, Context):
        if (selector_head, protect_bos, scale) != (None, None, None):
            raise ValueError(f"{what}: selector_head, protect_bos and scale come from the "
                             "Context; pass them only with (q, k)")
        _check_context(source, budget_ok=True)    # F does not depend on the budget
        # a forward that skipped dead keys keeps +inf, not F, on their tiles: build F here then
        fstart = source.fstart if source.dead_key_threshold == 0.0 else None
        return _Selector(source.q, source.k, fstart, source.selector_head,
                         source.protect_bos, source.scale, source.selective)
    if not (isinstance(source, tuple) and len(source) == 2):
        raise TypeError(f"{what}: the first argument must be the Context of selattn_c.forward "
                        f"or a pair (q, k) of (B, H, N, D) arrays, got {type(source).__name__}")
    q, k, (B, H, N, D) = check_qkv(*source, check_finite=False)
    s = check_selector_head(0 if selector_head is None else selector_head, H)
    scale = check_scale_float32(resolve_scale(scale, D))
    check_buffer_sizes((B, H, N, D), what)
    maxima: list = []
    q, k = _c_inputs((q, k), "qk", check_finite, maxima)
    if check_finite:
        overflow.check_forward(f"selattn_c.{what}", *maxima, 0.0, N, D, scale)
    bos = True if protect_bos is None else check_flag(protect_bos, "protect_bos")
    return _Selector(q, k, None, s, bos, scale, True)


def _fstart_ptr(sel: _Selector):
    return _ptr(sel.fstart) if sel.fstart is not None else ffi.NULL


def _ignored(ignore_rows, B: int, N: int) -> Optional[np.ndarray]:
    """``ignore_rows`` as a (B, N) bool array, or None."""
    if ignore_rows is None:
        return None
    ignore = np.asarray(ignore_rows)
    if ignore.dtype != np.bool_:
        raise TypeError(f"ignore_rows must be a bool array, got dtype {ignore.dtype}")
    if ignore.shape != (B, N):
        raise ValueError(f"ignore_rows must have shape (B, N) = ({B}, {N}), got {ignore.shape}")
    return ignore


def _tau32(tau) -> float:
    """tau > 0 (``check_tau``) as the float32 the kernels compare F with."""
    tau = check_tau(tau)
    with np.errstate(over="ignore"):
        tau32 = np.float32(tau)
    if not (np.isfinite(tau32) and tau32 > 0):
        raise ValueError(f"tau must be a finite positive float32 (1.2e-38 .. 3.4e38), got {tau!r}")
    return float(tau32)


def _kept(sel: _Selector, tau32: float, ignore: Optional[np.ndarray]) -> np.ndarray:
    """kept (B, N) float32 of a checked selector (``memory_rows``)."""
    B, H, N, D = sel.q.shape
    if not sel.selective:                          # F = 0: every key j <= i is kept
        kept = np.broadcast_to(np.arange(1, N + 1, dtype=np.float32), (B, N)).copy()
    else:
        kept = np.empty((B, N), dtype=np.float32)
        rc = lib.selattn_memory_rows(_ptr(sel.q), _ptr(sel.k), _fstart_ptr(sel), B, H, N, D,
                                     sel.selector_head, sel.protect_bos, sel.scale, tau32,
                                     _ptr(kept), _threads_arg())
        _check_rc(rc, "memory_rows")
    if ignore is not None:
        kept[ignore] = 0.0                         # as if F = tau on those rows
    return kept


def _mask_rows(sel: _Selector, index: np.ndarray) -> np.ndarray:
    """F_rows (B, R, N) float32 of a checked selector and row index (``mask_rows``)."""
    B, H, N, D = sel.q.shape
    R = index.shape[1]
    F_rows = np.zeros((B, R, N), dtype=np.float32)
    if sel.selective and R > 0:
        rc = lib.selattn_mask_rows(_ptr(sel.q), _ptr(sel.k), _fstart_ptr(sel), B, H, N, D,
                                   sel.selector_head, sel.protect_bos, sel.scale,
                                   ffi.cast("int64_t *", ffi.from_buffer(index)), R,
                                   _ptr(F_rows), _threads_arg())
        _check_rc(rc, "mask_rows")
    return F_rows


def memory_rows(source: Source, tau: float = 1.0, *, ignore_rows=None,
                selector_head: Optional[int] = None, protect_bos: Optional[bool] = None,
                scale: Optional[float] = None, check_finite: bool = True) -> np.ndarray:
    """What each query row keeps: ``kept[b, i] = sum_{j <= i} (1 - min(F[b, i, j], tau) / tau)``.

    Parameters
    ----------
    source : the ``Context`` of ``selattn_c.forward`` (its q, k and options), or a pair
        ``(q, k)`` of (B, H, N, D) float arrays with the options below
    tau : float > 0, masking strength at which a key counts as fully evicted (compared with F
        as a float32)
    ignore_rows : (B, N) bool or None, rows that count as fully evicted (kept 0), as if their F
        were tau: the tiny LM's PAD rows
    selector_head, protect_bos, scale : only with ``(q, k)``: as in ``forward`` (None: 0, True,
        ``1/sqrt(D)``)
    check_finite : bool, with ``(q, k)``: raise ValueError on NaN or infinity in them

    Returns
    -------
    kept : (B, N) float32 (summed in double). A standard (non-selective) Context has F = 0:
        ``kept[b, i] = i + 1``.
    """
    sel = _selector(source, selector_head=selector_head, protect_bos=protect_bos, scale=scale,
                    check_finite=check_finite, what="memory_rows")
    B, H, N, D = sel.q.shape
    return _kept(sel, _tau32(tau), _ignored(ignore_rows, B, N))


def mask_rows(source: Source, row_index, *, selector_head: Optional[int] = None,
              protect_bos: Optional[bool] = None, scale: Optional[float] = None,
              check_finite: bool = True) -> np.ndarray:
    """Rows of the accumulated mask F without building F: ``F[b, row_index[b, e], :]``.

    Parameters
    ----------
    source, selector_head, protect_bos, scale, check_finite : as in ``memory_rows``
    row_index : (B, R) integer array of rows in [0, N), or -1 for an unused slot (zeros)

    Returns
    -------
    F_rows : (B, R, N) float32, the same bits as the forward's and backward's F (zeros past the
        diagonal, as F is; all zeros for a non-selective Context)
    """
    sel = _selector(source, selector_head=selector_head, protect_bos=protect_bos, scale=scale,
                    check_finite=check_finite, what="mask_rows")
    B, H, N, D = sel.q.shape
    return _mask_rows(sel, check_row_index(row_index, "row_index", B, N))


def memory_loss(source: Source, tau: float = 1.0, *, ignore_rows=None, return_row: bool = False,
                selector_head: Optional[int] = None, protect_bos: Optional[bool] = None,
                scale: Optional[float] = None, check_finite: bool = True):
    """The paper's memory loss ``max_i sum_{j <= i} (1 - min(F[i, j], tau) / tau)`` per batch
    element, without any N x N buffer (``selattn_reference.memory_loss`` on F).

    Parameters
    ----------
    source, tau, ignore_rows, selector_head, protect_bos, scale, check_finite : as in
        ``memory_rows``
    return_row : bool, also return the row attaining each max (for ``memory_loss_backward``,
        which then does not recompute it)

    Returns
    -------
    mem : (B,) float32, the largest number of (soft) keys any query still needs
    row : (B,) int64, the first row attaining it (only with ``return_row``)
    """
    kept = memory_rows(source, tau, ignore_rows=ignore_rows, selector_head=selector_head,
                       protect_bos=protect_bos, scale=scale, check_finite=check_finite)
    row = kept.argmax(axis=-1).astype(np.int64)                            # (B,) first on ties
    mem = kept[np.arange(kept.shape[0]), row]                              # (B,)
    return (mem, row) if return_row else mem


def memory_loss_backward(dmem, source: Source, tau: float = 1.0, *, row=None, ignore_rows=None,
                         selector_head: Optional[int] = None, protect_bos: Optional[bool] = None,
                         scale: Optional[float] = None, check_finite: bool = True) -> DFRows:
    """Gradient of ``memory_loss`` with respect to F, as one row of F per batch element
    (``selattn_reference.memory_loss_backward`` gives the same values as a dense (B, N, N) dF).

    Parameters
    ----------
    dmem : (B,) float array, upstream gradient of ``mem``
    source, tau, ignore_rows, selector_head, protect_bos, scale, check_finite : as given to
        ``memory_loss``
    row : (B,) integer array or None, the rows ``memory_loss(..., return_row=True)`` returned
        (None: recomputed, one more pass over the selector head)

    Returns
    -------
    DFRows : rows (B, 1, N) float32 with ``rows[b, 0, j] = -dmem[b] / tau`` where ``j <= row[b]``
        and ``F[b, row[b], j] < tau`` (0 elsewhere, and all 0 on an ignored row), index (B, 1)
        int64 = ``row``; for ``selattn_c.backward(..., dF_rows=rows, dF_row_index=index)``
    """
    sel = _selector(source, selector_head=selector_head, protect_bos=protect_bos, scale=scale,
                    check_finite=check_finite, what="memory_loss_backward")
    tau32 = _tau32(tau)
    B, H, N, D = sel.q.shape
    dmem = check_like(dmem, "dmem", (B,))
    ignore = _ignored(ignore_rows, B, N)
    if row is None:
        row = _kept(sel, tau32, ignore).argmax(axis=-1)                    # (B,) first on ties
    row = np.asarray(row)
    if row.shape != (B,):
        raise ValueError(f"row must have shape (B,) = ({B},), got {row.shape}")
    index = check_row_index(row[:, None], "row", B, N)                     # (B, 1)
    if (index < 0).any():
        raise ValueError(f"row must hold rows in [0, {N}), got {int(index.min())}")
    F_row = _mask_rows(sel, index)                                         # (B, 1, N)
    live = np.arange(N)[None, None, :] <= index[:, :, None]                # (B, 1, N) j <= r
    live &= F_row < np.float32(tau32)                                      # beyond tau: flat
    if ignore is not None:                                                 # F = tau there
        live &= ~ignore[np.arange(B), index[:, 0]][:, None, None]
    rows = np.where(live, (-dmem / check_tau(tau))[:, None, None], 0.0).astype(np.float32)
    return DFRows(rows=rows, index=index)
