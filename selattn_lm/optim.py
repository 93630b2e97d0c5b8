"""AdamW (decoupled weight decay) and gradient clipping for dicts of NumPy parameters.

Parameters are updated in place, in their own dtype (float32 for training). Weight decay applies
to matrices only (every 2-D parameter: wte, wpe, the projections), never to the 1-D biases and
LayerNorm gains/shifts, which set scales and offsets rather than capacity.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np

Params = Dict[str, np.ndarray]


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_grads(params: Params, grads: Params) -> None:
    missing, extra = sorted(set(params) - set(grads)), sorted(set(grads) - set(params))
    if missing or extra:
        raise ValueError(f"grads do not match params: missing {missing}, extra {extra}")
    for name, p in params.items():
        if grads[name].shape != p.shape:
            raise ValueError(f"grads[{name!r}] has shape {grads[name].shape}, params "
                             f"{p.shape}")


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW:

        m = b1 m + (1 - b1) g          v = b2 v + (1 - b2) g^2
        p = p - lr * wd * p            (2-D parameters only)
        p = p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    Parameters
    ----------
    params : dict name -> array, the parameters it will update (for the moment buffers' shapes)
    lr : float > 0, default learning rate (``step`` can override it, e.g. for a schedule)
    betas : (b1, b2) in [0, 1)
    eps : float > 0, added to the root of the second moment
    weight_decay : float >= 0, decoupled decay of the 2-D parameters
    """

    def __init__(self, params: Params, lr: float, betas: Tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1):
        self.lr = _check_positive("lr", lr)
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = _check_positive("eps", eps)
        if not (math.isfinite(float(weight_decay)) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
        self.weight_decay = float(weight_decay)
        self.m = {name: np.zeros_like(p) for name, p in params.items()}   # first moments
        self.v = {name: np.zeros_like(p) for name, p in params.items()}   # second moments
        self.t = 0                                                         # steps taken

    def step(self, params: Params, grads: Params, lr: Optional[float] = None) -> None:
        """One update of every parameter, in place.

        Parameters
        ----------
        params : dict name -> array (the same names and shapes as at construction)
        grads : dict name -> array, gradients of the loss (not modified)
        lr : float or None, this step's learning rate (None: the constructor's)
        """
        lr = self.lr if lr is None else _check_positive("lr", lr)
        _check_grads(params, grads)
        _check_grads(self.m, grads)
        self.t += 1
        b1, b2 = self.betas
        correction1 = 1.0 - b1 ** self.t          # Python floats: float32 stays float32
        correction2 = 1.0 - b2 ** self.t
        for name, p in params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            if p.ndim >= 2 and self.weight_decay:
                p *= 1.0 - lr * self.weight_decay                           # decoupled decay
            p -= (lr / correction1) * m / (np.sqrt(v / correction2) + self.eps)

    def state_dict(self) -> dict:
        """The optimizer's state (step count and moments), e.g. to resume training."""
        return {"t": self.t, "m": {n: a.copy() for n, a in self.m.items()},
                "v": {n: a.copy() for n, a in self.v.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output (moments must match the parameters' names/shapes)."""
        _check_grads(self.m, state["m"])
        _check_grads(self.v, state["v"])
        self.t = int(state["t"])
        self.m = {n: np.array(a, dtype=self.m[n].dtype) for n, a in state["m"].items()}
        self.v = {n: np.array(a, dtype=self.v[n].dtype) for n, a in state["v"].items()}


def global_norm(grads: Params) -> float:
    """sqrt of the sum of squares of every gradient entry (accumulated in float64)."""
    total = 0.0
    for g in grads.values():
        g64 = g.astype(np.float64, copy=False).ravel()
        total += float(g64 @ g64)
    return math.sqrt(total)


def clip_grad_norm(grads: Params, max_norm: float) -> float:
    """Scale every gradient in place so that their global norm is at most ``max_norm``.

    Parameters
    ----------
    grads : dict name -> array, modified in place when the norm exceeds ``max_norm``
    max_norm : float > 0

    Returns
    -------
    total_norm : float, the global norm before clipping (useful to log)
    """
    max_norm = _check_positive("max_norm", max_norm)
    total_norm = global_norm(grads)
    if not math.isfinite(total_norm):
        raise ValueError(f"gradient norm is {total_norm}: the loss diverged")
    if total_norm > max_norm:
        scale = max_norm / total_norm                 # exact: the new norm is max_norm
        for g in grads.values():
            g *= scale
    return total_norm
