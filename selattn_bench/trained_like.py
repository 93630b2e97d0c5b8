"""Synthetic "trained-like" inputs for selective attention: a selector head that kills each key
after a random lifetime, as trained selector heads do, so F grows large far from the diagonal.

Key j is "read" for ``lifetime[j]`` tokens, then the selector head's logit on it grows linearly:
``L_s[m, j] = rate * (m - death[j])`` with ``death[j] = j + ceil(lifetime[j]) + 1/2`` (half a
token from any query, so no selector logit is near the relu's kink), built from two
coordinates, ``q_s[m] = c (1, m / N)`` and ``k_s[j] = c (-death[j] / N, 1)`` (``rate = scale
c^2 / N``), so ``F[i, j]`` grows quadratically after the death: ``rate (i - death[j])^2 / 2``. A
fraction ``immortal`` of the keys never dies (``k_s[j] = c (-1, 0)``: a logit <= 0). The other
coordinates of the selector head are Gaussian times ``noise``, the other heads standard Gaussian. Used by the tests of the
dead-key skipping and by ``selattn_bench.dead_keys``.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np


def trained_like(rng: np.random.Generator, B: int, H: int, N: int, D: int, *,
                 mean_lifetime: float = 32.0, immortal: float = 0.0, rate: float = 0.5,
                 noise: float = 0.3, selector_head: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v (B, H, N, D) float32 with a selector head that kills keys after a lifetime.

    Parameters
    ----------
    rng : numpy Generator
    B, H, N, D : int, shapes (D >= 3)
    mean_lifetime : float > 0, the mean of the exponential lifetimes (tokens)
    immortal : float in [0, 1], the fraction of keys that never die
    rate : float > 0, the growth of a dead key's selector logit per token
    noise : float >= 0, the size of the selector head's other coordinates
    selector_head : int, the head that selects (its logits with the default scale 1/sqrt(D))

    Returns
    -------
    q, k, v : (B, H, N, D) float32
    """
    if D < 3:
        raise ValueError(f"D must be >= 3 (two coordinates code the lifetimes), got {D}")
    q = rng.standard_normal((B, H, N, D))
    k = rng.standard_normal((B, H, N, D))
    v = rng.standard_normal((B, H, N, D))
    scale = 1.0 / np.sqrt(D)
    c = np.sqrt(rate * N / scale)
    pos = np.arange(N) / N
    lifetime = np.ceil(rng.exponential(mean_lifetime, (B, N))) + 0.5
    death = (np.arange(N)[None, :] + lifetime) / N                                   # (B, N)
    dies = rng.random((B, N)) >= immortal
    s = selector_head
    q[:, s, :, 2:] *= noise
    k[:, s, :, 2:] *= noise
    q[:, s, :, 0] = c
    q[:, s, :, 1] = c * pos[None, :]
    k[:, s, :, 0] = np.where(dies, -c * death, -c)
    k[:, s, :, 1] = np.where(dies, c, 0.0)
    return (q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
