"""Every numerical tolerance the tests use, in one place, each with the reason for its value.

A test that needs a tolerance imports it from here; no test hard-codes its own. When a tolerance
has to be loosened, the reason goes next to it, so the cost of the change is visible in review.
"""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------------------------------
# Reference (NumPy, float64)

# The golden vectors come from an independent PyTorch float64 implementation. Both compute the same
# formulas with different summation orders (BLAS blocking, torch vs numpy cumsum and softmax), so
# they differ by a few ulps times the condition of the computation; the largest case (N = 40,
# logits of order 10, F of order 100) agrees to ~1e-15. 1e-10 leaves five orders of margin for
# other BLAS builds while still catching any real formula error (which shows up at 1e-3 or worse).
# Used as an absolute and a relative tolerance: |actual - golden| <= 1e-10 * (1 + |golden|).
GOLDEN_FLOAT64 = 1e-10

# Centred finite differences in float64 with step FD_STEP: the truncation error is O(h^2 f''') ~
# 1e-10 and the rounding error O(eps |f| / h) ~ 1e-11, so a correct gradient shows relative errors
# around 1e-9..1e-7; a wrong term in the backward pass shows up as 1e-3 or worse.
FD_MAX_REL_ERROR = 1e-6

# Step of the centred differences. 1e-5 balances truncation (grows as h^2) against rounding
# (grows as 1/h) for inputs of order 1; measured errors are lowest around this value.
FD_STEP = 1e-5

# rel_error is CS231n's max_i |a_i - n_i| / max(floor, |a_i| + |n_i|). A gradient component that is
# tiny (e.g. of a key with softmax weight 1e-6) carries the same *absolute* rounding noise as
# the others, ~ eps * (1 + max|L| + max F) * sum|loss terms| / h, which makes its own relative
# error meaningless. The tests set floor = noise / FD_MAX_REL_ERROR, i.e. a component passes when
# |a - n| <= max(FD_MAX_REL_ERROR * (|a| + |n|), noise). The estimate is an upper bound on the
# measured noise (factor 1); the absolute slack it grants (~1e-9 for O(1) inputs) is six orders
# below what a wrong term in the backward pass produces.
FD_NOISE_FACTOR = 1.0

# Safety factor on the kink margins of the finite-difference test: an input is skipped when a relu
# argument, a memory-loss row-sum gap or |F - tau| is within this many times the largest change
# one finite-difference step can cause. 10 makes straddling a kink impossible, not just unlikely.
FD_KINK_SAFETY = 10.0

# Two float64 computations of the same quantity that differ only in the order of operations
# (e.g. the spec vs. a naive causal softmax written in the test, or sum(P) vs 1): N <= 96 terms,
# so the rounding error is at most ~N * eps * magnitude ~ 2e-14 * magnitude; 1e-12 is ample and
# still far below any formula error.
REORDERED_FLOAT64 = 1e-12

# float32 inputs vs the same inputs in float64. Every result is a sum of at most
# N + D + (terms in L and F) roundings of relative size eps32, and the softmax is 1-Lipschitz in its
# logits, so |x32 - x64| <= c * eps32 * (N + D + max|L| + max F) * (natural scale of x), where the
# natural scale is max|v| for out, 1 for F, and the product of the upstream magnitudes for the
# gradients. Measured c is below 3 on 3000 random cases of every input scale; 8 is the margin.
FLOAT32_EPS = float(np.finfo(np.float32).eps)
FLOAT32_ERROR_FACTOR = 8.0

# ----------------------------------------------------------------------------------------------
# Documentation

# docs/selective-attention.md prints attention weights with 3 decimals (and the explain command
# prints the same text), so a printed weight is within half a unit in the last place of the
# computed one: 5e-4, plus a hair for the binary/decimal conversion.
DOC_WEIGHT_DECIMALS = 3
DOC_PRINTED_ATOL = 0.5 * 10.0 ** -DOC_WEIGHT_DECIMALS + 1e-12

# ----------------------------------------------------------------------------------------------
# C kernels (float32) vs the reference (float64)

# The C kernels compute in float32. A logit carries a rounding error of a few eps32 times the
# magnitudes it is made of (max|L|, max F), each softmax row and matrix product adds about N + D
# more, and the softmax turns a logit error d into a weight error of at most d. So every C result
# is compared with the float64 reference (run on the same float32-rounded inputs) within
#     C_FLOAT32_FACTOR * eps32 * (max|L| + max F + N + D) * magnitude,
# where magnitude is the larger of the reference array's largest entry and the natural size of the
# quantity built from the inputs (max|v| for out; 1 for F; max|dout| for dv; scale * max|k| *
# max|dout| * max|v| for dq, likewise with q for dk), so that an array that is zero in exact
# arithmetic (e.g. dq at N = 1) is not held to a tolerance of zero. Measured over 600 random cases
# of every option and input scale (0.1 .. 30, i.e. logits up to ~1e3 and F up to ~1e5), the worst
# error is 0.28 of this bound with factor 1; 4 leaves a margin of 14. A wrong term in a kernel
# produces errors of the order of the magnitude itself, i.e. 1/(eps32 * cond) times the bound.
C_FLOAT32_FACTOR = 4.0


