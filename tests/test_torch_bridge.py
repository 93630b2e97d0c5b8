"""The PyTorch bridge (selattn_c.torch, selattn_lm.torch_model, examples/torch_*.py).

Skipped without torch (``pip install '.[torch]'``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
import selattn_lm

torch = pytest.importorskip("torch")

import selattn_c  # noqa: E402
import selattn_c.torch as sat  # noqa: E402
from selattn_lm import training
from selattn_lm.task_assign import AssignTask  # noqa: E402
from selattn_bench.kernels import torch_selective_attention  # noqa: E402
from selattn_lm.runner import ModelRunner  # noqa: E402
from selattn_lm.torch_model import TinyLM  # noqa: E402
from selattn_lm.torch_model import train as torch_train  # noqa: E402
from selattn_reference import attention as ref  # noqa: E402
from selattn_lm import model as M  # noqa: E402

from helpers import assert_float32_grads_close, qkv_cases  # noqa: E402
from tolerances import (  # noqa: E402
    REORDERED_FLOAT64,
    TORCH_MODEL_RTOL,
    TORCH_SDPA_FACTOR,
    TORCH_TRAINING_CURVE_RTOL,
    c_float32_atol,
    selector_kink_margin,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(selattn_lm.__file__).with_name("data")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread for the kernels and torch: these calls are tiny, and on a busy 2-core machine
    waiting threads make them 100x slower (results are the same for any count)."""
    before, before_torch = selattn_c.get_num_threads(), torch.get_num_threads()
    selattn_c.set_num_threads(1)
    torch.set_num_threads(1)
    yield
    selattn_c.set_num_threads(before)
    torch.set_num_threads(before_torch)


def f32(case):
    return tuple(np.asarray(x, dtype=np.float32) for x in (case.q, case.k, case.v))


def layout(x: np.ndarray, kind: str):
    """A tensor holding x's values, contiguous or not."""
    if kind == "contiguous":
        return torch.from_numpy(x.copy())
    if kind == "transposed":
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).transpose(1, 2)
    big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), np.float32)
    big[..., ::2] = x
    return torch.from_numpy(big)[..., ::2]


def near_kink(q, k, s: int, scale: float) -> bool:
    N, D = q.shape[2], q.shape[3]
    qs, ks = q[:, s].astype(np.float64), k[:, s].astype(np.float64)
    logits = scale * (qs @ ks.swapaxes(-1, -2))
    size = scale * (np.abs(qs) @ np.abs(ks).swapaxes(-1, -2))
    below = np.tri(N, k=-1, dtype=bool)
    return bool((np.abs(logits) <= selector_kink_margin(D) * size)[:, below].any())


# ----------------------------------------------------------------------------------------------
# The function against the kernels and the reference


@given(case=qkv_cases(max_N=70, max_D=16), kind=st.sampled_from(["contiguous", "transposed",
                                                                  "strided"]))
def test_bridge_is_the_kernels_bitwise_for_any_layout(case, kind):
    q, k, v = f32(case)
    dout = np.random.default_rng(case.seed).standard_normal(q.shape).astype(np.float32)
    # the bridge's custom operator runs the exact kernels (no dead-key skipping: its backward
    # reads the forward's saved rows), so compare with those
    out_c, ctx = selattn_c.forward(q, k, v, dead_key_threshold=None, **case.options())
    dq_c, dk_c, dv_c = selattn_c.backward(dout, ctx)
    qt, kt, vt = (layout(x, kind).requires_grad_(True) for x in (q, k, v))
    out = sat.selective_attention(qt, kt, vt, **case.options())
    out.backward(torch.from_numpy(dout))
    assert out.dtype == torch.float32 and out.shape == q.shape
    np.testing.assert_array_equal(out.detach().numpy(), out_c)
    for t, want in ((qt, dq_c), (kt, dk_c), (vt, dv_c)):
        np.testing.assert_array_equal(t.grad.numpy(), want)


