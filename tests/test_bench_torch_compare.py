"""selattn_bench.torch_compare at tiny sizes: every method it times (the bridge, SDPA, the eager
listing with autograd, flex_attention with F as a score_mod, F itself) computes what the float64
reference computes, within the tolerances of tests/tolerances.py; the benchmark prints its table;
bad arguments are refused. No timing is checked (speed is the benchmark's job).

flex_attention runs eagerly here (an unfused implementation: no compile time), except in one
test that compiles it once at N = 32 (about 15 s on the development machine).

Skipped without torch (``pip install '.[torch]'``)."""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")

import selattn_c  # noqa: E402
from selattn_bench import torch_compare as tc  # noqa: E402

from tolerances import TORCH_USER_CODE_FACTOR, c_float32_atol, selector_kink_margin  # noqa: E402

B, H, D = 2, 3, 16
SIZES = (16, 40, 64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread for the kernels and torch (tiny calls; the results do not depend on it)."""
    before, before_torch = selattn_c.get_num_threads(), torch.get_num_threads()
    selattn_c.set_num_threads(1)
    torch.set_num_threads(1)
    yield
    selattn_c.set_num_threads(before)
    torch.set_num_threads(before_torch)


def inputs(N: int, seed: int = 0, input_scale: float = 2.0):
    """q, k, v, dout (B, H, N, D); q and k scaled so that the selector masks strongly."""
    q, k, v, dout = tc.make_inputs(torch, B, H, N, D, seed=seed)
    return q * input_scale, k * input_scale, v, dout


class Bounds:
    """The tolerances of one input: c_float32_atol's arguments from the float64 reference."""

    def __init__(self, q, k, v, dout):
        N = q.shape[-2]
        scale = D ** -0.5
        L = scale * (q.double() @ k.double().transpose(-1, -2))              # (B, H, N, N)
        causal = torch.ones(N, N, dtype=torch.bool).tril()
        self.out, self.grads, self.F = tc.reference(q, k, v, dout)
        self.std_out, self.std_grads, _ = tc.reference(q, k, v, dout, selective=False)
        self.common = dict(logit_max=float(L[..., causal].abs().max()), N=N, D=D)
        self.mask_max = float(self.F.max())
        self.v_max = float(v.abs().max())
        # each gradient is a sum of products of at most these factors
        self.natural = float(q.abs().max() * k.abs().max() * v.abs().max() * dout.abs().max())
        # gradients compare only away from relu's kink (tolerances.SELECTOR_KINK_FACTOR)
        allowed = torch.ones(N, N, dtype=torch.bool).tril(-1)
        allowed[:, 0] = False
        size = scale * (q[:, 0].double().abs() @ k[:, 0].double().abs().transpose(-1, -2))
        self.kink_distance = float((L[:, 0].abs() / size)[:, allowed].min())

    def atol(self, magnitude: float, selective: bool = True) -> float:
        return TORCH_USER_CODE_FACTOR * c_float32_atol(
            magnitude, mask_max=self.mask_max if selective else 0.0, **self.common)

    def out_atol(self, selective: bool = True) -> float:
        want = self.out if selective else self.std_out
        return self.atol(max(float(want.abs().max()), self.v_max), selective)

    def grad_atol(self, selective: bool = True) -> float:
        want = self.grads if selective else self.std_grads
        return self.atol(max(self.natural, *(float(g.abs().max()) for g in want)), selective)

    def f_atol(self) -> float:
        return self.atol(max(self.mask_max, 1.0))


def check_rows(rows, bounds: Bounds) -> None:
    """Every row's error columns within the tolerances."""
    assert bounds.kink_distance > selector_kink_margin(D)      # the inputs allow gradient checks
    for row in rows:
        selective = not row.method.startswith("SDPA")
        if row.method.startswith("F "):
            assert row.out_error <= bounds.f_atol(), row
            continue
        if row.out_error is None:        # flex's backward on CPU: refused by torch
            assert row.note.startswith("not supported: "), row
            continue
        assert row.out_error <= bounds.out_atol(selective), row
        if row.timed == "fwd+bwd":
            assert row.grad_error <= bounds.grad_atol(selective), row


@pytest.mark.parametrize("N", SIZES)
def test_every_method_computes_the_reference(N):
    q, k, v, dout = inputs(N, seed=N)
    bounds = Bounds(q, k, v, dout)
    assert bounds.mask_max > 1.0                                  # a live selector
    flex = tc.prepare_flex("eager", q, k, v, dout)
    ops, rows = tc.build_ops(q, k, v, dout, N, flex)
    assert [(r.method, r.timed) for r in rows] == [
        ("bridge", "fwd"), ("bridge", "fwd+bwd"),
        ("SDPA (standard)", "fwd"), ("SDPA (standard)", "fwd+bwd"),
        ("eager", "fwd"), ("eager", "fwd+bwd"),
        ("flex (F precomputed)", "fwd"), ("F (torch ops)", "fwd"),
        ("flex + F", "fwd"), ("flex + F", "fwd+bwd")]
    check_rows(rows, bounds)
    # flex's backward: torch 2.13 refuses it on CPU; a version that has it is checked above
    flex_bwd = rows[-1]
    assert (flex.backward_error is None) == (flex_bwd.grad_error is not None)
    if flex.backward_error is not None:
        assert "NotImplementedError" in flex.backward_error and "backward" in flex.backward_error
    # every timed operation runs (its result is not kept, so it is checked above, untimed)
    assert len(ops) == sum(r.out_error is not None for r in rows)
    for op in ops:
        op.run(op.setup() if op.setup else None)


def test_the_check_catches_a_wrong_mask():
    """F not shifted one query down (each query would mask with its own selection): the flex
    row's check must fail, by orders of magnitude."""
    N = 40
    q, k, v, dout = inputs(N, seed=N)
    bounds = Bounds(q, k, v, dout)
    F = tc.precomputed_mask(q, k)
    unshifted = torch.cat([F[:, 1:], F[:, -1:]], dim=1)          # row i: sum over m <= i
    flex = tc.flex_function("eager")
    block_mask = tc.causal_block_mask(N)
    right = tc.forward(lambda a, b, c: tc.flex_selective_attention(flex, a, b, c, F, block_mask),
                       q, k, v)
    wrong = tc.forward(lambda a, b, c: tc.flex_selective_attention(
        flex, a, b, c, unshifted, block_mask), q, k, v)
    assert tc.max_abs_error(right, bounds.out) <= bounds.out_atol()
    assert tc.max_abs_error(wrong, bounds.out) > 100 * bounds.out_atol()


def test_compiled_flex_computes_the_reference():
    """The one compiled case: torch.compile(flex_attention) on CPU at N = 32, output against
    the reference; its compile time is measured."""
    N = 32
    q, k, v, dout = inputs(N, seed=3)
    bounds = Bounds(q, k, v, dout)
    flex = tc.prepare_flex("compiled", q, k, v, dout)
    assert flex.compile_seconds is not None and flex.compile_seconds > 0
    out = tc.forward(tc.flex_attention_with_f(flex.flex, flex.block_mask), q, k, v)
    assert tc.max_abs_error(out, bounds.out) <= bounds.out_atol()


def test_the_benchmark_prints_its_table(capsys):
    tc.main(["--sizes", "16", "--batch", "1", "--heads", "2", "--dim", "8", "--threads", "1",
             "--repeats", "1", "--warmup", "0", "--flex", "eager"])
    out = capsys.readouterr().out
    assert "load average (1 min) at start" in out and "load average (1 min) at end" in out
    assert "| N | method | timed | median ms |" in out
    table = [line for line in out.splitlines() if re.match(r"\| 16 \|", line)]
    assert len(table) == 10
    bridge_fwd = table[0].split("|")
    assert bridge_fwd[2].strip() == "bridge" and bridge_fwd[7].strip() == "1.00"
    flex_bwd = table[-1].split("|")
    assert flex_bwd[2:4] == [" flex + F ", " fwd+bwd "]
    assert "not supported: NotImplementedError" in flex_bwd[10] or flex_bwd[4].strip() != "-"


@pytest.mark.parametrize("call, match", [
    (lambda: tc.make_inputs(torch, 1, 2, 0, 8), "N must be a positive int"),
    (lambda: tc.make_inputs(torch, 1, 2.0, 4, 8), "H must be a positive int"),
    (lambda: tc.causal_block_mask(0), "N must be a positive int"),
    (lambda: tc.flex_function("jit"), "'compiled' or 'eager'"),
    (lambda: tc.max_abs_error(torch.zeros(2), torch.zeros(3)), "shapes differ"),
])
def test_bad_arguments_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("argv", [["--sizes", "0"], ["--sizes", "a"], ["--heads", "0"],
                                  ["--flex", "jit"], ["--min-time", "-1"]])
def test_bad_command_lines_are_refused(argv):
    with pytest.raises(SystemExit):
        tc.parse_args(argv)
