"""Bad arguments raise a ValueError / TypeError that names the problem, never a wrong answer."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import random_qkv
from selattn_reference import attention as A

B, H, N, D = 2, 3, 5, 4
Q, K, V = random_qkv(0, (B, H, N, D))


def good_cache() -> A.Cache:
    return A.forward(Q, K, V)[1]


F_GOOD = good_cache().F                                                          # (B, N, N)


@pytest.mark.parametrize(
    "call, error, match",
    [
        # shapes
        pytest.param(lambda: A.forward(Q, K[:, :, :-1], V),
                     ValueError, r"shape mismatch: q is \(2, 3, 5, 4\) but k is \(2, 3, 4, 4\)", id="k-shorter-N"),
        pytest.param(lambda: A.forward(Q, K, V[..., :-1]),
                     ValueError, r"shape mismatch: .* v is \(2, 3, 5, 3\)", id="v-shorter-D"),
        pytest.param(lambda: A.forward(Q[0], K[0], V[0]),
                     ValueError, r"q must have 4 dimensions \(B, H, N, D\), got shape \(3, 5, 4\)", id="q-3d"),
        pytest.param(lambda: A.forward(Q, K, V[None]),
                     ValueError, r"v must have 4 dimensions", id="v-5d"),
        pytest.param(lambda: A.forward(Q[:, :, :0], K[:, :, :0], V[:, :, :0]),
                     ValueError, r"every dimension .* must be >= 1", id="empty-N"),
        pytest.param(lambda: A.accumulated_mask(Q[..., 0], K[..., 0]),
                     ValueError, r"q must have 4 dimensions", id="accumulated-mask-3d"),
        # dtypes
        pytest.param(lambda: A.forward(Q.astype(np.int64), K, V),
                     TypeError, r"q must be a floating-point array, got dtype int64", id="q-int"),
        pytest.param(lambda: A.forward(Q, K.astype(bool), V),
                     TypeError, r"k must be a floating-point array, got dtype bool", id="k-bool"),
        pytest.param(lambda: A.forward(Q, K, V.astype(np.complex128)),
                     TypeError, r"v must be a floating-point array", id="v-complex"),
        pytest.param(lambda: A.forward(Q, K.astype(np.float32), V),
                     TypeError, r"dtype mismatch: q is float64 but k is float32", id="k-float32-q-float64"),
        pytest.param(lambda: A.forward(Q, K, [["not", "numbers"]]),
                     TypeError, r"v must be a floating-point array", id="v-strings"),
        # values
        pytest.param(lambda: A.forward(np.where(Q > 1, np.nan, Q), K, V),
                     ValueError, r"q contains NaN or infinity", id="q-nan"),
        pytest.param(lambda: A.accumulated_mask(Q, np.where(K > 1, np.inf, K)),
                     ValueError, r"k contains NaN or infinity", id="k-inf"),
        # options
        pytest.param(lambda: A.forward(Q, K, V, selector_head=H),
                     ValueError, r"selector_head 3 is out of range for H = 3 heads", id="selector-head-H"),
        pytest.param(lambda: A.forward(Q, K, V, selector_head=-1),
                     ValueError, r"selector_head -1 is out of range", id="selector-head-negative"),
        pytest.param(lambda: A.forward(Q, K, V, selector_head=1.0),
                     TypeError, r"selector_head must be an int, got float", id="selector-head-float"),
        pytest.param(lambda: A.forward(Q, K, V, selector_head=True),
                     TypeError, r"selector_head must be an int, got bool", id="selector-head-bool"),
        pytest.param(lambda: A.accumulated_mask(Q, K, selector_head=7),
                     ValueError, r"selector_head 7 is out of range", id="accumulated-mask-selector-head"),
        pytest.param(lambda: A.forward(Q, K, V, scale=float("nan")),
                     ValueError, r"scale must be finite", id="scale-nan"),
        pytest.param(lambda: A.forward(Q, K, V, scale="0.5"),
                     TypeError, r"scale must be a real number or None, got str", id="scale-str"),
        # budget
        pytest.param(lambda: A.forward(Q, K, V, budget=1),
                     ValueError, r"budget 1 is too small: it must be >= 2 to hold BOS and the current token", id="budget-1-with-bos"),
        pytest.param(lambda: A.forward(Q, K, V, budget=0, protect_bos=False),
                     ValueError, r"budget 0 is too small: it must be >= 1 to hold the current token", id="budget-0-without-bos"),
        pytest.param(lambda: A.forward(Q, K, V, budget=2.0),
                     TypeError, r"budget must be an int or None, got float", id="budget-float"),
        pytest.param(lambda: A.eviction_mask(F_GOOD, 1),
                     ValueError, r"budget 1 is too small", id="eviction-budget-1"),
        pytest.param(lambda: A.eviction_mask(F_GOOD[0], 3),
                     ValueError, r"F must have shape \(B, N, N\), got \(5, 5\)", id="eviction-F-2d"),
        pytest.param(lambda: A.eviction_mask(F_GOOD[:, :, :-1], 3),
                     ValueError, r"F must have shape \(B, N, N\), got \(2, 5, 4\)", id="eviction-F-not-square"),
        pytest.param(lambda: A.eviction_mask(F_GOOD.astype(int), 3),
                     TypeError, r"F must be a floating-point array", id="eviction-F-int"),
        # memory loss
        pytest.param(lambda: A.memory_loss(F_GOOD, 0.0),
                     ValueError, r"tau must be a finite number > 0, got 0.0", id="tau-0"),
        pytest.param(lambda: A.memory_loss(F_GOOD, -1.0),
                     ValueError, r"tau must be a finite number > 0, got -1.0", id="tau-negative"),
        pytest.param(lambda: A.memory_loss(F_GOOD, float("inf")),
                     ValueError, r"tau must be a finite number > 0, got inf", id="tau-inf"),
        pytest.param(lambda: A.memory_loss(F_GOOD, None),
                     TypeError, r"tau must be a real number, got NoneType", id="tau-None"),
        pytest.param(lambda: A.memory_loss(F_GOOD[0]),
                     ValueError, r"F must have shape \(B, N, N\)", id="memory-loss-F-2d"),
        pytest.param(lambda: A.memory_loss_backward(np.ones(B), F_GOOD, 0.0),
                     ValueError, r"tau must be a finite number > 0", id="memory-loss-backward-tau-0"),
        pytest.param(lambda: A.memory_loss_backward(np.ones(B + 1), F_GOOD),
                     ValueError, r"dmem must have shape \(2,\), got \(3,\)", id="memory-loss-backward-dmem-shape"),
        # backward
        pytest.param(lambda: A.backward(np.ones((B, H, N, D + 1)), good_cache()),
                     ValueError, r"dout must have shape \(2, 3, 5, 4\), got \(2, 3, 5, 5\)", id="dout-wrong-D"),
        pytest.param(lambda: A.backward(np.ones((H, N, D)), good_cache()),
                     ValueError, r"dout must have shape \(2, 3, 5, 4\), got \(3, 5, 4\)", id="dout-3d"),
        pytest.param(lambda: A.backward(np.ones((B, H, N, D), dtype=int), good_cache()),
                     TypeError, r"dout must be a floating-point array", id="dout-int"),
        pytest.param(lambda: A.backward(np.ones((B, H, N, D)), good_cache(), dF=np.ones((B, N, N + 1))),
                     ValueError, r"dF must have shape \(2, 5, 5\), got \(2, 5, 6\)", id="dF-wrong-shape"),
        pytest.param(lambda: A.backward(np.ones((B, H, N, D)), A.forward(Q, K, V, selective=False)[1], dF=np.ones((N, N))),
                     ValueError, r"dF must have shape \(2, 5, 5\)", id="dF-wrong-shape-not-selective"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_valid_edge_arguments_are_accepted():
    """The boundaries of the checks above are legal: the checks reject exactly what they say."""
    A.forward(Q, K, V, selector_head=H - 1, budget=2)                      # smallest with BOS
    A.forward(Q, K, V, selector_head=np.int64(0), protect_bos=False, budget=1)
    A.forward(Q, K, V, scale=np.float32(0.5), budget=np.int32(3))
    A.forward(Q[:1, :1, :1, :1], K[:1, :1, :1, :1], V[:1, :1, :1, :1])   # B = H = N = D = 1
    A.memory_loss(F_GOOD, 1)                                               # an int tau is fine
    A.forward(Q.tolist(), K.tolist(), V.tolist())                          # nested lists of floats
