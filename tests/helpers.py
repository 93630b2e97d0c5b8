"""Shared test helpers: Hypothesis strategies for attention inputs, golden-vector loading, and
finite-difference gradient checking.

The reference tests and the C-kernel tests both import from here, so both are driven by the same
input distribution and read the golden files the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

import numpy as np
from hypothesis import strategies as st

from selattn_reference.attention import keys_past_the_cut

GOLDEN_DIR = Path(__file__).parent / "data" / "golden"

# Multipliers on standard-normal q, k, v. At 0.1 every logit is ~0 (soft, nearly uniform
# attention); at 1 logits are O(1); at 10 and 30 logits reach 1e2..1e3, so relu(selector logit)
# and F are huge and the masks are hard (softmax weights exactly 0 or 1 in float64).
INPUT_SCALES = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


# ----------------------------------------------------------------------------------------------
# Random inputs


def random_qkv(seed: int, shape, input_scale: float = 1.0, dtype=np.float64):
    """Standard-normal q, k, v times ``input_scale``.

    Parameters
    ----------
    seed : int, seed of ``np.random.default_rng``
    shape : (B, H, N, D)
    input_scale : float, multiplier on all three arrays
    dtype : NumPy float dtype of the result (the draw is always float64, then cast)

    Returns
    -------
    q, k, v : (B, H, N, D) arrays of ``dtype``
    """
    rng = np.random.default_rng(seed)
    return tuple((input_scale * rng.standard_normal(shape)).astype(dtype) for _ in range(3))


@dataclass(frozen=True)
class QKVCase:
    """One drawn input: arrays plus the layer options. ``repr`` is short so that Hypothesis'
    falsifying-example report stays readable (the arrays are reproducible from ``seed``)."""

    q: np.ndarray  # (B, H, N, D)
    k: np.ndarray  # (B, H, N, D)
    v: np.ndarray  # (B, H, N, D)
    selector_head: int
    protect_bos: bool
    selective: bool
    input_scale: float
    seed: int

    @property
    def shape(self):
        """(B, H, N, D)"""
        return self.q.shape

    def options(self) -> Dict[str, object]:
        """Keyword arguments for ``forward``: selector_head, protect_bos, selective."""
        return dict(selector_head=self.selector_head, protect_bos=self.protect_bos,
                    selective=self.selective)

    def __repr__(self) -> str:
        return (f"QKVCase(shape={self.shape}, dtype={self.q.dtype}, "
                f"selector_head={self.selector_head}, protect_bos={self.protect_bos}, "
                f"selective={self.selective}, input_scale={self.input_scale}, seed={self.seed})")

    def _repr_pretty_(self, printer, cycle) -> None:
        # Hypothesis prints dataclasses field by field (arrays in full) unless told otherwise.
        printer.text(repr(self))


def sizes(smallest: int, largest: int) -> st.SearchStrategy[int]:
    """Integers in [smallest, largest] that hit both ends often: N = 1 and D = 1 are the edge
    cases that break kernels (empty strictly-lower triangle, length-1 dot products)."""
    return st.one_of(st.sampled_from(sorted({smallest, largest})),
                     st.integers(smallest, largest))


@st.composite
def qkv_cases(draw, max_B: int = 3, max_H: int = 4, max_N: int = 96, max_D: int = 48,
              dtype=np.float64, input_scales=INPUT_SCALES, min_H: int = 1, min_N: int = 1,
              selective: Optional[bool] = None, protect_bos: Optional[bool] = None) -> QKVCase:
    """Strategy for ``QKVCase``: shapes from (1, min_H, min_N, 1) to (max_B, max_H, max_N, max_D),
    any selector head, BOS protection on/off, selective on/off (unless fixed by the arguments),
    and an input scale from ``input_scales`` (large ones give large logits, i.e. hard masks)."""
    B, H = draw(sizes(1, max_B)), draw(sizes(min_H, max_H))
    N, D = draw(sizes(min_N, max_N)), draw(sizes(1, max_D))
    input_scale = draw(st.sampled_from(input_scales))
    seed = draw(st.integers(0, 2**32 - 1))
    q, k, v = random_qkv(seed, (B, H, N, D), input_scale, dtype)
    return QKVCase(
        q=q, k=k, v=v,
        selector_head=draw(st.integers(0, H - 1)),
        protect_bos=draw(st.booleans()) if protect_bos is None else protect_bos,
        selective=draw(st.booleans()) if selective is None else selective,
        input_scale=input_scale,
        seed=seed,
    )


def budgets(N: int, protect_bos: bool) -> st.SearchStrategy[int]:
    """A KV budget from the smallest legal one (2 with BOS protection, 1 without) to N + 2."""
    smallest = 2 if protect_bos else 1
    return st.integers(smallest, max(smallest, N + 2))


# ----------------------------------------------------------------------------------------------
# Golden vectors


class GoldenCase(NamedTuple):
    """One golden file: ``name`` (file stem), ``meta`` (dict: B, H, N, D, selector_head,
    protect_bos, scale, tau, budgets) and ``arrays`` (every other array in the file, by name)."""

    name: str
    meta: dict
    arrays: Dict[str, np.ndarray]


def load_golden(directory: Path = GOLDEN_DIR) -> List[GoldenCase]:
    """All golden files in ``directory``, sorted by name (see tests/data/golden/README.md)."""
    cases = []
    for path in sorted(directory.glob("*.npz")):
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {name: z[name] for name in z.files if name != "meta"}
        cases.append(GoldenCase(path.stem, meta, arrays))
    if not cases:
        raise FileNotFoundError(f"no golden .npz files in {directory}")
    return cases


# ----------------------------------------------------------------------------------------------
# Gradient checking


def rel_error(analytic: np.ndarray, numeric: np.ndarray, floor: float = 1e-8) -> float:
    """CS231n relative error ``max_i |a_i - n_i| / max(floor, |a_i| + |n_i|)``.

    The floor keeps components that are (numerically) zero from dividing by zero; the
    finite-difference tests set it from the rounding noise of the difference quotient.
    """
    size = np.abs(analytic) + np.abs(numeric)
    floor = max(float(floor), np.finfo(np.float64).tiny)
    return float((np.abs(analytic - numeric) / np.maximum(floor, size)).max(initial=0.0))


def assert_float32_grads_close(grads32: Dict[str, np.ndarray], grads: Dict[str, np.ndarray],
                               rtol: float) -> None:
    """Every float32 gradient tensor in ``grads32`` agrees with its float64 twin in ``grads`` by
    the norm of the difference (<= 10 rtol the tensor's norm). Norms, not entries: a selector
    logit within float32 rounding of 0 may flip its relu gate and change one entry a lot."""
    for name in grads:
        assert grads32[name].dtype == np.float32, name
        diff = np.linalg.norm(grads32[name] - grads[name])
        assert diff <= 10 * rtol * (np.linalg.norm(grads[name]) + 1e-6), name


def numerical_gradient(f: Callable[[], np.ndarray], x: np.ndarray, h: float) -> np.ndarray:
    """Centred differences ``(f(x + h e_i) - f(x - h e_i)) / 2h``, summed, for every entry of x.

    ``f`` takes no arguments and reads ``x`` (which is perturbed in place and restored). It returns
    the *terms* of the scalar loss, not their sum: subtracting term by term before summing cancels
    the terms an entry does not affect exactly, which keeps the rounding error of the difference
    proportional to the affected terms only.
    """
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        old = x[index]
        x[index] = old + h
        plus = f()
        x[index] = old - h
        minus = f()
        x[index] = old
        grad[index] = np.sum(plus - minus) / (2.0 * h)
    return grad


def soft_signature(cache) -> bytes:
    """The rank penalty's discrete choices (§ 10 of docs/selective-attention.md) in a reference
    attention ``Cache``: each row's cut and which keys are past it. A finite-difference step that
    changes them crosses a kink, so the gradient checks skip it."""
    if cache.soft_cut is None:
        return b""
    past, _ = keys_past_the_cut(cache.F, cache.soft_cut)                         # (B, N, N)
    return cache.soft_cut.tobytes() + past.tobytes()


# ----------------------------------------------------------------------------------------------
# Exactly representable inputs, for comparing eviction decisions across precisions

# With q, k in multiples of 1/4 in [-2, 2], D <= 32 and the scale 1/8 (a power of two), every logit
# scale * q.k is a multiple of 1/128 below 2^4 in magnitude, and every F (a sum of at most N such
# relus) a multiple of 1/128 below 2^11: all exactly representable in float32, in any summation
# order. So the C kernel (float32) and the reference (float64) compute the same F bit for bit and
# make the same eviction decisions, ties included, and their outputs can be compared within
# float32 rounding even when the buffer rule is a discontinuous function of the inputs.
EXACT_SCALE = 0.125


def exact_qkv(seed: int, shape, dtype=np.float64):
    """q, k: multiples of 1/4 in [-2, 2] (small integers hit ties and zero logits often);
    v: standard normal rounded to float32. See EXACT_SCALE."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-8, 9, shape) / 4.0
    k = rng.integers(-8, 9, shape) / 4.0
    v = rng.standard_normal(shape).astype(np.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


@dataclass(frozen=True)
class CacheCase:
    """One drawn KV-cache configuration and prompt (exactly representable, see exact_qkv)."""

    q: np.ndarray  # (B, H, N, D) float64
    k: np.ndarray  # (B, H, N, D)
    v: np.ndarray  # (B, H, N, D)
    budget: Optional[int]
    evict_threshold: Optional[float]
    selector_head: int
    protect_bos: bool
    selective: bool
    seed: int

    def options(self) -> Dict[str, object]:
        """Keyword arguments of KVCache after (batch, heads, head_dim)."""
        return dict(budget=self.budget, evict_threshold=self.evict_threshold,
                    selector_head=self.selector_head, protect_bos=self.protect_bos,
                    selective=self.selective, scale=EXACT_SCALE)

    def __repr__(self) -> str:
        return (f"CacheCase(shape={self.q.shape}, budget={self.budget}, "
                f"evict_threshold={self.evict_threshold}, selector_head={self.selector_head}, "
                f"protect_bos={self.protect_bos}, selective={self.selective}, seed={self.seed})")

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


@st.composite
def cache_cases(draw, max_B: int = 2, max_H: int = 3, max_N: int = 90, max_D: int = 16,
                thresholds: bool = True) -> CacheCase:
    """Strategy for ``CacheCase``: any budget from the smallest legal one to beyond N (or None),
    an optional threshold (multiples of 1/8, exactly representable), every option."""
    B, H = draw(sizes(1, max_B)), draw(sizes(1, max_H))
    N, D = draw(sizes(1, max_N)), draw(sizes(1, max_D))
    protect_bos = draw(st.booleans())
    budget = draw(st.one_of(st.none(), budgets(N, protect_bos)))
    threshold = draw(st.none() | st.integers(0, 40).map(lambda t: t / 8.0)) if thresholds else None
    seed = draw(st.integers(0, 2**32 - 1))
    q, k, v = exact_qkv(seed, (B, H, N, D))
    return CacheCase(q=q, k=k, v=v, budget=budget, evict_threshold=threshold,
                     selector_head=draw(st.integers(0, H - 1)), protect_bos=protect_bos,
                     selective=draw(st.booleans()), seed=seed)

