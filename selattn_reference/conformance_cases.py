"""The inputs of the conformance kit: golden vectors, random cases (ties and large logits
included), the invariant probes and the decoding cases. All deterministic (fixed seeds), so a
report is reproducible.

The golden vectors ship inside the package (``selattn_reference/data/golden``, a copy of the
project's ``tests/data/golden``): they come from an independent PyTorch float64 implementation of
the paper's listing (see the README there).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .attention import eviction_mask, forward
from .conformance_tolerances import DECISION_MARGIN, FLOAT32_EPS, GRADIENT_KINK_FACTOR

GOLDEN_DIR = Path(__file__).parent / "data" / "golden"
GOLDEN_MAX_BYTES = 1 << 20       # the files are read with a size limit and without pickle


@dataclass
class Case:
    """One input of the layer, with its options and (for golden cases) the expected results.

    q, k, v : (B, H, N, D) float64; expected : name -> array from a golden file (``out``,
    ``dout``, ``dq``, ``dk``, ``dv``), empty for the other cases (the reference is then run).
    """

    name: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    selector_head: int = 0
    protect_bos: bool = True
    scale: Optional[float] = None
    expected: Dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scale is None:
            self.scale = 1.0 / math.sqrt(self.q.shape[-1])

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return tuple(self.q.shape)

    @property
    def default_options(self) -> bool:
        """True when the case uses the kit's default convention (head 0, BOS protected,
        scale 1/sqrt(D))."""
        return (self.selector_head == 0 and self.protect_bos
                and self.scale == 1.0 / math.sqrt(self.q.shape[-1]))

    def reference(self, budget: Optional[int] = None):
        """``(out, cache)`` of the reference forward on this case."""
        return forward(self.q, self.k, self.v, selector_head=self.selector_head,
                       protect_bos=self.protect_bos, scale=self.scale, budget=budget)

    def selector_logits(self) -> np.ndarray:
        """(B, N, N) the selector head's scaled logits (all of them, not only the causal part)."""
        s = self.selector_head
        return self.scale * (self.q[:, s] @ self.k[:, s].swapaxes(-1, -2))

    def logit_max(self) -> float:
        """max |L| over the causal logits of every head."""
        L = self.scale * (self.q @ self.k.swapaxes(-1, -2))
        return float(np.abs(np.where(np.tri(self.q.shape[2], dtype=bool), L, 0.0)).max())

    def near_relu_kink(self) -> bool:
        """True when a causal selector logit is so close to 0 that float32 may flip its sign."""
        L = self.selector_logits()
        N = L.shape[-1]
        below = np.tri(N, k=-1, dtype=bool)
        size = self.scale * np.abs(self.q[:, self.selector_head]) @ np.abs(
            self.k[:, self.selector_head]).swapaxes(-1, -2)
        margin = GRADIENT_KINK_FACTOR * self.q.shape[-1] * FLOAT32_EPS * size
        return bool((below & (np.abs(L) < margin) & (L != 0)).any())


def load_golden() -> List[Case]:
    """The golden cases shipped with the package, one per file, sorted by name."""
    cases = []
    for path in sorted(GOLDEN_DIR.glob("*.npz")):
        if path.stat().st_size > GOLDEN_MAX_BYTES:
            raise ValueError(f"golden file {path.name} is larger than {GOLDEN_MAX_BYTES} bytes")
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {name: np.array(z[name], dtype=np.float64)
                      for name in ("q", "k", "v", "out", "dout", "dq", "dk", "dv")}
        cases.append(Case(path.stem, arrays.pop("q"), arrays.pop("k"), arrays.pop("v"),
                          selector_head=int(meta["selector_head"]),
                          protect_bos=bool(meta["protect_bos"]), scale=float(meta["scale"]),
                          expected=arrays))
    return cases


def _normal(rng, shape, scale: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(scale * rng.standard_normal(shape) for _ in range(3))


# (B, H, N, D) of the random cases, cycled through; N up to 40, D from 1 to 16, H = 1 included.
RANDOM_SHAPES = ((1, 2, 8, 4), (2, 3, 13, 8), (1, 4, 24, 16), (2, 2, 40, 8), (1, 3, 17, 5))
# Multipliers on standard-normal q, k, v: 0.1 gives near-uniform attention, 10 logits of order
# 100 and F of order 1e3 (hard masks, weights of exactly 0 and 1 in float64).
RANDOM_INPUT_SCALES = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0)


