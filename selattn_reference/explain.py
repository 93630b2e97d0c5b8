"""A 5-token worked example of selective attention, printed step by step.

Every matrix is computed by the spec (``selattn_reference.attention``); nothing is hard-coded
except the inputs. ``docs/selective-attention.md`` quotes this output, and a test checks that
the quoted numbers are what the spec computes.
"""

from __future__ import annotations

import sys
from typing import List, TextIO, Tuple

import numpy as np

from .attention import (
    accumulated_mask_from_logits,
    eviction_mask,
    forward,
    memory_loss,
    selection_constraints,
)

# Head-0 scaled logits L[i, j] of query i on key j (token 0 is BOS). Entries above the diagonal
# are never used (causal). Read row i as "token i's selector evidence that key j is done with".
HEAD0_LOGITS = np.array([
    [0.0, 0.0, 0.0, 0.0, 0.0],
    [2.0, 1.0, 0.0, 0.0, 0.0],
    [1.0, 3.0, 2.0, 0.0, 0.0],
    [-1.0, -2.0, 1.0, 2.0, 0.0],
    [3.0, 0.0, -1.0, 2.0, 1.0],
])
# Head 1 has all logits 0: without selection it attends uniformly, so its weights show the
# effect of F alone.
HEAD1_LOGITS = np.zeros_like(HEAD0_LOGITS)
BUDGET = 3
TAU = 1.0


def example_inputs() -> Tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """q, k, v (1, 2, 5, 5) and scale such that the scaled logits are HEAD0/HEAD1_LOGITS.

    With k = identity (D = N = 5), q[i] . k[j] = q[i, j], so q *is* the logit matrix; the scale
    is passed explicitly as 1 (the default 1/sqrt(D) would rescale the numbers). v = identity
    makes out[i] equal to the attention row of query i.
    """
    q = np.stack([HEAD0_LOGITS, HEAD1_LOGITS])[None]                 # (B, H, N, D) = (1, 2, 5, 5)
    k = np.broadcast_to(np.eye(5), q.shape).copy()                   # (1, 2, 5, 5)
    v = k.copy()                                                     # (1, 2, 5, 5)
    return q, k, v, 1.0


def worked_example() -> List[Tuple[str, str, np.ndarray]]:
    """The steps of the example as (name, title, (5, 5) matrix), in order."""
    q, k, v, scale = example_inputs()
    N = q.shape[2]
    _, cache = forward(q, k, v, scale=scale)
    _, plain = forward(q, k, v, scale=scale, selective=False)
    L = cache.L[0, 0]                                                # (N, N) head 0, -inf j > i
    S_relu = np.maximum(L, 0.0)                                      # § 2
    S_bos = S_relu.copy()
    S_bos[:, 0] = 0.0                                                # § 3 BOS
    S = np.where(selection_constraints(N, protect_bos=True), S_relu, 0.0)  # § 3 BOS and self
    S_shifted = np.zeros_like(S)
    S_shifted[1:] = S[:-1]                                           # § 4 row i <- S[i - 1]
    F = accumulated_mask_from_logits(cache.L[:, 0], protect_bos=True)[0]   # § 4 (N, N)
    visible = eviction_mask(F[None], BUDGET, protect_bos=True)[0]    # § 6 (N, N)
    return [
        ("L", "L: head-0 scaled logits with the causal mask (section 1)", L),
        ("S_relu", "S = relu(L): only positive evidence masks (section 2)", S_relu),
        ("S_bos", "S with the BOS column zeroed: BOS is never masked (section 3)", S_bos),
        ("S", "S with the diagonal zeroed: no token masks itself (section 3)", S),
        ("S_shifted", "S shifted down one row: token i's decision reaches queries > i (section 4)",
         S_shifted),
        ("F", "F = cumulative sum of the shifted S down each column (section 4)", F),
        ("P0_plain", "head 0 attention weights, standard attention (selective=False)",
         plain.P[0, 0]),
        ("P0_selective", "head 0 attention weights, softmax(L - F) (section 5)", cache.P[0, 0]),
        ("P1_plain", "head 1 attention weights (all logits 0), standard attention",
         plain.P[0, 1]),
        ("P1_selective", "head 1 attention weights, softmax(0 - F) (section 5)", cache.P[0, 1]),
        ("visible_3", f"keys held by a {BUDGET}-slot buffer when query i attends: 1 held, "
         "0 evicted (section 6)", visible.astype(float)),
    ]


def format_matrix(name: str, matrix: np.ndarray) -> str:
    """Fixed-width rows ``i=0 ...``; above the diagonal '-inf' for logits, '.' otherwise."""
    N = matrix.shape[-1]
    weights = name.startswith("P")
    lines = ["     " + "".join(f"{f'j={j}':>7}" for j in range(N))]
    for i in range(N):
        cells = []
        for j in range(N):
            if j > i:
                cells.append("-inf" if name == "L" else ".")
            elif weights:
                cells.append(f"{matrix[i, j]:.3f}")
            else:
                cells.append(f"{matrix[i, j]:g}")
        lines.append(f"i={i:<3}" + "".join(f"{cell:>7}" for cell in cells))
    return "\n".join(lines)


def print_worked_example(file: TextIO = sys.stdout) -> None:
    """Print the example: inputs, every step, and what a budget of 3 keeps."""
    steps = worked_example()
    F = {name: matrix for name, _, matrix in steps}["F"]
    print("Selective attention on 5 tokens (token 0 is BOS), 2 heads, selector head 0, BOS "
          "protected.\nq holds the logits and k = identity, with scale = 1 passed explicitly, so "
          "L = q k^T.\n", file=file)
    for name, title, matrix in steps:
        print(f"{title}\n{format_matrix(name, matrix)}\n", file=file)
    mem = memory_loss(F[None], TAU)[0]
    print(f"memory_loss(F, tau={TAU:g}) = {mem:g}: the most keys any query keeps with F < tau "
          "(softly counted).", file=file)
