"""The memory-loss benchmark (selattn_bench.memory_loss): its two routes agree, and it runs."""

from __future__ import annotations

import numpy as np

from selattn_bench import memory_loss as bench


def test_the_dense_route_computes_the_same_step():
    """The benchmark's "dense F" route (the C backend before the kernels took dF as rows) must
    give the same memory loss and gradients as today's route, or the comparison means nothing.
    Both are float32 C kernels with the same F bits; only the loss' summation and the NumPy
    matrix products differ (MODEL_FLOAT32_RTOL's reasoning: a few 1e-7 measured)."""
    args = bench.parse_args(["--sizes", "80", "--layers", "2", "--heads", "2", "--d-model", "16"])
    mem_err, grad_err = bench.verify(args, 80)
    assert mem_err < 1e-5 and grad_err < 1e-4


def test_mask_gradient_is_the_reference_backward_through_F():
    """mask_gradient (the dense route's selector gradient) on a random dF vs the reference's
    backward with dout = 0 (whose only path is then through F)."""
    from selattn_reference import attention as ref
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 2, 30, 4)) for _ in range(3))
    dF = rng.standard_normal((2, 30, 30))
    _, cache = ref.forward(q, k, v)
    dq_ref, dk_ref, _ = ref.backward(np.zeros_like(q), cache, dF=dF)
    dq_sel, dk_sel = bench.mask_gradient(dF, q[:, 0], k[:, 0], cache.scale, True)
    np.testing.assert_allclose(dq_sel, dq_ref[:, 0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dk_sel, dk_ref[:, 0], rtol=1e-10, atol=1e-12)
    assert not dq_ref[:, 1:].any()


def test_the_benchmark_prints_its_table(capsys):
    bench.main(["--sizes", "40,70", "--layers", "1", "--heads", "2", "--d-model", "16",
                "--repeats", "1", "--markdown"])
    out = capsys.readouterr().out
    assert "check at N = 40" in out
    rows = [line for line in out.splitlines() if line.startswith("| 40 ") or
            line.startswith("| 70 ")]
    assert len(rows) == 4 and sum("dense F" in r for r in rows) == 2