@given(case=qkv_cases(max_N=60, max_D=16))
def test_bridge_gradients_match_the_float64_reference(case):
    """gradcheck in spirit: the bridge's vector-Jacobian products against the reference's
    analytic backward in float64 (itself checked by finite differences), within the kernels'
    float32 bound; inputs with a selector logit at relu's kink are skipped."""
    q, k, v = f32(case)
    D = q.shape[-1]
    assume(not (case.selective and near_kink(q, k, case.selector_head, 1 / np.sqrt(D))))
    dout = np.random.default_rng(case.seed).standard_normal(q.shape).astype(np.float32)
    q64, k64, v64, d64 = (x.astype(np.float64) for x in (q, k, v, dout))
    out_ref, cache = ref.forward(q64, k64, v64, **case.options())
    grads_ref = ref.backward(d64, cache)
    qt, kt, vt = (torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))
    out = sat.selective_attention(qt, kt, vt, **case.options())
    out.backward(torch.from_numpy(dout))
    N = q.shape[2]
    bound = dict(logit_max=float(np.abs(cache.L[..., np.tri(N, dtype=bool)]).max()),
                 mask_max=float(cache.F.max()), N=N, D=D)
    natural = {"out": np.abs(v).max(), "dv": np.abs(dout).max(),
               "dq": cache.scale * np.abs(k).max() * np.abs(dout).max() * np.abs(v).max(),
               "dk": cache.scale * np.abs(q).max() * np.abs(dout).max() * np.abs(v).max()}
    pairs = [("out", out.detach(), out_ref), ("dq", qt.grad, grads_ref[0]),
             ("dk", kt.grad, grads_ref[1]), ("dv", vt.grad, grads_ref[2])]
    for name, got, want in pairs:
        atol = c_float32_atol(max(float(np.abs(want).max()), float(natural[name])), **bound)
        assert float(np.abs(got.numpy() - want).max()) <= atol, name


@given(case=qkv_cases(max_N=60, max_D=16, selective=False))
def test_not_selective_is_causal_sdpa(case):
    q, k, v = f32(case)
    dout = torch.from_numpy(np.random.default_rng(case.seed).standard_normal(q.shape)
                            .astype(np.float32))
    a = [torch.from_numpy(x).requires_grad_(True) for x in (q, k, v)]
    b = [torch.from_numpy(x.copy()).requires_grad_(True) for x in (q, k, v)]
    out = sat.selective_attention(*a, selective=False, protect_bos=case.protect_bos)
    out.backward(dout)
    out_sdpa = torch.nn.functional.scaled_dot_product_attention(*b, is_causal=True)
    out_sdpa.backward(dout)
    _, cache = ref.forward(*(x.astype(np.float64) for x in (q, k, v)), selective=False)
    N, D = q.shape[2], q.shape[3]
    bound = dict(logit_max=float(np.abs(cache.L[..., np.tri(N, dtype=bool)]).max()),
                 mask_max=0.0, N=N, D=D)
    for x, y in [(out.detach(), out_sdpa.detach())] + [(s.grad, t.grad) for s, t in zip(a, b)]:
        mag = max(float(y.abs().max()), float(np.abs(v).max()) * float(dout.abs().max()))
        assert float((x - y).abs().max()) <= TORCH_SDPA_FACTOR * c_float32_atol(mag, **bound)


