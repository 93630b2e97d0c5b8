"""selattn_c: selective attention on the CPU, in C (cffi + OpenMP).

The API mirrors ``selattn_reference.attention`` (the NumPy spec):

- ``forward(q, k, v, ...) -> (out, ctx)`` and ``backward(dout, ctx) -> (dq, dk, dv)``,
- ``accumulated_mask(q, k, ...) -> F`` (materialises (B, N, N): for inspection and plots only),
- ``memory_loss(ctx, tau)``, ``memory_loss_backward(dmem, ctx, tau)``: the paper's memory loss
  and its gradient as rows of F for ``backward(..., dF_rows=, dF_row_index=)``, without any
  N x N buffer (``selattn_c.memory``; also ``memory_rows``, ``mask_rows``),
- ``KVCache``: the pruned KV cache for token-by-token decoding (``selattn_c.kv_cache``),
- ``dead_tiles(q, k, ...)``, ``dead_keys(q, k, ...)``: which key tiles, and which keys, the forward
  and backward skip as dead keys (``dead_key_threshold``, docs/kernel-design.md),
- ``openmp_enabled()``, ``get_num_threads()``, ``set_num_threads(n)``, ``kernel_name()``.

Inputs are (B, H, N, D) float32 or float64 arrays of any strides; the kernels compute in float32
and return float32. The GIL is released while the C code runs (cffi does so for every call), and
calls from several threads at once are safe (nothing is shared between calls).

Bad input raises ``ValueError`` or ``TypeError`` naming the argument before any C code runs; NaN or
infinity in an input raises ``ValueError`` unless ``check_finite=False`` (docs/reliability.md).

On a pure-Python install (no C compiler at install time) the package still imports:
``extension_built()`` is False and every function above raises ``ExtensionNotBuilt`` (an
``ImportError``) saying why, while training (``selattn_lm``) falls back to the NumPy
attention (``_extension.py``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from selattn_reference.attention import DEFAULT_SOFT_STRENGTH
from selattn_reference.validation import (
    check_budget,
    check_like,
    check_qkv,
    check_selector_head,
    check_strength,
    resolve_scale,
)

from ._extension import (
    ExtensionNotBuilt,
    extension_built,
    extension_reason,
    ffi,
    lib,
    require_extension,
)
from . import overflow
from ._fork import install as install_fork_hooks
from .checks import (
    DEFAULT_DEAD_KEY_THRESHOLD,
    MAX_THREADS,
    as_c_float32,
    check_all_finite,
    check_buffer_sizes,
    check_dead_key_threshold,
    check_df_rows,
    check_flag,
    check_scale_float32,
    check_soft_budget,
    check_strength_float32,
    fstart_shape,
)

__all__ = [
    "DEFAULT_DEAD_KEY_THRESHOLD",
    "Context",
    "DFRows",
    "ExtensionNotBuilt",
    "KVCache",
    "accumulated_mask",
    "backward",
    "build_info",
    "dead_keys",
    "dead_tiles",
    "extension_built",
    "extension_reason",
    "forward",
    "get_num_threads",
    "kernel_name",
    "mask_rows",
    "memory_loss",
    "memory_loss_backward",
    "memory_rows",
    "openmp_enabled",
    "set_num_threads",
]

_threads = {"n": 0}  # 0: the OpenMP default (OMP_NUM_THREADS, else all cores)
install_fork_hooks(_threads)


def openmp_enabled() -> bool:
    """True when the extension was built with OpenMP (False: a serial build)."""
    require_extension("selattn_c.openmp_enabled")
    return bool(lib.selattn_openmp_enabled())


def get_num_threads() -> int:
    """Threads each call uses: the value given to ``set_num_threads``, else the OpenMP default."""
    if not openmp_enabled():
        return 1
    return _threads["n"] if _threads["n"] > 0 else int(lib.selattn_max_threads())


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in later calls (``n >= 1``). A serial build accepts and ignores it, and
    so does a forked child whose OpenMP runtime could not release its parent's threads (it runs
    with 1 thread: ``selattn_c._fork``)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"number of threads must be an int, got {type(n).__name__}")
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"number of threads must be >= 1 and <= {MAX_THREADS}, got {n}")
    if not _threads.get("pinned"):
        _threads["n"] = int(n)


def build_info() -> Dict[str, object]:
    """How this extension was built and what it runs: ``openmp`` (bool), ``serial_reason`` ("" for
    an OpenMP build), ``kernels`` (the tile kernels this CPU runs), ``default_threads``."""
    require_extension("selattn_c.build_info")
    return {
        "openmp": openmp_enabled(),
        "serial_reason": ffi.string(lib.selattn_serial_reason()).decode(),
        "kernels": kernel_name(),
        "default_threads": int(lib.selattn_max_threads()),
    }


def kernel_name() -> str:
    """Which tile kernels this CPU runs: 'avx512', 'avx2' or 'generic'."""
    require_extension("selattn_c.kernel_name")
    return ffi.string(lib.selattn_kernel_name()).decode()


_reason = ffi.string(lib.selattn_serial_reason()).decode() if extension_built() else ""
if _reason and _reason != "SELATTN_NO_OPENMP":
    warnings.warn(f"selattn_c was built without OpenMP ({_reason}): every call uses one thread. "
                  "Install a compiler with OpenMP support and reinstall for parallel kernels.",
                  RuntimeWarning, stacklevel=2)


@dataclass(frozen=True)
class Context:
    """What ``backward`` needs from ``forward``: the float32 inputs, the output, the per-row
    log-sum-exp and, for inputs up to N = 4096, the mask entering each block of 64 queries
    (``fstart``, N^2 / 64 floats per batch element), which the backward would otherwise rebuild;
    with the rank penalty (``soft_budget``) each row's cut (``soft_theta``, ``soft_cut``).
    A forward that skipped dead keys (``dead_key_threshold``) keeps ``+inf`` in ``fstart`` on a
    dead key tile from the block after its death on: the backward's input, not F.
    Nothing of size N x N is kept. Inputs that already are C-contiguous float32 are kept by
    reference, not copied: do not modify them between ``forward`` and ``backward``."""

    q: np.ndarray    # (B, H, N, D) float32, C-contiguous
    k: np.ndarray    # (B, H, N, D)
    v: np.ndarray    # (B, H, N, D)
    out: np.ndarray  # (B, H, N, D)
    lse: np.ndarray  # (B, H, N) log-sum-exp of each row of logits
    scale: float
    selector_head: int
    protect_bos: bool
    selective: bool
    budget: Optional[int] = None   # a budgeted (pruned) forward has no backward
    fstart: Optional[np.ndarray] = None   # (B, ceil(N / 64), N) or None (the backward builds it)
    soft_budget: Optional[int] = None     # the rank penalty's budget (§ 10), or None
    soft_strength: float = 0.0            # its slope, as the float32 the kernels used
    soft_theta: Optional[np.ndarray] = None  # (B, N) float32 each row's cut F[i, cut], +inf: none
    soft_cut: Optional[np.ndarray] = None    # (B, N) int64 the cut's column, -1 where none
    # the dead-key threshold t the forward skipped with (float32 value), 0.0: exact. With t > 0,
    # fstart holds +inf on a dead tile's keys after its death: the backward's input, not F.
    dead_key_threshold: float = 0.0


def _c_inputs(arrays, names, check_finite: bool, maxima: Optional[list] = None):
    """C-contiguous aligned float32 versions of ``arrays``, checked for NaN and infinity after
    the conversion (so values that overflow float32 are caught too) when ``check_finite``; the
    same read appends each array's largest magnitude to ``maxima`` (for ``overflow``)."""
    out = []
    for x, name in zip(arrays, names):
        x = as_c_float32(x, name)
        if check_finite:
            top = float(lib.selattn_max_abs(_ptr(x), x.size, _threads_arg()))
            if top == float("inf"):
                check_all_finite(x, name)     # raises the ValueError
            if maxima is not None:
                maxima.append(top)
        out.append(x)
    return out


