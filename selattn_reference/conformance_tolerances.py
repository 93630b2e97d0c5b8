"""Every tolerance of the conformance kit, in one place, each with its reason.

The kit cannot know whether a candidate computes in float64 or float32, so it holds every
implementation to what an honest float32 implementation of the same math achieves: a result
passes when it is within ``output_atol`` (or ``gradient_atol``) of the float64 reference on the
same inputs. A formula error (any of the known mistakes, a wrong scale, a wrong head) moves the
output by a sizeable fraction of ``max|v|``, i.e. by 1e4 times this bound or more on the inputs
the kit uses, so the float32 allowance costs no power against real mistakes.
"""

from __future__ import annotations

import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)

# A float32 logit carries a rounding error of a few eps32 times the magnitudes it is made of
# (max|L| and max F: F is a running sum whose rounding grows with its size), every softmax row and
# matrix product adds about N + D roundings more, and the softmax turns a logit error d into a
# weight error of at most d. So a float32 output is within
#     OUTPUT_FACTOR * eps32 * (max|L| + max F + N + D) * max|v|
# of the exact one. The project's C kernels measure at most 0.28 of this bound with factor 1
# (600 random cases, input scales 0.1 .. 30); a plain NumPy float32 port of the listing and a
# PyTorch float32 port (both in the kit's tests) stay within the same order. 16 leaves a margin of
# more than 50 for other summation orders (blocked, online softmax, fused kernels).
OUTPUT_FACTOR = 16.0

# Gradients of sum(out * dout) go through the same roundings plus one more product each, and
# through F into the selector head's q and k; the natural magnitude of dq is
# scale * max|k| * max|dout| * max|v| (likewise dk with q), of dv max|dout|. Same bound, same
# factor, on that magnitude. Inputs with a selector logit within GRADIENT_KINK_FACTOR * D * eps32
# (relative) of relu's kink at 0 are not used for gradients: there a float32 implementation may
# legitimately switch the gate of relu the other way and differ by a whole term.
GRADIENT_FACTOR = 16.0
GRADIENT_KINK_FACTOR = 4.0

# The KV cache's eviction is a discrete decision: float32 rounding (~1e-6 relative to the largest
# logit or F) can flip it only when two F values of a row are that close. Random decode cases whose
# reference decisions are closer than DECISION_MARGIN (relative to 1 + max F) are not used; the
# tie cases use small integers, for which float32 and float64 compute every F exactly, so there
# the ties are exact in every implementation and the oldest-first rule is tested as such.
DECISION_MARGIN = 1e-4

# The BOS and self invariants read attention weights off the output (the values are one-hot) and
# compare log-ratios of weights with the unmasked logits. A weight p with an absolute error e has a
# log error of about e / p; weights below INVARIANT_MIN_WEIGHT are not used (none is, on the probe
# inputs, in a correct implementation: the probed weights are never masked).
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
