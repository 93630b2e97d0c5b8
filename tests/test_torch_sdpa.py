"""selattn_c.torch.selective_attention as a drop-in for scaled_dot_product_attention: SDPA's
arguments, grouped-query attention, leading batch dimensions, Dv != D, float64 (gradcheck,
gradgradcheck), the custom operators (opcheck) and torch.compile(fullgraph=True).

Skipped without torch (``pip install '.[torch]'``)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import selattn_c  # noqa: E402
import selattn_c.torch as sat  # noqa: E402
from selattn_c import torch_ops  # noqa: E402
from selattn_reference import attention as ref  # noqa: E402

from helpers import assert_float32_grads_close, budgets, qkv_cases  # noqa: E402
from tolerances import (  # noqa: E402
    REORDERED_FLOAT64,
    TORCH_MODEL_RTOL,
    TORCH_SDPA_FACTOR,
    c_float32_atol,
)

SDPA = torch.nn.functional.scaled_dot_product_attention


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread for the kernels and torch (tiny calls; the results do not depend on it)."""
    before, before_torch = selattn_c.get_num_threads(), torch.get_num_threads()
    selattn_c.set_num_threads(1)
    torch.set_num_threads(1)
    yield
    selattn_c.set_num_threads(before)
    torch.set_num_threads(before_torch)


def randn(*shape, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


def reference(q, k, v, **options):
    """float64 (out, P) of the spec for tensors q, k (B, H, N, D) and v (B, H, N, Dv): out = P v,
    with P from ``selattn_reference.forward`` (which needs Dv = D, so it gets q as v)."""
    q64, k64 = (x.detach().double().numpy() for x in (q, k))
    _, cache = ref.forward(q64, k64, q64, **options)
    return cache.P @ v.detach().double().numpy(), cache


# ----------------------------------------------------------------------------------------------
# SDPA's signature and what it refuses


def test_signature_is_sdpas_then_selective_options():
    params = list(inspect.signature(sat.selective_attention).parameters.values())
    names = [p.name for p in params]
    assert names[:8] == ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                         "enable_gqa"]
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params[:8])
    assert all(p.kind == p.KEYWORD_ONLY for p in params[8:])
    assert names[8:12] == ["selector_head", "protect_bos", "selective", "budget"]


def test_a_positional_sdpa_call_gives_sdpa_when_not_selective():
    q, k, v = (randn(2, 3, 9, 4, seed=s) for s in range(3))
    # SDPA's own scale and enable_gqa are keyword-only; selective_attention takes them either way
    got = sat.selective_attention(q, k, v, None, 0.0, True, 0.7, False, selective=False)
    assert torch.equal(got, sat.selective_attention(q, k, v, None, 0.0, True, scale=0.7,
                                                    enable_gqa=False, selective=False))
    want = SDPA(q, k, v, None, 0.0, True, scale=0.7, enable_gqa=False)
    _, cache = reference(q, k, v, selective=False, scale=0.7)
    bound = c_float32_atol(float(v.abs().max()), logit_max=float(np.abs(
        cache.L[np.isfinite(cache.L)]).max()), mask_max=0.0, N=9, D=4)
    assert float((got - want).abs().max()) <= TORCH_SDPA_FACTOR * bound


@pytest.mark.parametrize("kwargs, match", [
    (dict(attn_mask=torch.ones(6, 6, dtype=torch.bool)), "attn_mask must be None"),
    (dict(dropout_p=0.1), "dropout is not implemented"),
    (dict(is_causal=False), "causal by definition"),
])
def test_sdpa_options_it_cannot_honour_are_refused(kwargs, match):
    q, k, v = (randn(1, 2, 6, 4, seed=s) for s in range(3))
    with pytest.raises(ValueError, match=match):
        sat.selective_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("shapes, kwargs, error, match", [
    (((1, 4, 6, 8), (1, 2, 6, 8), (1, 2, 6, 8)), {}, ValueError, "enable_gqa=True"),
    (((1, 4, 6, 8), (1, 3, 6, 8), (1, 3, 6, 8)), dict(enable_gqa=True), ValueError, "dividing"),
    (((1, 4, 6, 8), (1, 2, 6, 8), (1, 4, 6, 8)), dict(enable_gqa=True), ValueError,
     "key has 2 heads but value has 4"),
    (((1, 2, 6, 8), (1, 2, 7, 8), (1, 2, 7, 8)), {}, ValueError, "self-attention"),
    (((1, 2, 6, 8), (1, 2, 6, 5), (1, 2, 6, 8)), {}, ValueError, "key's last dimension"),
    (((2, 6, 8),) * 3, {}, ValueError, "at least one batch dimension"),
    (((2, 1, 2, 6, 8), (1, 2, 2, 6, 8), (1, 2, 2, 6, 8)), {}, ValueError, "batch dimensions"),
    (((1, 4, 6, 8),) * 3, dict(enable_gqa=True, selector_head=4), ValueError, "selector_head"),
])
def test_shapes_it_cannot_take_are_refused(shapes, kwargs, error, match):
    q, k, v = (randn(*s, seed=i) for i, s in enumerate(shapes))
    with pytest.raises(error, match=match):
        sat.selective_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions_are_refused_not_cast(dtype):
    q, k, v = (randn(1, 2, 6, 4, seed=s).to(dtype) for s in range(3))
    with pytest.raises(TypeError, match=r"query\.float\(\)"):
        sat.selective_attention(q, k, v)
    with pytest.raises(TypeError, match="one dtype"):
        sat.selective_attention(q.float(), k.double(), v.float())