def _ptr(x: np.ndarray):
    return ffi.cast("float *", ffi.from_buffer(x, require_writable=False))


def _check_rc(rc: int, what: str) -> None:
    if rc != 0:
        raise MemoryError(f"selattn_c.{what}: could not allocate the per-thread scratch memory")


def _threads_arg() -> int:
    return _threads["n"]


def forward(q, k, v, *, selector_head: int = 0, protect_bos: bool = True, selective: bool = True,
            scale: Optional[float] = None, budget: Optional[int] = None,
            soft_budget: Optional[int] = None, soft_strength: float = DEFAULT_SOFT_STRENGTH,
            dead_key_threshold: Optional[float] = DEFAULT_DEAD_KEY_THRESHOLD,
            check_finite: bool = True) -> Tuple[np.ndarray, Context]:
    """Selective attention, forward, in float32 without any N x N buffer.

    Parameters
    ----------
    q, k, v : (B, H, N, D) float32 or float64 arrays, any strides
    selector_head : int, the head whose logits build the mask (default 0)
    protect_bos : bool, never mask position 0
    selective : bool, False gives standard causal attention
    scale : float or None, logit scale (default ``1/sqrt(D)``)
    budget : int or None, pruned prefill: each query attends only to the keys a ``budget``-slot
        KV cache (``KVCache``) still holds when it arrives; O(B x N) extra memory. There is no
        backward through a budget (an inference feature): ``backward`` refuses its context.
    soft_budget : int or None, training only: the rank penalty of pruning-aware training
        (``selattn_reference.forward(..., soft_budget=)``, docs/selective-attention.md § 10):
        every head subtracts ``F_soft = F + soft_strength * max(F - theta, 0)``, theta being
        each row's ``soft_budget``-th smallest F; ``backward`` differentiates through it. >= 2
        with BOS protection (>= 1 without); not with ``budget``. No N x N buffer either: the
        cuts are found row by row (docs/kernel-design.md)
    soft_strength : float >= 0, the penalty's slope (finite as a float32)
    dead_key_threshold : float > 0 or None, t: skip the key tiles whose every key provably has a
        weight below ``e^-t`` of its row's total in every head, for a query block and all later
        ones (docs/kernel-design.md, "Dead keys"); ``backward`` skips the same tiles. The
        default (32) leaves results equal to the exact kernel's within float32 rounding; None
        is the exact kernel (nothing skipped). With ``budget``, as a ``KVCache``'s prefill does
        (bit for bit the same outputs).
    check_finite : bool, raise ValueError when an input holds NaN or infinity (False skips the
        scan; such inputs then give NaN outputs, never a crash)

    Returns
    -------
    out : (B, H, N, D) float32
    ctx : Context for ``backward``
    """
    require_extension("selattn_c.forward")
    protect_bos, selective = check_flag(protect_bos, "protect_bos"), check_flag(selective,
                                                                                "selective")
    q, k, v, (B, H, N, D) = check_qkv(q, k, v, check_finite=False)
    s = check_selector_head(selector_head, H)
    scale = check_scale_float32(resolve_scale(scale, D))
    budget = check_budget(budget, bool(protect_bos))
    soft_budget = check_soft_budget(soft_budget, bool(protect_bos), budget)
    soft_strength = check_strength_float32(check_strength(soft_strength))
    dead_t = check_dead_key_threshold(dead_key_threshold)
    if not selective:
        dead_t = 0.0                   # F = 0 kills nothing
    check_buffer_sizes((B, H, N, D), "forward")
    maxima: list = []
    q, k, v = _c_inputs((q, k, v), "qkv", check_finite, maxima)
    if check_finite:
        overflow.check_forward("forward", *maxima, N, D, scale,
                               soft_strength if soft_budget is not None else 0.0)
    out = np.empty((B, H, N, D), dtype=np.float32)
    lse = np.empty((B, H, N), dtype=np.float32)
    fstart = theta = cut = None
    if budget is None:
        shape = fstart_shape(B, N) if selective else None
        # zeros: the kernel writes each row only up to its block's diagonal
        fstart = np.zeros(shape, dtype=np.float32) if shape else None
        fstart_ptr = _ptr(fstart) if fstart is not None else ffi.NULL
        if soft_budget is None:
            rc = lib.selattn_forward_skip(_ptr(q), _ptr(k), _ptr(v), B, H, N, D, s,
                                          bool(protect_bos), bool(selective), scale, 0, 0.0,
                                          dead_t, _ptr(out), _ptr(lse), fstart_ptr, ffi.NULL,
                                          ffi.NULL, _threads_arg())
        else:
            theta = np.empty((B, N), dtype=np.float32)                    # (B, N)
            cut = np.empty((B, N), dtype=np.int64)                        # (B, N)
            # a soft budget >= N cuts no row: min() keeps any Python int within size_t
            rc = lib.selattn_forward_skip(_ptr(q), _ptr(k), _ptr(v), B, H, N, D, s,
                                          bool(protect_bos), bool(selective), scale,
                                          min(soft_budget, N), soft_strength, dead_t, _ptr(out),
                                          _ptr(lse), fstart_ptr, _ptr(theta),
                                          ffi.cast("int64_t *", ffi.from_buffer(cut)),
                                          _threads_arg())
    else:
        lse.fill(np.nan)   # not computed: nothing may differentiate through a budget
        # a budget >= N evicts nothing: min() keeps any Python int within size_t
        # with the dead-key skipping of a KVCache's prefill: the same outputs, bit for bit
        rc = lib.selattn_forward_budget_skip(_ptr(q), _ptr(k), _ptr(v), B, H, N, D, s,
                                             bool(protect_bos), bool(selective), scale,
                                             min(budget, N), dead_t, _ptr(out), _threads_arg())
    _check_rc(rc, "forward")
    ctx = Context(q=q, k=k, v=v, out=out, lse=lse, scale=scale, selector_head=s,
                  protect_bos=bool(protect_bos), selective=bool(selective), budget=budget,
                  fstart=fstart, soft_budget=soft_budget,
                  soft_strength=soft_strength if soft_budget is not None else 0.0,
                  soft_theta=theta, soft_cut=cut,
                  dead_key_threshold=dead_t if budget is None else 0.0)
    return out, ctx