def random_cases(seed: int = 0) -> List[Case]:
    """Random forward cases: every input scale on two shapes, the edge shapes, ties, other options.

    The ties: a selector whose logits are all exactly 0 (F = 0: standard attention, relu at its
    kink), keys repeated along the sequence (equal logits in every row), and small integers (exact
    ties in F). Cases with another selector head or scale are run on a candidate without those
    options by permuting heads and rescaling q (``conformance_convention``).
    """
    rng = np.random.default_rng(seed)
    cases = []
    for i, input_scale in enumerate(RANDOM_INPUT_SCALES):
        for j in range(2):
            shape = RANDOM_SHAPES[(2 * i + j) % len(RANDOM_SHAPES)]
            cases.append(Case(f"random-x{input_scale:g}-{j}", *_normal(rng, shape, input_scale)))
    for shape in ((1, 1, 1, 1), (1, 1, 9, 3), (3, 2, 1, 4), (2, 2, 6, 1)):
        cases.append(Case("edge-B{}-H{}-N{}-D{}".format(*shape), *_normal(rng, shape, 1.0)))
    q, k, v = _normal(rng, (2, 3, 12, 8), 1.0)
    q[:, 0] = 0.0
    cases.append(Case("ties-zero-selector", q, k, v))
    q, k, v = _normal(rng, (1, 2, 12, 8), 1.0)
    k[:, :, 1:] = k[:, :, 1:2]
    cases.append(Case("ties-repeated-keys", q, k, v))
    q, k, v = (rng.integers(-2, 3, size=(2, 2, 16, 4)).astype(np.float64) for _ in range(3))
    cases.append(Case("ties-integers", q, k, v))
    cases.append(Case("selector-head-2", *_normal(rng, (1, 4, 12, 8), 1.0), selector_head=2))
    cases.append(Case("scale-0.7", *_normal(rng, (2, 2, 12, 8), 1.0), scale=0.7))
    return cases


def option_cases(seed: int = 1) -> List[Case]:
    """Cases for a candidate that takes the options: another head, BOS unprotected, a scale."""
    rng = np.random.default_rng(seed)
    return [
        Case("option-selector-head-1", *_normal(rng, (2, 3, 12, 8), 1.0), selector_head=1),
        Case("option-bos-unprotected", *_normal(rng, (2, 2, 14, 8), 1.0), protect_bos=False),
        Case("option-scale-0.25", *_normal(rng, (1, 2, 12, 8), 1.5), scale=0.25),
        Case("option-all-three", *_normal(rng, (1, 3, 12, 4), 1.0), selector_head=2,
             protect_bos=False, scale=0.9),
    ]


def causality_case(seed: int = 2) -> Case:
    """A random case for the causality check (N = 16)."""
    return Case("causality", *_normal(np.random.default_rng(seed), (1, 3, 16, 8), 1.0))


def probe_case(seed: int = 3, N: int = 10) -> Case:
    """The invariant probe: one-hot values (``out`` is the attention weights), a selector whose
    logits are mostly positive and of order 1 (so a wrong mask on BOS, self or the previous token
    is several nats) and a second head with ordinary logits. D = N."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(N)
    q = 0.3 * rng.standard_normal((1, 2, N, N))
    k = rng.standard_normal((1, 2, N, N))
    k[0, 0] = base + 0.5 * rng.standard_normal((N, N))
    q[0, 0] = 0.35 * base + 0.2 * rng.standard_normal((N, N))
    v = np.broadcast_to(np.eye(N), (1, 2, N, N)).copy()
    return Case("probe", q, k, v)


# The budgets of the decoding check for N tokens: the smallest (BOS and the current token), small
# and middle ones, and two that never evict (budget >= N).
def decode_budgets(N: int) -> Tuple[int, ...]:
    return (2, 3, 5, N // 2 + 1, N, N + 3)


def decode_cases(seed: int = 4) -> List[Case]:
    """Decoding cases (N = 14): random at three input scales, and two with exact ties (a
    selector whose logits are all 0, so F = 0 and the cache is a sliding window that keeps BOS;
    small integers, for exact ties in F)."""
    rng = np.random.default_rng(seed)
    shape = (2, 2, 14, 4)
    cases = [Case(f"decode-x{s:g}", *_normal(rng, shape, s)) for s in (0.5, 1.0, 3.0)]
    q, k, v = _normal(rng, shape, 1.0)
    q[:, 0] = 0.0
    cases.append(Case("decode-ties-zero-selector", q, k, v))
    q, k, v = (rng.integers(-2, 3, size=shape).astype(np.float64) for _ in range(3))
    cases.append(Case("decode-ties-integers", q, k, v))
    return cases


def clear_decisions(case: Case, budget: int) -> bool:
    """True when every eviction of the reference is decided by a clear margin or an exact tie.

    A float32 cache may flip a decision between two F values closer than DECISION_MARGIN (relative
    to 1 + max F), or between 0 and a tiny F from a selector logit near relu's kink; random cases
    with such a decision are not used at that budget."""
    if case.near_relu_kink():
        return False
    _, cache = case.reference()
    F = cache.F
    B, N, _ = F.shape
    margin = DECISION_MARGIN * (1.0 + float(F.max()))
    visible = eviction_mask(F, budget, protect_bos=case.protect_bos)
    for b in range(B):
        for i in range(1, N):
            held = visible[b, i - 1].copy()
            held[i] = True
            if held.sum() <= budget:
                continue
            evictable = held.copy()
            evictable[i] = False
            if case.protect_bos:
                evictable[0] = False
            values = np.sort(F[b, i, evictable])[::-1]
            if len(values) > 1 and 0.0 < values[0] - values[1] < margin:
                return False
    return True