def test_mask_and_memory_loss_in_torch_match_the_reference():
    rng = np.random.default_rng(3)
    q, k = (rng.standard_normal((2, 3, 17, 5)) for _ in range(2))
    F_ref = ref.accumulated_mask(q, k, selector_head=1)
    qt, kt = (torch.from_numpy(x).requires_grad_(True) for x in (q, k))
    F = sat.accumulated_mask(qt, kt, selector_head=1)
    np.testing.assert_allclose(F.detach().numpy(), F_ref, rtol=REORDERED_FLOAT64,
                               atol=REORDERED_FLOAT64)
    mem = sat.memory_loss(F, tau=1.5)
    np.testing.assert_allclose(mem.detach().numpy(), ref.memory_loss(F_ref, 1.5),
                               rtol=REORDERED_FLOAT64)
    dmem = np.array([0.7, -1.3])
    mem.backward(torch.from_numpy(dmem))
    dF = ref.memory_loss_backward(dmem, F_ref, 1.5)
    L_sel = (q[:, 1] @ k[:, 1].swapaxes(-1, -2)) / np.sqrt(5)
    dL = ref.accumulated_mask_backward(dF, L_sel, True)
    np.testing.assert_allclose(qt.grad[:, 1].numpy(), dL @ k[:, 1] / np.sqrt(5),
                               atol=REORDERED_FLOAT64)
    np.testing.assert_allclose(kt.grad[:, 1].numpy(), dL.swapaxes(-1, -2) @ q[:, 1] / np.sqrt(5),
                               atol=REORDERED_FLOAT64)
    assert float(qt.grad[:, 0].abs().max()) == 0.0         # only the selector head gets it


# ----------------------------------------------------------------------------------------------
# What it refuses


def qkv(*shape, **kw):
    return [torch.randn(*shape, **kw) for _ in range(3)]


@pytest.mark.parametrize("make, error, match", [
    (lambda: [np.zeros((1, 1, 4, 2), np.float32)] * 3, TypeError, "query must be a torch.Tensor"),
    (lambda: qkv(1, 1, 4, 2, device="meta"), ValueError, r"query\.cpu\(\)"),
    (lambda: qkv(1, 1, 4, 2, dtype=torch.float16), TypeError, r"float32.*query\.float\(\)"),
    (lambda: qkv(1, 1, 4, 2, dtype=torch.bfloat16), TypeError, "float32"),
    (lambda: [torch.zeros(1, 1, 4, 2, dtype=torch.int32)] * 3, TypeError, "float32"),
    (lambda: qkv(1, 4, 2), ValueError, "at least one batch dimension"),
    (lambda: qkv(1, 1, 4, 2)[:2] + [torch.randn(1, 1, 5, 2)], ValueError, "value has 5 tokens"),
    (lambda: qkv(1, 1, 0, 2), ValueError, ">= 1"),
    (lambda: [torch.full((1, 1, 4, 2), float("nan"))] * 3, ValueError, "NaN"),
    (lambda: [torch.randn(1, 1, 4, 2).to_sparse()] * 3, TypeError, "dense"),
])
def test_bad_inputs_are_refused_naming_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        sat.selective_attention(*make())


def test_budget_with_grad_is_refused_but_works_without():
    q, k, v = qkv(1, 2, 20, 4, requires_grad=True)
    with pytest.raises(ValueError, match="no backward"):
        sat.selective_attention(q, k, v, budget=4)
    with torch.no_grad():
        out = sat.selective_attention(q, k, v, budget=4)
    want, _ = selattn_c.forward(q.detach().numpy(), k.detach().numpy(), v.detach().numpy(),
                                budget=4)
    np.testing.assert_array_equal(out.numpy(), want)


def test_double_backward_in_place_changes_and_options_are_refused():
    q, k, v = qkv(1, 2, 8, 4, requires_grad=True)
    out = sat.selective_attention(q, k, v)
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
    x = q * 1.0
    out = sat.selective_attention(x, k, v)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()
    with pytest.raises(ValueError, match="selector_head"):
        sat.selective_attention(q, k, v, selector_head=2)
    with pytest.raises(TypeError, match="budget"):
        sat.selective_attention(*qkv(1, 1, 4, 2), budget=2.5)
    nan = torch.full_like(out, float("nan"))
    out = sat.selective_attention(q, k, v)
    with pytest.raises(ValueError, match="NaN"):
        out.backward(nan)


@given(dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64]),
       shapes=st.lists(st.lists(st.integers(0, 5), min_size=2, max_size=5), min_size=3,
                       max_size=3),
       transpose=st.booleans(), grad=st.booleans(), budget=st.sampled_from([None, 0, 2, 3]),
       head=st.integers(-1, 3), bad=st.sampled_from([None, "nan", "inf"]))