def _check_context(ctx, *, budget_ok: bool = False) -> None:
    """A Context whose arrays the backward kernel can read: the kernel trusts the shapes, so a
    Context built or altered by hand is checked field by field (no data is scanned). A budgeted
    one is refused unless ``budget_ok`` (the memory loss reads only q and k, which a budget
    leaves alone)."""
    if not isinstance(ctx, Context):
        raise TypeError(f"ctx must be the Context returned by selattn_c.forward, got "
                        f"{type(ctx).__name__}")
    if ctx.budget is not None and not budget_ok:
        raise ValueError(f"backward through a budgeted forward (budget={ctx.budget}) is not "
                         "supported: pruning is an inference feature; train with budget=None")
    q = ctx.q
    if not isinstance(q, np.ndarray) or q.ndim != 4:
        raise ValueError("ctx.q must be a (B, H, N, D) array: this Context was not made by "
                         "selattn_c.forward")
    B, H, N, D = q.shape
    expected = {"q": (B, H, N, D), "k": (B, H, N, D), "v": (B, H, N, D), "out": (B, H, N, D),
                "lse": (B, H, N)}
    if ctx.fstart is not None:       # None is fine: the backward then builds the rows itself
        expected["fstart"] = fstart_shape(B, N) or "None (a forward keeps none at this N)"
    for name, shape in expected.items():
        x = getattr(ctx, name)
        if not (isinstance(x, np.ndarray) and x.shape == shape and x.dtype == np.float32
                and x.flags.c_contiguous and x.flags.aligned):
            raise ValueError(f"ctx.{name} must be a C-contiguous float32 array of shape {shape}: "
                             "this Context was not made by selattn_c.forward")
    check_selector_head(ctx.selector_head, H)
    for name in ("protect_bos", "selective"):
        if not isinstance(getattr(ctx, name), (bool, np.bool_)):
            raise ValueError(f"ctx.{name} must be a bool, got {getattr(ctx, name)!r:.40}: this "
                             "Context was not made by selattn_c.forward")
    if isinstance(ctx.scale, bool) or not isinstance(ctx.scale, (float, int, np.floating,
                                                                  np.integer)):
        raise ValueError(f"ctx.scale must be a real number, got {ctx.scale!r:.40}: this "
                         "Context was not made by selattn_c.forward")
    check_scale_float32(resolve_scale(ctx.scale, D))
    if ctx.soft_theta is not None or ctx.soft_cut is not None:      # the rank penalty's cuts
        for name, dtype in (("soft_theta", np.float32), ("soft_cut", np.int64)):
            x = getattr(ctx, name)
            if not (isinstance(x, np.ndarray) and x.shape == (B, N) and x.dtype == dtype
                    and x.flags.c_contiguous and x.flags.aligned):
                raise ValueError(f"ctx.{name} must be a C-contiguous {np.dtype(dtype).name} "
                                 f"array of shape {(B, N)}: this Context was not made by "
                                 "selattn_c.forward")
        check_strength_float32(check_strength(ctx.soft_strength))
    if ctx.dead_key_threshold != 0.0:
        check_dead_key_threshold(ctx.dead_key_threshold)