# ----------------------------------------------------------------------------------------------
# Grouped-query attention, batch dimensions, Dv != D


@pytest.mark.parametrize("selector_head", [0, 1, 3, 5])
def test_gqa_query_head_h_reads_kv_head_h_over_group_and_the_selector_uses_its_pair(
        selector_head):
    """H = 6 query heads over H_kv = 2 key/value heads (groups of 3): query head h reads
    key/value head h // 3, as SDPA's enable_gqa; the selector is query head ``selector_head``
    with key head ``selector_head // 3``. Checked against the float64 spec on repeated k, v, for
    the output and the gradients (those of k and v summed over each group)."""
    q = randn(2, 6, 11, 4, seed=1, grad=True) * 2.0
    k = randn(2, 2, 11, 4, seed=2, grad=True) * 2.0
    v = randn(2, 2, 11, 4, seed=3, grad=True)
    q.retain_grad(), k.retain_grad()
    out = sat.selective_attention(q, k, v, enable_gqa=True, selector_head=selector_head)
    dout = randn(2, 6, 11, 4, seed=4)
    out.backward(dout)
    q64, k64, v64 = (x.detach().double().numpy() for x in (q, k, v))
    k_rep, v_rep = (np.repeat(x, 3, axis=1) for x in (k64, v64))          # head h -> h // 3
    want, cache = ref.forward(q64, k_rep, v_rep, selector_head=selector_head)
    dq, dk_rep, dv_rep = ref.backward(dout.double().numpy(), cache)
    dk, dv = (x.reshape(2, 2, 3, 11, 4).sum(axis=2) for x in (dk_rep, dv_rep))
    bound = dict(logit_max=float(np.abs(cache.L[np.isfinite(cache.L)]).max()),
                 mask_max=float(cache.F.max()), N=11, D=4)
    assert float(cache.F.max()) > 0                                        # a live selector
    # each gradient is a sum of products of at most these factors: their product bounds its terms
    natural = float((q.abs().max() * k.abs().max() * v.abs().max() * dout.abs().max()).detach())
    for got, exact in ((out, want), (q.grad, dq), (k.grad, dk), (v.grad, dv)):
        mag = max(float(np.abs(exact).max()), natural)
        assert float(np.abs(got.detach().numpy() - exact).max()) <= c_float32_atol(mag, **bound)
    # and it is not the other pairing (query head h with kv head h % H_kv)
    wrong, _ = ref.forward(q64, np.tile(k64, (1, 3, 1, 1)), np.tile(v64, (1, 3, 1, 1)),
                           selector_head=selector_head)
    assert float(np.abs(out.detach().numpy() - wrong).max()) > 1e-3


