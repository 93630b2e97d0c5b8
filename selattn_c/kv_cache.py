"""The pruned KV cache of one selective-attention layer, in C: token-by-token decoding that evicts
what selective attention masked, and a prefill that computes the same thing with the blocked kernel.

The readable model of the same data structure is ``selattn_reference.KVCache``
(selattn_reference/cache.py); ``docs/kv-cache.md`` explains the slot layout, the eviction rule,
why it is safe, what it costs and how to pick a budget.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Optional, Tuple

import numpy as np

from selattn_reference.validation import (
    as_float_array,
    check_budget,
    check_cache_dims,
    check_selector_head,
    check_threshold,
    resolve_scale,
)

from . import _threads_arg  # the package's thread setting (defined before this module loads)
from ._extension import ffi, lib, require_extension
from .checks import (
    DEFAULT_DEAD_KEY_THRESHOLD,
    TILE,
    as_c_float32,
    check_buffer_sizes,
    check_cache_bytes,
    check_dead_key_threshold,
    check_flag,
    check_scale_float32,
)

_INITIAL_CAPACITY = 64  # a cache starts with one tile of slots and doubles when full
_FLOAT32 = np.dtype(np.float32)


def _ready(x, shape: tuple) -> bool:
    """True when ``x`` is already what the C step reads: a native float32 C-contiguous ndarray of
    ``shape`` (NumPy's native float32 dtype is one shared object, so ``is`` tests byte order)."""
    return (type(x) is np.ndarray and x.dtype is _FLOAT32 and x.shape == shape
            and x.flags.c_contiguous and x.flags.aligned)


if lib is not None:   # looked up once: a step runs per token and layer
    _kv_step, _buffer, _OK = lib.selattn_kv_step, ffi.from_buffer, lib.SELATTN_OK


def _round_up(n: int) -> int:
    return max(TILE, -(-n // TILE) * TILE)


class KVCache:
    """A pruned KV cache for one selective-attention layer (float32, C kernels).

    Parameters
    ----------
    batch, heads, head_dim : int, B, H and D of the tokens it will hold
    budget : int or None, most tokens held per batch element; None grows without limit. At least
        2 with BOS protection (BOS and the newest token), at least 1 without.
    selector_head : int, the head whose logits build the accumulated mask F (default 0)
    protect_bos : bool, never mask or evict position 0
    selective : bool, False gives standard attention: F = 0, so a budget evicts the oldest token
        (a sliding window that keeps BOS)
    scale : float or None, logit scale (default ``1/sqrt(head_dim)``)
    evict_threshold : float >= 0 or None, also drop any held token whose F exceeds it. Its weight
        was already multiplied by less than ``e^-evict_threshold``; see docs/kv-cache.md for the
        error bound.
    dead_key_threshold : float > 0 or None, t: a prefill into an empty cache skips the key tiles
        whose keys provably have a weight below ``e^-t`` of their row's total for the prompt's
        later queries (as ``selattn_c.forward``; docs/kernel-design.md, "Dead keys"). The
        default keeps its outputs equal to the exact ones within float32 rounding; None is
        exact. The cache's state (F, the evictions) does not depend on it.

    Notes
    -----
    One step costs O(held tokens x H x D). ``step`` and ``prefill`` give the same outputs and leave
    the same state (bitwise for the state; the outputs agree to float32 rounding, since the
    prefill's blocked kernel sums in another order). A cache refuses to be used by two threads at
    once (``RuntimeError``: every method and property takes the cache's lock without waiting),
    and a call that raises leaves it exactly as it was. ``close()`` frees its memory; a closed
    cache raises ``ValueError`` on use. It is also a context manager that closes on exit.
    """

    def __init__(self, batch: int, heads: int, head_dim: int, budget: Optional[int] = None, *,
                 selector_head: int = 0, protect_bos: bool = True, selective: bool = True,
                 scale: Optional[float] = None, evict_threshold: Optional[float] = None,
                 dead_key_threshold: Optional[float] = DEFAULT_DEAD_KEY_THRESHOLD):
        require_extension("selattn_c.KVCache")
        self.B, self.H, self.D = check_cache_dims(batch, heads, head_dim)
        self.selector_head = check_selector_head(selector_head, self.H)
        self.protect_bos = check_flag(protect_bos, "protect_bos")
        self.selective = check_flag(selective, "selective")
        self.scale = check_scale_float32(resolve_scale(scale, self.D))
        self.budget = check_budget(budget, self.protect_bos)
        self.evict_threshold = check_threshold(evict_threshold)
        self.dead_key_threshold = check_dead_key_threshold(dead_key_threshold)   # 0.0: exact
        self._lock = threading.Lock()
        # A budget caps the capacity, which grows on demand like an unbudgeted cache's: a huge
        # budget (as forward treats budget >= N as no budget) costs nothing until it is used.
        if self.budget:
            check_cache_bytes(self.B, self.H, self.D, _round_up(self.budget))
        capacity = min(_INITIAL_CAPACITY, _round_up(self.budget or _INITIAL_CAPACITY))
        self._c, self._a = self._allocate(capacity)     # the C struct, and the arrays it uses

    # -- memory -----------------------------------------------------------------------------

    def _allocate(self, capacity: int, old: Optional[dict] = None, length: int = 0):
        """A fresh C struct and buffers of ``capacity`` slots; copy the slots of ``old`` (same
        indices) if given. The cache's own state is not touched: a caller swaps the new pair in
        only once the call that needed it has succeeded, so a failed call changes nothing."""
        B, H, D = self.B, self.H, self.D
        a = {
            "kt": np.zeros((B, H, capacity // TILE, D, TILE), np.float32),  # (B, H, cap/64, D, 64)
            "v": np.zeros((B, H, capacity, D), np.float32),                  # (B, H, cap, D)
            "pos": np.full((B, capacity), -1, np.int64),                     # (B, cap)
            "F": np.zeros((B, capacity), np.float32),                        # (B, cap)
            "counts": np.zeros((4, B), np.int64),    # size, evictions, newest, extent (B,) each
            "scratch": np.empty((B, H, capacity), np.float32),               # (B, H, cap)
            "sel": np.empty((B, capacity), np.float32),                      # (B, cap)
            "maxima": np.zeros(2, np.float32),          # largest |k|, |v| stored (overflow check)
        }
        if old is not None:
            n = old["pos"].shape[1]
            a["kt"][:, :, : n // TILE] = old["kt"]
            a["v"][:, :, :n] = old["v"]
            a["pos"][:, :n] = old["pos"]
            a["F"][:, :n] = old["F"]
            a["counts"][:] = old["counts"]
            a["maxima"][:] = old["maxima"]
        c = ffi.new("selattn_kv_cache *")
        c.B, c.H, c.D = B, H, D
        c.budget = self.budget or 0
        c.evict_threshold = float("inf") if self.evict_threshold is None else self.evict_threshold
        c.dead_key_threshold = self.dead_key_threshold
        c.selector_head = self.selector_head
        c.protect_bos, c.selective, c.scale = self.protect_bos, self.selective, self.scale
        c.length = length
        c.capacity = capacity
        c.kt = ffi.cast("float *", ffi.from_buffer(a["kt"]))
        c.v = ffi.cast("float *", ffi.from_buffer(a["v"]))
        c.pos = ffi.cast("int64_t *", ffi.from_buffer(a["pos"]))
        c.F = ffi.cast("float *", ffi.from_buffer(a["F"]))
        counts = ffi.cast("int64_t *", ffi.from_buffer(a["counts"]))
        c.size, c.evictions, c.newest, c.extent = (counts + i * self.B for i in range(4))
        c.scratch = ffi.cast("float *", ffi.from_buffer(a["scratch"]))
        c.sel = ffi.cast("float *", ffi.from_buffer(a["sel"]))
        c.maxima = ffi.cast("float *", ffi.from_buffer(a["maxima"]))
        return c, a      # `a` keeps the buffers alive while the struct points into them

    def _with_room(self, new_tokens: int):
        """The (struct, buffers) pair a call adding ``new_tokens`` should run on: the cache's own,
        or, when it is too small for the tokens it will hold (at most ``budget``), a copy with
        the capacity doubled as often as needed, capped at the budget rounded up to 64 (swapped
        in on success)."""
        c, a = self._c, self._a
        need = int(a["counts"][0].max()) + new_tokens
        if self.budget is not None:
            need = min(need, self.budget)
        capacity = int(c.capacity)
        if need <= capacity:
            return c, a
        while capacity < need:
            capacity *= 2
        if self.budget is not None:
            capacity = min(capacity, _round_up(self.budget))
        check_cache_bytes(self.B, self.H, self.D, capacity)
        return self._allocate(capacity, old=a, length=int(c.length))

    # -- state ------------------------------------------------------------------------------
    # Every reader takes the lock too: a read while another thread's step runs would see a
    # half-updated cache, so it is refused like a concurrent step.

    @property
    def capacity(self) -> int:
        """Slots per batch element (a multiple of 64): 64 at first, doubled when full, up to the
        budget rounded up to 64."""
        with self._exclusive():
            return int(self._c.capacity)

    @property
    def length(self) -> int:
        """Tokens seen since the last reset (the next token's position)."""
        with self._exclusive():
            return int(self._c.length)

    @property
    def size(self) -> np.ndarray:
        """(B,) int64: tokens each batch element holds."""
        with self._exclusive():
            return self._a["counts"][0].copy()

    @property
    def evictions(self) -> np.ndarray:
        """(B,) int64: tokens evicted so far (by the budget or the threshold)."""
        with self._exclusive():
            return self._a["counts"][1].copy()

    @property
    def positions(self) -> np.ndarray:
        """(B, capacity) int64: absolute position of the token in each slot, -1 for a free slot."""
        with self._exclusive():
            return self._a["pos"].copy()

    @property
    def F(self) -> np.ndarray:
        """(B, capacity) float32: running accumulated mask of each slot's token (0 when free)."""
        with self._exclusive():
            return self._a["F"].copy()

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the cache holds (keys, values, positions, F, step scratch);
        0 once closed."""
        if self._a is None:
            return 0
        with self._exclusive():
            return int(sum(x.nbytes for x in self._a.values()))

    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        return self._a is None

    def held(self, b: int) -> Tuple[np.ndarray, np.ndarray]:
        """(positions, F) of the tokens batch element ``b`` holds, oldest first."""
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
            raise TypeError(f"b must be an int, got {type(b).__name__}")
        if not 0 <= b < self.B:
            raise ValueError(f"b must be in [0, {self.B}), got {b}")
        with self._exclusive():
            pos = self._a["pos"][b]
            slots = np.flatnonzero(pos >= 0)
            order = np.argsort(pos[slots])
            return pos[slots[order]].copy(), self._a["F"][b, slots[order]].copy()

    def keys(self) -> np.ndarray:
        """(B, H, capacity, D) float32 copy of the stored keys, in slot order (for inspection)."""
        with self._exclusive():
            kt = self._a["kt"]                                # (B, H, cap/64, D, 64)
            capacity = kt.shape[2] * TILE
            return kt.transpose(0, 1, 2, 4, 3).reshape(self.B, self.H, capacity, self.D).copy()

    def values(self) -> np.ndarray:
        """(B, H, capacity, D) float32 copy of the stored values, in slot order."""
        with self._exclusive():
            return self._a["v"].copy()

    def reset(self) -> None:
        """Forget every token (the memory is kept)."""
        with self._exclusive():
            self._a["pos"].fill(-1)
            self._a["F"].fill(0.0)
            self._a["counts"].fill(0)
            self._a["maxima"].fill(0.0)
            self._c.length = 0

    def close(self) -> None:
        """Free the cache's memory. Closing twice is fine; any other use afterwards raises
        ValueError."""
        if self._a is None:
            return
        with self._exclusive():
            self._c, self._a = None, None

    def __enter__(self) -> "KVCache":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __copy__(self):
        raise TypeError("a KVCache cannot be copied: a copy would share its C buffers and state "
                        "with the original; make a new KVCache and prefill it instead")

    def __deepcopy__(self, memo):
        self.__copy__()

    def __reduce_ex__(self, protocol):
        raise TypeError("a KVCache cannot be pickled or copied (it holds C state); make a new "
                        "KVCache and prefill it instead")

    def __repr__(self) -> str:
        # Without the lock (a repr must not raise): the numbers may be mid-step, nothing changes.
        c, a = self._c, self._a
        state = "closed" if a is None else \
            f"length={int(c.length)}, size={a['counts'][0].tolist()}"
        return (f"KVCache(batch={self.B}, heads={self.H}, head_dim={self.D}, "
                f"budget={self.budget}, {state})")

    # -- decoding ---------------------------------------------------------------------------

    def _acquire(self) -> None:
        """Take the cache's lock without waiting (RuntimeError when another thread holds it);
        ValueError when the cache is closed. The caller releases ``self._lock``."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this KVCache is in use by another thread; a cache holds one "
                               "sequence per batch row and cannot be used concurrently")
        if self._a is None:
            self._lock.release()
            raise ValueError("this KVCache is closed")

    def _exclusive(self):
        """``_acquire`` as a context manager: ``with self._exclusive(): ...``."""
        self._acquire()
        return _Release(self._lock)

    @staticmethod
    def _inputs(q, k, v, shape: tuple):
        """float32 C-contiguous copies (or views) of q, k, v, all of ``shape``. Finiteness is
        checked in C (cheaper than NumPy for one token), see ``_check``."""
        out = []
        for name, x in (("q", q), ("k", k), ("v", v)):
            x = as_c_float32(as_float_array(x, name), name)   # beyond float32: inf, caught in C
            if x.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
            out.append(x)
        return out

    def step(self, q, k, v, *, check_finite: bool = True) -> np.ndarray:
        """Attend from one new token, then keep it (evicting as the budget requires).

        Parameters
        ----------
        q, k, v : (B, H, D) float arrays, the new token's query, key and value
        check_finite : bool, raise ValueError on NaN or infinity (False skips the check)

        Returns
        -------
        out : (B, H, D) float32
        """
        # This runs once per generated token and layer, so it is written for speed: arrays that
        # already are what C reads skip the conversions, and the lock is taken without a context
        # manager (measured: the Python part of a step went from about 10 to about 5 us).
        shape = (self.B, self.H, self.D)
        if not (_ready(q, shape) and _ready(k, shape) and _ready(v, shape)):
            q, k, v = self._inputs(q, k, v, shape)
        out = np.empty(shape, _FLOAT32)
        self._acquire()
        try:
            c, a = self._with_room(1)
            rc = _kv_step(c, _buffer("float[]", q), _buffer("float[]", k), _buffer("float[]", v),
                          _buffer("float[]", out), bool(check_finite), _threads_arg())
            if rc == _OK:
                self._c, self._a = c, a
        finally:
            self._lock.release()
        if rc != _OK:
            _check(rc, "step", q, k, v)
        return out

    def bind_step(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, *,
                  check_finite: bool = True) -> Callable[[], np.ndarray]:
        """A prepared ``step`` on arrays the caller owns: for decoding loops that write each new
        token's q, k and v in place (e.g. ``np.matmul(x, w_q, out=q)``).

        The arrays are checked once, here; every call of the returned function then runs one
        step on their current contents and writes the output into ``out`` (and returns it),
        with nothing left in Python but the lock and the C call. The same state and outputs as
        ``cache.step(q, k, v)`` (bitwise).

        Parameters
        ----------
        q, k, v : (B, H, D) float32 C-contiguous aligned ndarrays, read at every call
        out : (B, H, D) float32 C-contiguous aligned writable ndarray, sharing no memory with
            q, k or v, written at every call
        check_finite : bool, raise ValueError on NaN or infinity in q, k, v at a call (False
            skips the check)

        Returns
        -------
        step : callable with no arguments, returning ``out``. It raises like ``step`` (closed
            cache, concurrent use, non-finite input; the cache is then unchanged). The function
            keeps the arrays alive; it stays valid across ``reset()``. While it lives, the arrays
            (and the arrays whose memory they view) cannot be resized: ``ndarray.resize`` raises
            ValueError, even with ``refcheck=False`` (docs/reliability.md).

        Raises
        ------
        TypeError for a non-ndarray, ValueError for any other array ``step`` could not read in
        place (dtype, byte order, shape, layout), a read-only ``out``, an ``out`` sharing memory
        with an input, or a closed cache.
        """
        if self._a is None:
            raise ValueError("this KVCache is closed")
        shape = (self.B, self.H, self.D)
        for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
            if type(x) is not np.ndarray:
                raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
            if not _ready(x, shape):
                raise ValueError(f"{name} must be a native float32 C-contiguous aligned array of "
                                 f"shape {shape}, got {x.dtype} {x.shape} (contiguous: "
                                 f"{x.flags.c_contiguous}, aligned: {x.flags.aligned})")
        if not out.flags.writeable:
            raise ValueError("out must be writable")
        for name, x in (("q", q), ("k", k), ("v", v)):
            if np.may_share_memory(out, x):
                raise ValueError(f"out must not share memory with {name}")
        ptrs = tuple(_buffer("float[]", x) for x in (q, k, v, out))
        pins = _pin_memory((q, k, v, out))
        finite, lock = bool(check_finite), self._lock

        def step() -> np.ndarray:
            # _acquire inlined (lock, then the closed test): the method call alone costs 0.12 us,
            # a tenth of what this function adds to the C call. A busy lock goes to _acquire for
            # its RuntimeError.
            if not lock.acquire(False):
                self._acquire()
            try:
                if self._a is None:
                    raise ValueError("this KVCache is closed")
                c, a = self._with_room(1)
                rc = _kv_step(c, *ptrs, finite, _threads_arg())
                if rc == _OK:
                    self._c, self._a = c, a
            finally:
                lock.release()
            if rc != _OK:
                _check(rc, "step", q, k, v)
            return out

        step.pins = pins     # the arrays cannot be reallocated while this function lives
        return step

    def prefill(self, q, k, v, *, check_finite: bool = True) -> np.ndarray:
        """N tokens at once: the same outputs and final state as N calls of ``step``.

        On an empty cache this runs the eviction rule on the selector head (O(N x held x D)),
        then the blocked forward kernel with that eviction schedule. On a cache that already
        holds tokens it runs N steps in C.

        Parameters
        ----------
        q, k, v : (B, H, N, D) float arrays
        check_finite : bool, raise ValueError on NaN or infinity (False skips the check)

        Returns
        -------
        out : (B, H, N, D) float32
        """
        q = as_float_array(q, "q")
        if q.ndim != 4:
            raise ValueError(f"q must have 4 dimensions (B, H, N, D), got shape {q.shape}")
        N = q.shape[2]
        check_buffer_sizes((self.B, self.H, N, self.D), "KVCache.prefill")
        q, k, v = self._inputs(q, k, v, (self.B, self.H, N, self.D))
        out = np.empty((self.B, self.H, N, self.D), np.float32)
        with self._exclusive():
            c, a = self._with_room(N)
            rc = lib.selattn_kv_prefill(c, ffi.from_buffer("float[]", q),
                                        ffi.from_buffer("float[]", k),
                                        ffi.from_buffer("float[]", v), N,
                                        ffi.from_buffer("float[]", out), bool(check_finite),
                                        _threads_arg())
            if rc == lib.SELATTN_OK:
                self._c, self._a = c, a
        _check(rc, "prefill", q, k, v)
        return out


def _pin_memory(arrays) -> list:
    """Weak references to each array and to every ndarray its memory comes from (the chain of
    ``.base``), kept while the bound function lives: NumPy refuses ``ndarray.resize`` of an array
    that has a weak reference, even with ``refcheck=False``, so no bound pointer can be freed
    under the C step (a resize would otherwise leave it reading freed memory). A cffi buffer
    export alone does not stop the resize."""
    pins = []
    for x in arrays:
        while isinstance(x, np.ndarray):
            pins.append(weakref.ref(x))
            x = x.base
    return pins


class _Release:
    """Context manager that releases an already acquired lock."""

    def __init__(self, lock: threading.Lock):
        self._lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._lock.release()
        return False


def _check(rc: int, what: str, q, k, v) -> None:
    if rc == lib.SELATTN_OK:
        return
    if rc == lib.SELATTN_ENONFINITE:
        name = next(n for n, x in (("q", q), ("k", k), ("v", v)) if not np.isfinite(x).all())
        raise ValueError(f"{name} contains NaN or infinity (after conversion to float32); "
                         "pass check_finite=False to skip this check (cache unchanged)")
    if rc == lib.SELATTN_EOVERFLOW:
        raise ValueError(
            f"KVCache.{what}: q, k, v are too large for float32: with the keys and values held "
            f"and the accumulated mask, a logit scale * q.k, the mask or the output could "
            f"exceed 2^{lib.SELATTN_MAGNITUDE_LIMIT_LOG2} and overflow to inf or NaN "
            "(docs/reliability.md, Overflow); rescale the inputs or lower scale (cache unchanged)")
    if rc == lib.SELATTN_ENOMEM:
        raise MemoryError(f"KVCache.{what}: could not allocate scratch memory (cache unchanged)")
    if rc != lib.SELATTN_OK:
        raise RuntimeError(f"KVCache.{what}: the C kernel returned {rc}")  # EFULL: a bug here