def backward(dout, ctx: Context, *, dF_rows=None, dF_row_index=None, check_finite: bool = True
             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Selective attention, backward, including the path through F into the selector head
    (and through the rank penalty when the forward had a ``soft_budget``).

    Parameters
    ----------
    dout : (B, H, N, D) float array, upstream gradient of ``out``
    ctx : Context from ``forward``
    dF_rows : (B, R, N) float array or None, an extra upstream gradient on F given as rows (the
        memory loss': ``selattn_c.memory_loss_backward``): ``dF_rows[b, e]`` is the gradient on
        ``F[b, dF_row_index[b, e], :]``; every other row of F gets none. Rows named twice add
        up. Entries on keys ``j >= i`` (where F is a constant 0) or on a protected BOS
        contribute nothing, as in ``selattn_reference.backward(..., dF=)``. No N x N buffer is
        made: the rows join the tiled backward where they fall. When ``ctx`` is not selective,
        F is the constant 0 and the rows are checked but contribute nothing (as in the
        reference).
    dF_row_index : (B, R) integer array or None, which row of F each slot is, or -1 for an
        unused slot; given together with ``dF_rows``
    check_finite : bool, raise ValueError when dout or dF_rows holds NaN or infinity (False
        skips the scan)

    Returns
    -------
    dq, dk, dv : (B, H, N, D) float32
    """
    require_extension("selattn_c.backward")
    _check_context(ctx)
    B, H, N, D = ctx.q.shape
    soft = ctx.soft_theta is not None         # the rank penalty: its cuts (checked above)
    maxima: list = []
    (dout,) = _c_inputs([check_like(dout, "dout", (B, H, N, D))], ["dout"], check_finite, maxima)
    rows, index = check_df_rows(dF_rows, dF_row_index, B, N)
    R = 0
    if rows is not None:
        (rows,) = _c_inputs([rows], ["dF_rows"], check_finite, maxima)
        R = index.shape[1]
    if check_finite:      # the context's inputs too: its forward may not have checked them
        context = [float(lib.selattn_max_abs(_ptr(x), x.size, _threads_arg()))
                   for x in (ctx.q, ctx.k, ctx.v)]
        overflow.check_backward("backward", context, maxima[0], maxima[1] if R else 0.0, R, H,
                                N, D, ctx.scale, ctx.soft_strength if soft else 0.0)
    dq, dk, dv = (np.empty((B, H, N, D), dtype=np.float32) for _ in range(3))
    fstart = _ptr(ctx.fstart) if ctx.fstart is not None else ffi.NULL
    rows_ptr = _ptr(rows) if R > 0 else ffi.NULL
    index_ptr = ffi.cast("int64_t *", ffi.from_buffer(index)) if R > 0 else ffi.NULL
    theta_ptr = _ptr(ctx.soft_theta) if soft else ffi.NULL
    cut_ptr = ffi.cast("int64_t *", ffi.from_buffer(ctx.soft_cut)) if soft else ffi.NULL
    # the tiles the forward skipped as dead keys are skipped here too (same rows, same test)
    rc = lib.selattn_backward_skip(_ptr(ctx.q), _ptr(ctx.k), _ptr(ctx.v), _ptr(ctx.out),
                                   _ptr(ctx.lse), fstart, _ptr(dout), rows_ptr, index_ptr, R,
                                   B, H, N, D, ctx.selector_head, ctx.protect_bos,
                                   ctx.selective, ctx.scale, ctx.soft_strength if soft else 0.0,
                                   theta_ptr, cut_ptr, ctx.dead_key_threshold, _ptr(dq),
                                   _ptr(dk), _ptr(dv), _threads_arg())
    _check_rc(rc, "backward")
    return dq, dk, dv


def accumulated_mask(q, k, *, selector_head: int = 0, protect_bos: bool = True,
                     scale: Optional[float] = None, check_finite: bool = True) -> np.ndarray:
    """The accumulated mask F (B, N, N) in float32, for inspection and plots only.

    Parameters
    ----------
    q, k : (B, H, N, D) float arrays
    selector_head, protect_bos, scale, check_finite : as in ``forward``

    Returns
    -------
    F : (B, N, N) float32, ``F[b, i, j] = sum_{m < i} S[b, m, j]``
    """
    require_extension("selattn_c.accumulated_mask")
    protect_bos = check_flag(protect_bos, "protect_bos")
    q, k, (B, H, N, D) = check_qkv(q, k, check_finite=False)
    s = check_selector_head(selector_head, H)
    scale = check_scale_float32(resolve_scale(scale, D))
    check_buffer_sizes((B, H, N, D), "accumulated_mask", mask=True)
    maxima: list = []
    q, k = _c_inputs((q, k), "qk", check_finite, maxima)
    if check_finite:
        overflow.check_forward("accumulated_mask", *maxima, 0.0, N, D, scale)
    F = np.empty((B, N, N), dtype=np.float32)
    rc = lib.selattn_accumulated_mask(_ptr(q), _ptr(k), B, H, N, D, s, bool(protect_bos), scale,
                                      _ptr(F), _threads_arg())
    _check_rc(rc, "accumulated_mask")
    return F


from .kv_cache import KVCache  # noqa: E402  (needs _threads_arg above)
from .memory import (  # noqa: E402  (needs _check_context, _ptr above)
    DFRows,
    mask_rows,
    memory_loss,
    memory_loss_backward,
    memory_rows,
)


def _dead_key_inputs(q, k, selector_head, scale, dead_key_threshold, check_finite, name):
    """The checked inputs of ``dead_tiles`` and ``dead_keys``: (q, k, (B, H, N, D), selector
    head, float32 scale, threshold). ValueError/TypeError naming the argument."""
    require_extension(f"selattn_c.{name}")
    if dead_key_threshold is None:
        raise ValueError("dead_key_threshold must be a float > 0 here (None skips nothing)")
    t = check_dead_key_threshold(dead_key_threshold)
    q, k, _, (B, H, N, D) = check_qkv(q, k, k, check_finite=False)
    s = check_selector_head(selector_head, H)
    scale = check_scale_float32(resolve_scale(scale, D))
    check_buffer_sizes((B, H, N, D), name)
    q, k = _c_inputs((q, k), "qk", check_finite)
    return q, k, (B, H, N, D), s, scale, t


def dead_tiles(q, k, *, selector_head: int = 0, protect_bos: bool = True, scale: Optional[float]
               = None, dead_key_threshold: float = DEFAULT_DEAD_KEY_THRESHOLD,
               check_finite: bool = True) -> np.ndarray:
    """Which key tiles (of 64 keys) ``forward`` and ``backward`` skip as dead keys.

    Parameters
    ----------
    q, k : (B, H, N, D) float arrays, as for ``forward``
    selector_head, protect_bos, scale : as for ``forward``
    dead_key_threshold : float > 0, t (docs/kernel-design.md, "Dead keys")
    check_finite : bool, raise ValueError on NaN or infinity in q or k

    Returns
    -------
    dead_from : (B, ceil(N / 64)) int64, for each key tile the first query block (of 64 rows)
        for which it is dead, and for every later block; ceil(N / 64) where never. Builds F's
        block rows (the selector head's logits on the causal triangle) to decide.
    """
    q, k, (B, H, N, D), s, scale, t = _dead_key_inputs(q, k, selector_head, scale,
                                                       dead_key_threshold,
                                                       check_finite, "dead_tiles")
    nqb = -(-N // 64)
    dead_from = np.empty((B, nqb), dtype=np.int64)
    rc = lib.selattn_dead_tiles(_ptr(q), _ptr(k), ffi.NULL, B, H, N, D, s, bool(protect_bos), True,
                                scale, t, ffi.cast("int64_t *", ffi.from_buffer(dead_from)),
                                _threads_arg())
    _check_rc(rc, "dead_tiles")
    return dead_from


def dead_keys(q, k, *, selector_head: int = 0, protect_bos: bool = True, scale: Optional[float]
              = None, dead_key_threshold: float = DEFAULT_DEAD_KEY_THRESHOLD,
              check_finite: bool = True) -> np.ndarray:
    """Which keys ``forward`` and ``backward`` skip as dead keys, key by key: the live keys of a
    partly dead tile are packed and worked on, the dead ones skipped (docs/kernel-design.md).

    Parameters are those of ``dead_tiles``.

    Returns
    -------
    key_dead_from : (B, N) int64, for each key the first query block (of 64 rows) for which it is
        dead, and for every later block; ceil(N / 64) where never. A key tile's ``dead_tiles``
        entry is the largest of its keys'.
    """
    q, k, (B, H, N, D), s, scale, t = _dead_key_inputs(q, k, selector_head, scale,
                                                       dead_key_threshold,
                                                       check_finite, "dead_keys")
    key_dead_from = np.empty((B, N), dtype=np.int64)
    rc = lib.selattn_dead_keys(_ptr(q), _ptr(k), ffi.NULL, B, H, N, D, s, bool(protect_bos), True,
                               scale, t, ffi.cast("int64_t *", ffi.from_buffer(key_dead_from)),
                               _threads_arg())
    _check_rc(rc, "dead_keys")
    return key_dead_from