def test_gqa_not_selective_is_sdpas_gqa():
    q, k, v = randn(1, 4, 10, 8, seed=1), randn(1, 2, 10, 8, seed=2), randn(1, 2, 10, 8, seed=3)
    got = sat.selective_attention(q.double(), k.double(), v.double(), enable_gqa=True,
                                  selective=False)
    want = SDPA(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
    assert float((got - want).abs().max()) <= REORDERED_FLOAT64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_leading_batch_dims_are_flattened_batches(dtype):
    q, k, v = (randn(2, 3, 2, 7, 4, seed=s, dtype=dtype, grad=True) for s in range(3))
    out = sat.selective_attention(q, k, v, selector_head=1)
    out.backward(randn(2, 3, 2, 7, 4, seed=9, dtype=dtype))
    flat = [x.detach().reshape(6, 2, 7, 4).requires_grad_(True) for x in (q, k, v)]
    out_flat = sat.selective_attention(*flat, selector_head=1)
    out_flat.backward(randn(2, 3, 2, 7, 4, seed=9, dtype=dtype).reshape(6, 2, 7, 4))
    assert out.shape == (2, 3, 2, 7, 4)
    torch.testing.assert_close(out.detach().reshape(6, 2, 7, 4), out_flat.detach(), rtol=0,
                               atol=0)
    for x, y in zip((q, k, v), flat):
        torch.testing.assert_close(x.grad.reshape(6, 2, 7, 4), y.grad, rtol=0, atol=0)


@pytest.mark.parametrize("Dv", [1, 3, 8, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_dim_may_differ_from_d(Dv, dtype):
    """Dv < D pads v, Dv > D pads q and k (the default scale stays 1/sqrt(D)): against
    out = P v with P from the float64 spec."""
    q, k = randn(2, 3, 9, 5, seed=1, dtype=dtype) * 2, randn(2, 3, 9, 5, seed=2, dtype=dtype) * 2
    v = randn(2, 3, 9, Dv, seed=3, dtype=dtype)
    out = sat.selective_attention(q, k, v, selector_head=2)
    want, cache = reference(q, k, v, selector_head=2)
    assert out.shape == (2, 3, 9, Dv) and out.dtype == dtype
    err = float(np.abs(out.numpy() - want).max())
    if dtype == torch.float64:
        assert err <= REORDERED_FLOAT64
    else:
        assert err <= c_float32_atol(float(v.abs().max()), logit_max=float(np.abs(
            cache.L[np.isfinite(cache.L)]).max()), mask_max=float(cache.F.max()), N=9, D=5)


# ----------------------------------------------------------------------------------------------
# float64: the listing in torch operations, gradcheck and gradgradcheck


@given(case=qkv_cases(max_N=40, max_D=8))
def test_float64_is_the_spec(case):
    q, k, v = (torch.from_numpy(x) for x in (case.q, case.k, case.v))
    out = sat.selective_attention(q, k, v, **case.options())
    want, _ = ref.forward(case.q, case.k, case.v, **case.options())
    assert out.dtype == torch.float64
    assert float(np.abs(out.numpy() - want).max()) <= REORDERED_FLOAT64 * max(
        1.0, float(np.abs(case.v).max()))


@given(case=qkv_cases(max_N=30, max_D=6), data=st.data())
def test_float64_with_a_budget_is_the_spec(case, data):
    budget = data.draw(budgets(case.q.shape[2], case.protect_bos))
    q, k, v = (torch.from_numpy(x) for x in (case.q, case.k, case.v))
    out = sat.selective_attention(q, k, v, budget=budget, **case.options())
    want, _ = ref.forward(case.q, case.k, case.v, budget=budget, **case.options())
    np.testing.assert_array_equal(out.numpy(), want)


@pytest.mark.parametrize("kwargs", [
    dict(selector_head=1), dict(selective=False), dict(protect_bos=False, scale=0.9),
    dict(enable_gqa=True, selector_head=3), dict(value_dim=2),
])
def test_gradcheck_and_gradgradcheck_in_float64(kwargs):
    kwargs = dict(kwargs)
    H_kv = 2 if kwargs.get("enable_gqa") else 4
    Dv = kwargs.pop("value_dim", 3)
    q = randn(1, 4, 6, 3, seed=1, dtype=torch.float64, grad=True)
    k = randn(1, H_kv, 6, 3, seed=2, dtype=torch.float64, grad=True)
    v = randn(1, H_kv, 6, Dv, seed=3, dtype=torch.float64, grad=True)
    f = lambda q, k, v: sat.selective_attention(q, k, v, **kwargs)     # noqa: E731
    # away from relu's kink, where finite differences are meaningless (seeded inputs)
    s = kwargs.get("selector_head", 0)
    logits = (q[0, s] @ k[0, s // (4 // H_kv)].T).detach()                   # (N, N)
    assert float(logits.abs().min()) > 1e-3
    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))


def test_a_second_derivative_of_the_float32_path_is_refused():
    q, k, v = (randn(1, 2, 6, 4, seed=s, grad=True) for s in range(3))
    (g,) = torch.autograd.grad(sat.selective_attention(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_float64_nan_is_refused_unless_check_finite_is_off():
    q, k, v = (randn(1, 2, 6, 4, seed=s, dtype=torch.float64) for s in range(3))
    k[0, 1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="key contains NaN"):
        sat.selective_attention(q, k, v)
    assert torch.isnan(sat.selective_attention(q, k, v, check_finite=False)).any()


# ----------------------------------------------------------------------------------------------
# The custom operators and torch.compile


@pytest.mark.parametrize("selective, budget", [(True, None), (False, None), (True, 3)])
def test_the_operators_pass_opcheck(selective, budget):
    q, k, v = (randn(2, 3, 70, 4, seed=s) for s in range(3))
    args = (q, k, v, 1, True, selective, 0.5, budget, True)
    tests = ("test_schema", "test_faketensor")          # with a budget: no backward to check
    torch.library.opcheck(torch_ops.attention, args, **(dict(test_utils=tests) if budget else {}))
    if budget is None:
        out, lse, fstart = torch_ops.attention(*args)
        torch.library.opcheck(torch_ops.attention_backward,
                              (randn(2, 3, 70, 4, seed=5), q, k, v, out, lse, fstart, 1, True,
                               selective, 0.5, True), test_utils=tests)


def _compare_compiled(f, inputs, dout):
    """f eager and torch.compile(f, fullgraph=True) on copies of inputs: outputs and gradients."""
    torch._dynamo.reset()
    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        xs = [x.detach().clone().requires_grad_(True) for x in inputs]
        out = fn(*xs)
        out.backward(dout)
        results.append((out.detach(), [x.grad for x in xs]))
    (out, grads), (out_c, grads_c) = results
    torch.testing.assert_close(out_c, out, rtol=0, atol=0)
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g_c, g, rtol=1e-6, atol=1e-6)


def test_compile_fullgraph_of_the_function_equals_eager():
    """With GQA, extra batch dims and Dv != D, so the reshapes and pads are traced too."""
    q, k, v = randn(2, 2, 4, 9, 6, seed=1), randn(2, 2, 2, 9, 6, seed=2), randn(2, 2, 2, 9, 3,
                                                                                seed=3)

    def f(q, k, v):
        return sat.selective_attention(q, k, v, enable_gqa=True, selector_head=1)

    _compare_compiled(f, (q, k, v), randn(2, 2, 4, 9, 3, seed=4))


class TinyGPT(torch.nn.Module):
    """Embedding, two pre-LN blocks of SelectiveSelfAttention + MLP, a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(11, 16)
        self.ln = torch.nn.ModuleList(torch.nn.LayerNorm(16) for _ in range(2))
        self.attn = torch.nn.ModuleList(sat.SelectiveSelfAttention(16, 4) for _ in range(2))
        self.mlp = torch.nn.ModuleList(torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)) for _ in range(2))
        self.head = torch.nn.Linear(16, 11)

    def forward(self, tokens):
        x = self.emb(tokens)
        for ln, attn, mlp in zip(self.ln, self.attn, self.mlp):
            x = x + attn(ln(x))
            x = x + mlp(x)
        return self.head(x)


def test_compile_fullgraph_of_a_model_equals_eager():
    """The model eager and compiled (fullgraph), against its float64 twin (float64 attention is
    the listing in torch operations): Inductor fuses the layers around the attention its own way,
    so the two float32 runs differ by float32 rounding, each within TORCH_MODEL_RTOL of float64
    (loss; every gradient by norm), as in test_torch_bridge."""
    tokens = torch.randint(0, 11, (3, 12), generator=torch.Generator().manual_seed(1))
    model = TinyGPT()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)                                 # larger weights: a live selector
    twin = TinyGPT().double()
    twin.load_state_dict({n: p.double() for n, p in model.state_dict().items()})
    torch._dynamo.reset()
    runs = {}
    for name, m in (("eager", model), ("compiled", torch.compile(model, fullgraph=True)),
                    ("float64", twin)):
        m.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(tokens).reshape(-1, 11), tokens.reshape(-1))
        loss.backward()
        params = twin if name == "float64" else model
        runs[name] = (loss.item(), {n: p.grad.numpy().copy() for n, p in params.named_parameters()})
    loss64, grads64 = runs["float64"]
    for name in ("eager", "compiled"):
        loss, grads = runs[name]
        assert loss == pytest.approx(loss64, rel=TORCH_MODEL_RTOL), name
        assert_float32_grads_close(grads, grads64, TORCH_MODEL_RTOL)


def test_module_takes_sdpa_arguments():
    q, k, v = randn(1, 4, 8, 4, seed=1), randn(1, 2, 8, 4, seed=2), randn(1, 2, 8, 4, seed=3)
    m = sat.SelectiveAttention(selector_head=2)
    torch.testing.assert_close(m(q, k, v, None, 0.0, True, True),
                               sat.selective_attention(q, k, v, enable_gqa=True, selector_head=2),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="dropout"):
        m(q, k, v, dropout_p=0.5, enable_gqa=True)
