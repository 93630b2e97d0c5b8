"""An implementation of selective attention with a mistake that public implementations make,
for docs/conformance.md: ``python -m selattn_reference check
examples/conformance_mine.py:attention`` finds it and names it."""

import numpy as np


def attention(q, k, v):
    """q, k, v: (B, H, N, D) -> out (B, H, N, D). Selector head 0, BOS protected."""
    N, D = q.shape[-2], q.shape[-1]
    logits = q @ k.swapaxes(-1, -2) / np.sqrt(D)             # (B, H, N, N)
    future = np.triu(np.ones((N, N), dtype=bool), k=1)
    logits = np.where(future, -np.inf, logits)
    S = np.maximum(logits[:, 0], 0.0)                       # relu of the selector head
    S[..., 0] = 0.0                                         # BOS is never masked
    S = np.roll(S, 1, axis=-2)                              # a decision acts on later queries
    S[..., 0, :] = 0.0
    F = np.cumsum(S, axis=-2)                               # masks add up down each column
    logits = logits - F[:, None]
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (weights / weights.sum(axis=-1, keepdims=True)) @ v
