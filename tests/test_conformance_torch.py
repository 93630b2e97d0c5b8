"""The conformance kit's PyTorch adapter: torch functions and modules, as they are, are checked
(gradients included) and their mistakes named. Skipped without torch; CI runs this file with the
pinned CPU build (.ci/run)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from selattn_reference.conformance import check_cache, check_forward  # noqa: E402


def listing(q, k, v, mistake=None, detach_mask=False):
    """The paper's listing in torch (autograd gives the backward)."""
    N, D = q.shape[-2], q.shape[-1]
    logits = q @ k.transpose(-1, -2) / D ** 0.5
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    logits = logits.masked_fill(~causal, float("-inf"))
    S = logits[:, 0]
    S = S.masked_fill(~causal, 0.0) if mistake == "no-relu" else torch.relu(S)
    S = S.clone()
    S[..., 0] = 0.0
    S = S * (1 - torch.eye(N, dtype=q.dtype))
    S = torch.roll(S, 1, -2)
    S[..., 0, :] = 0.0
    F = torch.cumsum(S, dim=-2)
    if detach_mask:
        F = F.detach()
    return torch.softmax(logits - F[:, None], dim=-1) @ v


class ListingModule(torch.nn.Module):
    def forward(self, q, k, v):
        return listing(q, k, v)


@pytest.fixture(autouse=True)
def one_thread():
    """One thread for torch and the kernels: the calls are tiny, and OpenMP threads that wait
    for a busy core make them slow, not different."""
    import selattn_c

    built = selattn_c.extension_built()
    before, before_c = torch.get_num_threads(), built and selattn_c.get_num_threads()
    torch.set_num_threads(1)
    if built:
        selattn_c.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    if built:
        selattn_c.set_num_threads(before_c)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_torch_function_passes_with_its_gradients(dtype):
    report = check_forward(listing, torch=True, dtype=dtype)
    assert report.passed, report.render()
    gradients = {c.name: c for c in report.checks}["gradients"]
    assert gradients.status == "pass" and "12 cases" in gradients.found


def test_a_module_is_recognised_as_it_is():
    report = check_forward(ListingModule())
    assert report.passed, report.render()
    assert {c.name: c.status for c in report.checks}["gradients"] == "pass"


def test_the_c_kernels_through_the_torch_bridge_pass():
    import selattn_c

    if not selattn_c.extension_built():
        pytest.skip("the C extension is not built")
    from selattn_c.torch import SelectiveAttention, TorchKVCache, selective_attention

    report = check_forward(selective_attention, torch=True, dtype="float32",
                           selector_head="selector_head", protect_bos="protect_bos",
                           scale="scale")
    assert report.passed, report.render()
    assert check_forward(SelectiveAttention(), dtype="float32").passed
    report = check_cache(TorchKVCache, torch=True, dtype="float32")
    assert report.passed, report.render()


def test_a_torch_mistake_is_named():
    report = check_forward(lambda q, k, v: listing(q, k, v, mistake="no-relu"), torch=True)
    assert report.diagnosis == ("no-relu",)


def test_a_wrong_backward_fails_the_gradient_check_only():
    report = check_forward(lambda q, k, v: listing(q, k, v, detach_mask=True), torch=True)
    status = {c.name: c.status for c in report.checks}
    assert status.pop("gradients") == "FAIL", report.render()
    assert "FAIL" not in status.values()
    assert report.diagnosis == ()
    assert any(f.startswith("gradients: case") and "dq differs" in f for f in report.failures)


def test_a_function_that_returns_no_tensor_or_no_graph_is_reported():
    report = check_forward(lambda q, k, v: None, torch=True)
    assert "returned None" in report.failures[0]
    report = check_forward(lambda q, k, v: (q > 0).long(), torch=True)
    assert "returned dtype int64" in report.failures[0]
    report = check_forward(lambda q, k, v: listing(q, k, v).detach(), torch=True)
    assert any("does not require grad" in f for f in report.failures)
    report = check_cache(lambda B, H, D, K: object(), torch=True)
    assert "returned object, which has no step(q, k, v) method" in report.failures[0]


def test_cli_checks_a_module_object(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(textwrap.dedent("""
        import torch

        class Standard(torch.nn.Module):
            def forward(self, q, k, v):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        attention = Standard()
    """))
    result = subprocess.run([sys.executable, "-m", "selattn_reference", "check",
                             f"{path}:attention", "--torch"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  golden" in result.stdout and "verdict: NOT CONFORMANT" in result.stdout
    np.testing.assert_equal(result.stderr, "")
