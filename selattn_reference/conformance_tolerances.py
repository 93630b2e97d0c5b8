"""Every tolerance of the conformance kit, in one place, each with its reason.

The kit cannot know whether a candidate computes in float64 or float32, so it holds every
implementation to what an honest float32 implementation of the same math achieves: a result
passes when it is within ``output_atol`` (or ``gradient_atol``) of the float64 reference on the
same inputs. A formula error (any of the known mistakes, a wrong scale, a wrong head) moves the
output by a sizeable fraction of ``max|v|``: the known mistakes exceed this bound by a median
factor of 2400 or more on the kit's random inputs, so the float32 allowance costs little power
against real mistakes (measurements below).
"""

from __future__ import annotations

import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)

# A float32 logit carries a rounding error of a few eps32 times the magnitudes it is made of
# (max|L| and max F: F is a running sum whose rounding grows with its size), every softmax row and
# matrix product adds about N + D roundings more, and the softmax turns a logit error d into a
# weight error of at most d. So a float32 output is within
#     OUTPUT_FACTOR * eps32 * (max|L| + max F + N + D) * max|v|
# of the exact one. Measured with factor 1 over 3154 cases (the random cases of 150 seeds and the
# golden files): a plain NumPy float32 port of the listing, a PyTorch float32 port and the
# project's C kernels (float32, blocked, online softmax) all stay within 0.21 of this bound. 16
# leaves a margin of 75 for other summation orders. The known mistakes exceed the bound with
# factor 16 by a median factor of 2400 to 5300 on the random cases (by 18 at the least, at input
# scale 0.1 where every logit is near 0).
OUTPUT_FACTOR = 16.0

# Gradients of sum(out * dout) go through the same roundings plus one more product each, and
# through F into the selector head's q and k; the natural magnitude of dq is
# scale * max|k| * max|dout| * max|v| (likewise dk with q), of dv max|dout| (or the reference
# gradient's largest entry, when larger). Same bound, on that magnitude. Measured with factor 1
# over 760 random cases (40 seeds): autograd through a PyTorch float32 port of the listing at most
# 0.13 of it, the C kernels' backward 0.16; 16 is the same margin as for out. Inputs with a
# selector logit within GRADIENT_KINK_FACTOR * D * eps32 (relative to the sum of the magnitudes
# of its products) of relu's kink at 0 are not used for gradients: there a float32
# implementation may legitimately switch the gate of relu the other way and differ by a whole
# term (4: the margin on the worst-case float32 dot-product error, gamma_D).
GRADIENT_FACTOR = 16.0
GRADIENT_KINK_FACTOR = 4.0

# The KV cache's eviction is a discrete decision: float32 rounding (~1e-6 relative to the largest
# logit or F) can flip it only when two F values of a row are that close. Random decode cases whose
# reference decisions are closer than DECISION_MARGIN (relative to 1 + max F) are not used
# (about 100 times the float32 error). The tie cases (a selector whose logits are exactly 0, and
# small integers with D = 4) are computed exactly in float32 and float64 alike, so their ties are
# exact in every implementation and the oldest-first rule is tested as such.
DECISION_MARGIN = 1e-4

# The BOS and self invariants read attention weights P off the output (the values are one-hot),
# so each weight has the output's absolute tolerance e. BOS and the previous token are compared
# with the query's own weight linearly: |P[i, j] - P[i, i] r| <= e (1 + r), r = exp(L[i, j] -
# L[i, i]). The other invariants (F >= 0, shared by the heads, non-decreasing) recover F as a
# log-ratio of weights, whose error is about e / p for a weight p; weights below
# INVARIANT_MIN_WEIGHT are not used there: at 1e-3 the recovered F is still good to ~0.07 nats
# on the probe (e ~ 7e-5), while the mistakes these invariants catch move F by whole nats.
INVARIANT_MIN_WEIGHT = 1e-3


def output_atol(logit_max: float, mask_max: float, N: int, D: int, magnitude: float) -> float:
    """Absolute tolerance of an output (or gradient) against the float64 reference.

    Parameters
    ----------
    logit_max : float, max |L| over the case (scaled logits)
    mask_max : float, max F over the case
    N, D : int, tokens and head size
    magnitude : float, the natural size of the quantity (max|v| for out)

    Returns
    -------
    atol : float
    """
    return OUTPUT_FACTOR * FLOAT32_EPS * (logit_max + mask_max + N + D) * magnitude


def gradient_atol(logit_max: float, mask_max: float, N: int, D: int, magnitude: float) -> float:
    """Absolute tolerance of a gradient against the reference's backward (see above)."""
    return GRADIENT_FACTOR * FLOAT32_EPS * (logit_max + mask_max + N + D) * magnitude