def test_any_input_raises_or_returns_never_crashes(dtype, shapes, transpose, grad, budget, head,
                                                   bad):
    tensors = []
    for shape in shapes:
        t = torch.zeros(shape, dtype=dtype) if dtype == torch.int64 else torch.randn(shape).to(dtype)
        if bad and t.numel() and t.is_floating_point():
            t.view(-1)[0] = float(bad)
        if transpose and t.dim() >= 2:
            t = t.transpose(0, 1)
        if grad and t.is_floating_point():
            t.requires_grad_(True)
        tensors.append(t)
    try:
        out = sat.selective_attention(*tensors, budget=budget, selector_head=head)
    except (TypeError, ValueError):
        return
    if out.requires_grad:
        out.sum().backward()
    assert out.shape == tensors[0].shape[:-1] + tensors[2].shape[-1:]


# ----------------------------------------------------------------------------------------------
# Modules and autograd through a model


def test_modules():
    q, k, v = qkv(2, 3, 10, 4)
    m = sat.SelectiveAttention(selector_head=2, scale=0.3)
    assert list(m.parameters()) == []
    np.testing.assert_array_equal(m(q, k, v).numpy(),
                                  sat.selective_attention(q, k, v, selector_head=2,
                                                          scale=0.3).numpy())
    with pytest.raises(ValueError, match="budget"):
        sat.SelectiveAttention(budget=1)
    with pytest.raises(ValueError, match="divisible"):
        sat.SelectiveSelfAttention(10, 3)
    with pytest.raises(ValueError, match="out of range"):
        sat.SelectiveSelfAttention(8, 2, selector_head=2)
    layer = sat.SelectiveSelfAttention(8, 2)
    y = layer(torch.randn(3, 7, 8))
    assert y.shape == (3, 7, 8)
    y.square().sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in layer.parameters())
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        layer(torch.randn(3, 7, 9))


class TwoBlocks(torch.nn.Module):
    """A small GPT-like model: embedding, two pre-LN blocks of SelectiveSelfAttention + MLP."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(11, 16)
        self.ln = torch.nn.ModuleList(torch.nn.LayerNorm(16) for _ in range(2))
        self.attn = torch.nn.ModuleList(sat.SelectiveSelfAttention(16, 4) for _ in range(2))
        self.mlp = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(16, 32),
                                                           torch.nn.GELU(),
                                                           torch.nn.Linear(32, 16))
                                       for _ in range(2))
        self.head = torch.nn.Linear(16, 11)

    def forward(self, tokens):
        x = self.emb(tokens)
        for ln, attn, mlp in zip(self.ln, self.attn, self.mlp):
            x = x + attn(ln(x))
            x = x + mlp(x)
        return self.head(x)


def test_loss_backward_through_a_small_model_matches_eager_float64(monkeypatch):
    """The same model with the paper's listing (eager torch) for attention, in float64: every
    parameter's gradient agrees within float32 rounding."""
    tokens = torch.randint(0, 11, (3, 12), generator=torch.Generator().manual_seed(1))
    model = TwoBlocks()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)                                 # larger weights: a live selector
    loss = torch.nn.functional.cross_entropy(model(tokens).reshape(-1, 11), tokens.reshape(-1))
    loss.backward()
    twin = TwoBlocks().double()
    twin.load_state_dict({n: p.double() for n, p in model.state_dict().items()})

    def eager(q, k, v, *, selector_head, protect_bos, selective, scale, budget):
        return torch_selective_attention(q, k, v, selector_head=selector_head,
                                         protect_bos=protect_bos, scale=scale)
    monkeypatch.setattr(sat, "selective_attention", eager)
    loss64 = torch.nn.functional.cross_entropy(twin(tokens).reshape(-1, 11), tokens.reshape(-1))
    loss64.backward()
    assert loss.item() == pytest.approx(loss64.item(), rel=TORCH_MODEL_RTOL)
    grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    grads64 = {n: p.grad.numpy() for n, p in twin.named_parameters()}
    assert_float32_grads_close(grads, grads64, TORCH_MODEL_RTOL)


