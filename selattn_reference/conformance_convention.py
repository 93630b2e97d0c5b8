"""How the kit calls a candidate: its calling convention and the names of its options.

The default convention is the issue's: ``fn(q, k, v) -> out`` with selector head 0, BOS
protected and scale ``1/sqrt(D)``. A candidate that takes any of the three options gives their
argument names (``selector_head="sel"``, ...); the kit then passes the case's values by keyword.

A case with another selector head or scale can still be run on a candidate without that option,
exactly: head ``s`` is swapped with head 0 before the call and back after it (the heads are
otherwise independent), and ``q`` is multiplied by ``scale * sqrt(D)`` (the layer depends on the
logits ``scale * q . k`` only). A case with BOS unprotected cannot, and is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from .conformance_cases import Case


@dataclass(frozen=True)
class Convention:
    """The names under which a candidate takes the three options (None: it does not)."""

    selector_head: Optional[str] = None
    protect_bos: Optional[str] = None
    scale: Optional[str] = None

    def __post_init__(self) -> None:
        for option in ("selector_head", "protect_bos", "scale"):
            name = getattr(self, option)
            if name is not None and (not isinstance(name, str) or not name.isidentifier()):
                raise ValueError(f"the argument name for {option} must be a Python identifier, "
                                 f"got {name!r}")

    @property
    def takes_options(self) -> bool:
        return any(n is not None for n in (self.selector_head, self.protect_bos, self.scale))

    def describe(self) -> str:
        parts = [f"{option} as {name}=" for option, name in (
            ("selector head", self.selector_head), ("BOS protection", self.protect_bos),
            ("scale", self.scale)) if name is not None]
        return ", ".join(parts) if parts else "none taken (head 0, BOS protected, 1/sqrt(D))"

    def kwargs(self, selector_head: int, protect_bos: bool, scale: float) -> Dict[str, object]:
        """The keyword arguments that pass these option values."""
        out: Dict[str, object] = {}
        if self.selector_head is not None:
            out[self.selector_head] = int(selector_head)
        if self.protect_bos is not None:
            out[self.protect_bos] = bool(protect_bos)
        if self.scale is not None:
            out[self.scale] = float(scale)
        return out

    def can_run(self, case: Case) -> bool:
        """False only for a case with BOS unprotected on a candidate without that option."""
        return case.protect_bos or self.protect_bos is not None

    def prepare(self, case: Case) -> "Prepared":
        """The arguments of one call on ``case`` (fresh copies: a candidate may write to them)."""
        if not self.can_run(case):
            raise ValueError(f"case {case.name} needs BOS protection off, which the candidate "
                             "does not take")
        q, k, v = case.q, case.k, case.v
        head, scale = case.selector_head, case.scale
        D = q.shape[-1]
        q_factor = 1.0
        if self.scale is None and scale != 1.0 / math.sqrt(D):
            q_factor = scale * math.sqrt(D)
            q = q * q_factor
            scale = 1.0 / math.sqrt(D)
        order = np.arange(q.shape[1])
        if self.selector_head is None and head != 0:
            order[[0, head]] = order[[head, 0]]
            head = 0
        q, k, v = (np.array(x[:, order], dtype=np.float64) for x in (q, k, v))
        return Prepared((q, k, v), self.kwargs(head, case.protect_bos, scale), order, q_factor)


@dataclass(frozen=True)
class Prepared:
    """One call's arguments: ``fn(*args, **kwargs)``; ``order`` is the head permutation (its own
    inverse) and ``q_factor`` what q was multiplied by (so dq of the case is q_factor * dq)."""

    args: Tuple[np.ndarray, np.ndarray, np.ndarray]
    kwargs: Dict[str, object]
    order: np.ndarray
    q_factor: float

    def undo(self, x: np.ndarray) -> np.ndarray:
        """A (B, H, ...) result of the call in the case's head order."""
        return x[:, self.order]
