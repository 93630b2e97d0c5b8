"""Finite inputs must never give NaN silently: bounds on every intermediate value of the kernels.

The kernels compute in float32 (largest finite value about 3.4e38 = 2^128). Finite inputs can
still overflow inside them: q = k = 1e20 makes the dot product q.k = 1e40 (inf), and the softmax
then computes inf - inf = NaN; ``scale=1e38`` does the same to ordinary inputs. The float64
reference stays finite on such inputs, so the C functions refuse them instead, with a
``ValueError`` that says which inputs are too large (when ``check_finite=True``, the default;
``check_finite=False`` skips the scan that finds the magnitudes).

The bounds, from the largest magnitudes (one read of each input, ``selattn_max_abs``, the same
read that finds NaN and infinity) with D the head size, N the sequence length and H the heads:

- dot products |q.k| <= D max|q| max|k|; logits |scale q.k| <= scale D max|q| max|k| = L;
- the accumulated mask F <= N L (a sum of at most N positive logits), the rank penalty's
  F_soft <= (1 + soft_strength) F; inside the softmax |L - F - max| <= 2 (L + F);
- the unnormalised output sums at most N values: N max|v|;
- the backward: dP = dout.v and delta = dout.out are <= D max|dout| max|v| = P, so dS <= 2P;
  the gradient on F is <= (1 + soft_strength)(2 H P + R max|dF_rows|) = G, summed over at most N
  rows; dq, dk <= max(1, scale) N max(|q|, |k|) (2P + N G); dv <= N max|dout|.

Each must stay at or below 2^120 (``SELATTN_MAGNITUDE_LIMIT_LOG2``), 2^8 below float32's range,
which leaves room for rounding. Real attention inputs are far below it (logits of a trained model
are in the tens); what is refused is at least 2^100 times larger than that. The KV cache checks
the same bounds in C (``csrc/kv_cache.c``, with the keys, values and mask it already holds).
"""

from __future__ import annotations

from typing import Sequence

from ._extension import lib

LIMIT_LOG2 = 120 if lib is None else int(lib.SELATTN_MAGNITUDE_LIMIT_LOG2)
LIMIT = 2.0 ** LIMIT_LOG2


def _refuse(what: str, inputs: str, bound: float, detail: str) -> None:
    raise ValueError(
        f"{what}: {inputs} are too large for the float32 kernels: {detail} could reach "
        f"{bound:.3g}, beyond 2^{LIMIT_LOG2} = {LIMIT:.3g}, where float32 arithmetic overflows "
        "to inf and NaN (docs/reliability.md, Overflow); rescale the inputs or lower scale")


def logit_bound(qmax: float, kmax: float, N: int, D: int, scale: float,
                soft_strength: float = 0.0) -> float:
    """The largest magnitude the logits, the accumulated mask and the softmax's differences can
    reach (module docstring), from max|q| = ``qmax`` and max|k| = ``kmax``."""
    dot = float(D) * qmax * kmax
    logit = scale * dot
    mask = (1.0 + soft_strength) * float(N) * logit
    return max(dot, 2.0 * (logit + mask))


def check_forward(what: str, qmax: float, kmax: float, vmax: float, N: int, D: int,
                  scale: float, soft_strength: float = 0.0) -> None:
    """ValueError when a forward (or ``accumulated_mask``, with ``vmax`` = 0) on inputs of these
    largest magnitudes could overflow float32."""
    bound = logit_bound(qmax, kmax, N, D, scale, soft_strength)
    if bound > LIMIT:
        _refuse(what, "q and k", bound,
                f"with max|q| = {qmax:.3g}, max|k| = {kmax:.3g}, D = {D}, N = {N} and scale = "
                f"{scale:.3g}, the logits scale * q.k, the accumulated mask or their differences")
    if float(N) * vmax > LIMIT:
        _refuse(what, "v", float(N) * vmax,
                f"with max|v| = {vmax:.3g} and N = {N}, the output's sum over keys")


def check_backward(what: str, maxima: Sequence[float], gmax: float, rows_max: float, R: int,
                   H: int, N: int, D: int, scale: float, soft_strength: float = 0.0) -> None:
    """ValueError when a backward could overflow float32: ``maxima`` are max|q|, max|k|, max|v|
    of the context, ``gmax`` max|dout|, ``rows_max`` max|dF_rows| of R rows per batch element."""
    qmax, kmax, vmax = maxima
    check_forward(what, qmax, kmax, vmax, N, D, scale, soft_strength)
    p = float(D) * gmax * vmax
    g = (1.0 + soft_strength) * (2.0 * H * p + R * rows_max)
    grad = max(1.0, scale) * float(N) * max(qmax, kmax) * (2.0 * p + float(N) * g)
    bound = max(2.0 * p, grad, float(N) * gmax)
    if bound > LIMIT:
        _refuse(what, "dout (with the context's q, k, v and dF_rows)", bound,
                f"with max|dout| = {gmax:.3g}, max|v| = {vmax:.3g}, max|q|, max|k| = "
                f"{qmax:.3g}, {kmax:.3g} and max|dF_rows| = {rows_max:.3g}, the gradients")