def c_float32_atol(magnitude: float, *, logit_max: float, mask_max: float, N: int, D: int) -> float:
    """Absolute tolerance of a float32 C result against the float64 reference (see above)."""
    return C_FLOAT32_FACTOR * FLOAT32_EPS * (logit_max + mask_max + N + D) * magnitude


# The relu of the selector's logits has a kink at 0, where the gradient through F switches on or
# off. A logit whose float32 and float64 values have different signs gets a different gate, and the
# gradients then differ by a whole term: the forward agrees, the gradient legitimately does not.
# A float32 dot product of length D is off by at most about D * eps32 * scale * sum_d |q_d k_d|
# (Higham's gamma_D bound), so gradient comparisons skip inputs with a selector logit within
# SELECTOR_KINK_FACTOR times that of zero; 4 is the margin on a worst-case bound (typical errors
# are sqrt(D) times smaller). The golden files' closest logit is 16 times this bound away.
SELECTOR_KINK_FACTOR = 4.0


def selector_kink_margin(D: int) -> float:
    """Relative distance from 0 below which a selector logit's float32 sign is not trusted."""
    return SELECTOR_KINK_FACTOR * D * FLOAT32_EPS

# The rank penalty (docs/selective-attention.md § 10) subtracts F_soft = (1 + s) F - s theta past
# the cut instead of F, theta being one of the row's F values: its float32 error is at most
# (1 + 2 s) times F's, so the C kernels' bound takes (1 + 2 s) max F where it takes max F.
def rank_penalty_mask_max(mask_max: float, strength: float) -> float:
    """The ``mask_max`` of c_float32_atol for a layer with the rank penalty of slope strength."""
    return (1.0 + 2.0 * strength) * mask_max


# The C kernels' own exponential (Cody-Waite reduction and a degree-6 polynomial) is accurate to
# about 1 ulp. With one key against another (N = 2, D = 1, so each logit is one float32 product
# with a relative rounding of eps32 / 2), a softmax weight p is off by at most about
# eps32 * (1 + |L|) * p from rounding the logits plus a few ulp from exp, the sum and the division.
# 4 leaves a margin of about 2 over that. Checked: an exponential with a relative error of 1e-5
# (one polynomial coefficient off by 1e-4) fails this test, while it passes c_float32_atol.
C_SOFTMAX_ULPS = 4.0

# ----------------------------------------------------------------------------------------------
# The tiny language model (selattn_lm/model.py)

# Whole-model centred finite differences in float64 (the requirement: max relative error
# <= 1e-5 on every parameter tensor). A correct backward measures ~1e-9 (truncation h^2 f''' and
# rounding eps64 |loss| / h, as for FD_MAX_REL_ERROR), a wrong term 1e-2 or worse.
MODEL_FD_MAX_REL_ERROR = 1e-5

# Absolute rounding noise of one centred difference of the whole model's loss: the loss (order 1)
# is a sum of many terms each rounded to eps64, and its difference is divided by 2h, so the noise
# is about eps64 * (1 + |loss|) * MODEL_FD_NOISE_TERMS / h. The rel_error floor is
# noise / MODEL_FD_MAX_REL_ERROR, i.e. a component passes when |a - n| <= max(1e-5 (|a| + |n|),
# noise). Measured on the test configs: with 1 term the worst error is 3.4e-6 (the noise of tiny
# components, not a formula error), with 100 terms 1.5e-7; 10 terms (absolute slack ~1e-10,
# gradients below ~1e-5 held to it) keeps a margin of ~10 and is far below a wrong term's 1e-3.
MODEL_FD_NOISE_TERMS = 10.0

# The skipped share of the components of one parameter tensor (a centred step that crosses a
# relu, tau or argmax kink of the memory loss is not a valid measurement). Measured on the test
# inputs: none is skipped (h = 1e-5 is far smaller than the margins of these seeds); 10 % lets
# other BLAS builds land a few steps on a kink while catching inputs that sit on kinks everywhere.
MODEL_FD_MAX_SKIPPED = 0.10

# float32 model vs the same model in float64 (or the C backend vs the NumPy backend, both float32):
# losses and gradients go through ~10 float32 layers (sums of up to d_model * mlp_ratio = 256
# terms), so relative differences of a few 1e-6 are expected; measured below 1e-5 on the test
# configs. 1e-4 is the margin; a wrong term is visible at 1e-2 or worse.
MODEL_FLOAT32_RTOL = 1e-4

# Training curves of the C and NumPy backends (float32): both start from the same weights and
# see the same batches; their per-step float32 differences (~1e-7 relative) are fed back through
# AdamW, which amplifies the relative noise of (near-)zero gradients, so the curves drift apart
# slowly. Measured over 20 steps on 3 seeds: at most 1.6e-7 relative. 1e-5 is the margin (60x);
# a backend with a wrong gradient term (measured: the dF path left out) is off by 2.8e-2.
TRAINING_CURVE_RTOL = 1e-5

