"""The reference against the golden vectors of an independent PyTorch implementation
(tests/data/golden/README.md), in float64, one named test per file and quantity."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import load_golden
from selattn_reference import attention as A
from tolerances import GOLDEN_FLOAT64

GOLDEN = load_golden()
GOLDEN_IDS = [case.name for case in GOLDEN]
BUDGETED = [(case, K) for case in GOLDEN for K in case.meta["budgets"]]
BUDGETED_IDS = [f"{case.name}-K{K}" for case, K in BUDGETED]


def assert_golden(actual: np.ndarray, golden: np.ndarray, what: str) -> None:
    assert actual.shape == golden.shape, f"{what}: shape {actual.shape} != {golden.shape}"
    np.testing.assert_allclose(actual, golden, rtol=GOLDEN_FLOAT64, atol=GOLDEN_FLOAT64,
                               err_msg=what)


def run_forward(case, budget=None):
    meta, z = case.meta, case.arrays
    return A.forward(z["q"], z["k"], z["v"], selector_head=meta["selector_head"],
                     protect_bos=meta["protect_bos"], scale=meta["scale"], budget=budget)


def test_golden_files_are_float64_and_consistent():
    """Guards the guard: a golden file read as float32, or with shapes that disagree with its
    meta, would make every comparison below meaningless."""
    for case in GOLDEN:
        B, H, N, D = (case.meta[key] for key in "BHND")
        for name in ("q", "k", "v", "dout", "out", "dq", "dk", "dv", "mem_dq", "mem_dk"):
            assert case.arrays[name].shape == (B, H, N, D), (case.name, name)
            assert case.arrays[name].dtype == np.float64, (case.name, name)
        assert case.arrays["F"].shape == (B, N, N)
        assert case.arrays["mem"].shape == (B,)


@pytest.mark.parametrize("case", GOLDEN, ids=GOLDEN_IDS)
def test_forward_matches_golden(case):
    out, cache = run_forward(case)
    assert_golden(out, case.arrays["out"], "out")
    assert_golden(cache.F, case.arrays["F"], "F")
    assert_golden(A.accumulated_mask(case.arrays["q"], case.arrays["k"],
                                     selector_head=case.meta["selector_head"],
                                     protect_bos=case.meta["protect_bos"],
                                     scale=case.meta["scale"]),
                  case.arrays["F"], "accumulated_mask")


@pytest.mark.parametrize("case", GOLDEN, ids=GOLDEN_IDS)
def test_backward_matches_golden(case):
    _, cache = run_forward(case)
    dq, dk, dv = A.backward(case.arrays["dout"], cache)
    assert_golden(dq, case.arrays["dq"], "dq")
    assert_golden(dk, case.arrays["dk"], "dk")
    assert_golden(dv, case.arrays["dv"], "dv")


@pytest.mark.parametrize("case", GOLDEN, ids=GOLDEN_IDS)
def test_memory_loss_matches_golden(case):
    _, cache = run_forward(case)
    tau = case.meta["tau"]
    assert_golden(A.memory_loss(cache.F, tau), case.arrays["mem"], "mem")
    # Gradient of sum(mem) alone: no upstream gradient on out, the memory loss enters through dF.
    dF = A.memory_loss_backward(np.ones(case.meta["B"]), cache.F, tau)
    dq, dk, dv = A.backward(np.zeros_like(case.arrays["dout"]), cache, dF=dF)
    assert_golden(dq, case.arrays["mem_dq"], "mem_dq")
    assert_golden(dk, case.arrays["mem_dk"], "mem_dk")
    assert not dv.any(), "the memory loss does not depend on v"


@pytest.mark.parametrize("case, budget", BUDGETED, ids=BUDGETED_IDS)
def test_pruning_matches_golden(case, budget):
    visible = A.eviction_mask(case.arrays["F"], budget, protect_bos=case.meta["protect_bos"])
    np.testing.assert_array_equal(visible, case.arrays[f"visible_{budget}"])
    out, cache = run_forward(case, budget=budget)
    np.testing.assert_array_equal(cache.visible, case.arrays[f"visible_{budget}"])
    assert_golden(out, case.arrays[f"pruned_out_{budget}"], f"pruned_out_{budget}")