# ----------------------------------------------------------------------------------------------
# The tiny LM in torch against the NumPy model

CFG = M.ModelConfig(vocab_size=20, context=32, n_layers=2, n_heads=4, d_model=32, eps=1.0)


@pytest.mark.parametrize("selective", [True, False])
def test_torch_port_step0_loss_and_gradients_match_the_numpy_model(selective):
    cfg = M.ModelConfig(**dict(CFG.to_dict(), selective=selective))
    rng = np.random.default_rng(0)
    params = M.init_params(cfg, seed=0)
    for p in params.values():
        p += (0.2 * rng.standard_normal(p.shape)).astype(np.float32)
    tokens = rng.integers(1, cfg.vocab_size, (8, cfg.context + 1))
    tok, tgt = tokens[:, :-1], tokens[:, 1:]
    tok[:2, -5:] = M.PAD                               # PAD rows in the memory loss
    mask = rng.random(tok.shape) < 0.6
    p64 = {n: p.astype(np.float64) for n, p in params.items()}
    logits, losses, cache = M.forward(p64, cfg, tok, tgt, mask)
    grads = M.backward(cache)
    model = TinyLM.from_reference(params, cfg)
    np.testing.assert_array_equal(model.reference_params()["h0.attn.wqkv"],
                                  params["h0.attn.wqkv"])
    logits_t, losses_t = model(tok, tgt, mask)
    losses_t["total"].backward()
    np.testing.assert_allclose(logits_t.detach().numpy(), logits,
                               atol=TORCH_MODEL_RTOL * np.abs(logits).max())
    for key in losses:
        assert losses_t[key].item() == pytest.approx(losses[key], rel=TORCH_MODEL_RTOL, abs=1e-6)
    if selective:
        assert losses["mem"] > 0.05              # the memory loss' gradient is compared too
    assert_float32_grads_close(model.reference_grads(), grads, TORCH_MODEL_RTOL)


def test_torch_training_run_follows_the_numpy_run():
    cfg = training.TrainConfig(task=AssignTask(n_assignments=6, heldout_size=40), batch_size=16,
                               steps=12, eval_every=4, warmup_steps=3)
    _, _, log = training.train(cfg, backend="c", quiet=True)
    _, tlog = torch_train(cfg)
    assert log["curve"][-1]["loss"] < log["curve"][0]["loss"] - 0.05
    assert len(log["curve"]) == len(tlog["curve"]) == 3
    for a, b in zip(log["curve"], tlog["curve"]):
        assert a["step"] == b["step"]
        for key in ("loss", "ce", "mem"):
            assert b[key] == pytest.approx(a[key], rel=TORCH_TRAINING_CURVE_RTOL), key
        assert b["heldout_accuracy"] == a["heldout_accuracy"]
    with pytest.raises(ValueError, match="soft_budgets"):
        torch_train(training.TrainConfig(soft_budgets=[4, 4], steps=1))


# ----------------------------------------------------------------------------------------------
# Decoding with the pruned KV cache


@given(case=qkv_cases(max_N=50, max_D=8, max_B=2, max_H=3), data=st.data())
def test_kv_cache_step_by_step_equals_prefill_and_the_budgeted_forward(case, data):
    q, k, v = (torch.from_numpy(x) for x in f32(case))
    B, H, N, D = q.shape
    smallest = 2 if case.protect_bos else 1
    budget = data.draw(st.one_of(st.none(), st.integers(smallest, N + 2)))
    opts = case.options()
    want = sat.selective_attention(q, k, v, budget=budget, **opts)
    with sat.TorchKVCache(B, H, D, budget, **opts) as c1, sat.TorchKVCache(B, H, D, budget,
                                                                            **opts) as c2:
        pre = c1.prefill(q, k, v)
        steps = torch.stack([c2.step(q[:, :, i], k[:, :, i], v[:, :, i]) for i in range(N)],
                            dim=2)                                         # (B, H, N, D)
        assert c1.length == c2.length == N
        assert torch.equal(c1.size, c2.size)
        if budget is not None:
            assert int(c1.size.max()) <= budget
    _, cache = ref.forward(*(x.numpy().astype(np.float64) for x in (q, k, v)), **opts)
    atol = c_float32_atol(float(v.abs().max()),
                          logit_max=float(np.abs(cache.L[..., np.tri(N, dtype=bool)]).max()),
                          mask_max=float(cache.F.max()), N=N, D=D)
    assert float((pre - want).abs().max()) <= atol
    assert float((steps - want).abs().max()) <= atol