# ----------------------------------------------------------------------------------------------
# The inference runner (selattn_lm.runner: float32 NumPy layers + C KV caches) vs the reference model

# The requirement: with no budget the runner's logits equal the reference model's within
# 1e-4 relative (max |a - b| / max |b|). The runner is float32 end to end (NumPy layers and the C
# kernels) against the float64 reference, through up to 3 blocks; measured on 60 random models of
# the test's distribution: at most 1.3e-6 relative, so 1e-4 leaves a margin of ~80. A wrong
# layer, a wrong position offset in decoding or a wrongly evicted key moves the logits by 1e-2 or
# more (tests/test_runner.py catches both mutations).
RUNNER_LOGITS_RTOL = 1e-4

# Budgeted runs compare discrete eviction decisions: float32 rounding (~1e-6 relative to the
# largest selector logit or F) can only change a decision when two F values of an evicting query
# row are that close, or when a selector logit is that close to relu's kink at 0 (F then switches
# between exactly 0 and a tiny value, changing the oldest-first tie-break). Comparisons skip
# inputs closer than this margin, relative to 1 + the largest |logit| or F, to such a tie: ~100
# times the float32 error. (The same margin separates the top two logits where a test compares
# argmaxes.)
RUNNER_DECISION_MARGIN = 1e-4

# ----------------------------------------------------------------------------------------------
# The PyTorch bridge (selattn_c.torch, selattn_lm.torch_model)

# The bridge hands the kernels the tensors' own float32 memory and returns their arrays, so it is
# compared with selattn_c.forward/backward bitwise, and with the float64 reference by
# c_float32_atol like the kernels. selective=False against torch's scaled_dot_product_attention
# (is_causal=True): two float32 implementations of one causal attention, each within
# c_float32_atol of the exact result, so they differ by at most twice that bound.
TORCH_SDPA_FACTOR = 2.0

# The torch port of the tiny LM (float32 torch layers + the C kernels) against the reference model
# in float64: the same ~10 float32 layers MODEL_FLOAT32_RTOL describes, summed in torch's order.
# Measured at step 0 (eps 1, live selector): logits 7.3e-7 relative, worst gradient tensor 7.0e-7
# by norm. 1e-4 is the margin; a wrong term (e.g. the memory loss' path through F left out) is
# off by 1e-2 or more.
TORCH_MODEL_RTOL = 1e-4

# Training curves of the torch port (torch AdamW, clip_grad_norm_) and of
# selattn_lm.training.train (C backend, NumPy AdamW) from the same weights and batches: per-step
# float32 differences (~1e-7) fed back through AdamW. Measured over 20 steps of the default task:
# at most 2.0e-7 relative (window means of 5 steps). 1e-5 is the margin (50x).
TORCH_TRAINING_CURVE_RTOL = 1e-5

# What a PyTorch user would write instead of the bridge (selattn_bench.torch_compare): the paper's
# listing in eager float32 torch operations, flex_attention with F as a score_mod (eager and
# compiled), the accumulated mask F in torch operations, and SDPA for standard attention, all
# against the float64 reference. They compute the same formulas in float32 in other summation
# orders, so c_float32_atol's error model applies to them as to the kernels, and they are held to
# c_float32_atol times this factor (gradients: magnitude as in tests/test_torch_sdpa.py's GQA test,
# the product of the upstream maxima). Measured over 120 cases (N = 16, 33, 64; B = 2, H = 3, D =
# 16; q, k scaled by 0.1 .. 3; flex eager, and compiled at N = 64: the same errors): worst 0.035 of
# c_float32_atol (SDPA's output), 0.016 for gradients, 0.005 for F; so factor 1 leaves a margin of
# ~28. Mistakes are far outside it: F not shifted one query down (a plausible slip when writing F by
# hand) is off by 7e3..2e4 times the bound at N = 16..64; at N = 40, F scaled by 0.5 or built from
# another head moves the output by 2.3 and 3.7 (bound 2.8e-4), and F detached from autograd moves
# the gradients by 4.5 (bound 4.7e-2).
TORCH_USER_CODE_FACTOR = 1.0

# ----------------------------------------------------------------------------------------------
# The memory loss on the C kernels (selattn_c.memory)

# The kernels sum each row's kept terms (1 - min(F, tau) / tau, rounded to float32) in double; the
# reference sums the same float32 F in float64. Each term then differs by at most about one
# float32 rounding, so two rows whose kept sums are closer than N * MEMORY_ROW_GAP may swap places
# at the max, and the gradient legitimately lands on the other row; tests skip such near ties. 4
# ulps per term is the margin on one rounding (half an ulp) plus the division by tau.
MEMORY_ROW_GAP = 4.0 * FLOAT32_EPS