def test_kv_cache_refuses_grad_and_bad_tensors():
    c = sat.TorchKVCache(1, 2, 4, budget=8)
    q = torch.randn(1, 2, 4, requires_grad=True)
    with pytest.raises(ValueError, match="no_grad"):
        c.step(q, q, q)
    with pytest.raises(TypeError, match="float32"):
        c.step(*(torch.randn(1, 2, 4, dtype=torch.float64),) * 3)
    with pytest.raises(ValueError, match="3 dimensions"):
        c.step(*(torch.randn(1, 2, 1, 4),) * 3)
    with torch.no_grad():
        c.step(q, q, q)
    assert c.length == 1


def test_model_decoding_token_by_token_equals_the_forward():
    rng = np.random.default_rng(4)
    params = M.init_params(CFG, seed=4)
    for p in params.values():
        p += (0.3 * rng.standard_normal(p.shape)).astype(np.float32)
    model = TinyLM.from_reference(params, CFG)
    tokens = rng.integers(1, CFG.vocab_size, (2, 20))
    for budgets in (None, [6, 3]):
        with torch.no_grad():
            whole, _ = model(tokens, budgets=budgets)                      # (B, N, V)
            caches = model.new_caches(2, budgets)
            first, _ = model(tokens[:, :5], caches=caches)                 # a 5-token prefill
            rest = [model(tokens[:, i:i + 1], caches=caches)[0] for i in range(5, 20)]
        decoded = torch.cat([first] + rest, dim=1)
        scale = float(whole.abs().max())
        assert float((decoded - whole).abs().max()) <= TORCH_MODEL_RTOL * scale
        runner = ModelRunner(params, CFG)
        np.testing.assert_allclose(decoded.numpy(), runner.logits(tokens, budgets),
                                   atol=TORCH_MODEL_RTOL * scale)


def test_generation_with_the_bundled_model_equals_the_numpy_runner():
    runner = ModelRunner.load(DATA / "selective.npz")
    model = TinyLM.from_reference(runner.params, runner.cfg)
    budgets = json.loads((DATA / "selective.budgets.json").read_text())["budgets"]
    stop = runner.tokenizer.encode(";")[0]
    for prompt, answer in runner.heldout(20):
        tokens = runner.encode(prompt)
        new = model.generate(torch.from_numpy(tokens), 3, budgets=budgets, stop_token=stop)
        np.testing.assert_array_equal(new.numpy(), runner.generate(tokens, 3, budgets, stop))


# ----------------------------------------------------------------------------------------------
# The examples


def run_example(name: str, *args: str, timeout: int = 600) -> str:
    script = ROOT / "examples" / name
    if not script.exists():
        pytest.skip("examples/ is not next to the tests")
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT / "examples")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_ddp_with_two_gloo_processes_on_localhost():
    report = json.loads(run_example("torch_ddp.py", "--world-size", "2", "--steps", "4")
                        .strip().splitlines()[-1])
    assert report["address"].startswith("127.0.0.1:")
    assert report["max_param_diff_between_ranks"] == 0.0
    assert report["max_curve_rel_diff"] <= TORCH_TRAINING_CURVE_RTOL
    assert report["ddp_curve"][-1] < report["ddp_curve"][0]


def test_generation_and_bench_examples_run():
    out = run_example("torch_generate.py", "--n", "10")
    assert out.count("answers equal to the NumPy runner's: 10/10") == 2
    out = run_example("torch_bench.py", "--sizes", "64", "--repeats", "1", "--min-time", "0",
                      "--threads", "1")
    assert "bridge / SDPA" in out
