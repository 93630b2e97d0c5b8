"""The conformance kit (selattn_reference.conformance, ``python -m selattn_reference check``):
correct implementations pass, each known mistake is named, other mistakes fail unnamed, broken
callables are reported in one line each, and the command's exit status says which.

The candidates live in tests/conformance_candidates.py, written independently of the reference.
"""

from __future__ import annotations

import filecmp
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import conformance_candidates as C
from selattn_reference import KVCache, forward
from selattn_reference.conformance import MISTAKES, check_cache, check_forward
from selattn_reference.conformance_cases import GOLDEN_DIR, random_cases
from selattn_reference.conformance_mistakes import FORWARD_LABELS, mistaken_output

CANDIDATES = Path(C.__file__).resolve()


def reference(q, k, v):
    return forward(q, k, v)[0]


# ----------------------------------------------------------------------------------------------
# Correct implementations pass


@pytest.mark.parametrize("fn", [reference, C.reference_port, C.float32_port],
                         ids=["reference", "listing-float64", "listing-float32"])
def test_correct_forwards_pass(fn):
    report = check_forward(fn)
    assert report.passed, report.render()
    assert report.failures == [] and report.diagnosis == ()
    assert {c.name: c.status for c in report.checks}["gradients"] == "skip"
    assert "verdict: CONFORMANT" in report.render()


@pytest.mark.parametrize("make", [KVCache, C.list_cache, C.list_cache_float32],
                         ids=["reference", "list-float64", "list-float32"])
def test_correct_caches_pass(make):
    report = check_cache(make)
    assert report.passed, report.render()


def test_options_are_passed_under_their_names():
    report = check_forward(C.with_options, selector_head="sel", protect_bos="keep_bos",
                           scale="softmax_scale")
    assert report.passed, report.render()
    options = {c.name: c for c in report.checks}["options"]
    assert options.status == "pass" and "4 cases" in options.found
    # the golden case with BOS unprotected runs only when the option is there
    assert "selector2_nobos" not in {c.name: c for c in report.checks}["golden"].found
    wrong = check_forward(C.with_options, selector_head="selector")
    assert not wrong.passed
    assert any("unexpected keyword argument 'selector'" in f for f in wrong.failures)


# ----------------------------------------------------------------------------------------------
# Known mistakes are named, others fail unnamed


@pytest.mark.parametrize("label", FORWARD_LABELS)
def test_each_forward_mistake_is_named(label):
    fn = getattr(C, label.replace("-", "_"))
    report = check_forward(fn)
    assert not report.passed
    assert report.diagnosis == (label,), report.render()
    text = report.render()
    assert MISTAKES[label].sentence in text and MISTAKES[label].line in text


@pytest.mark.parametrize("label", ["f-not-carried", "bos-evicted"])
def test_each_cache_mistake_is_named(label):
    report = check_cache(getattr(C, label.replace("-", "_")))
    assert not report.passed
    assert report.diagnosis == (label,), report.render()


def test_a_forward_mistake_in_a_cache_is_named_too():
    report = check_cache(C.cache_no_shift)
    assert report.diagnosis == ("no-shift",), report.render()
    wrong_scale = check_cache(lambda B, H, D, K: KVCache(B, H, D, K, scale=0.5 / np.sqrt(D)))
    assert not wrong_scale.passed and wrong_scale.diagnosis == ()


@pytest.mark.parametrize("fn, make", [(C.selector_only, None), (None, C.newest_on_ties)],
                         ids=["F-on-the-selector-only", "newest-evicted-on-ties"])
def test_other_mistakes_fail_without_a_label(fn, make):
    report = check_forward(fn) if fn is not None else check_cache(make)
    assert not report.passed and report.failures
    assert report.diagnosis == ()
    assert "none of the known mistakes explains the outputs" in report.render()


def test_the_mistakes_are_told_apart():
    """Each labelled mistake changes the output on the diagnosis cases, and no two single
    mistakes agree: otherwise a label could not be trusted."""
    cases = [c for c in random_cases() if c.name.startswith(("random-x0.5", "random-x1-"))]
    outputs = {}
    for label in ("",) + FORWARD_LABELS + ("f-not-carried",):
        outputs[label] = np.concatenate([mistaken_output(
            c.q, c.k, c.v, selector_head=0, protect_bos=True, scale=c.scale,
            mistakes=[label] if label else [])[0].ravel() for c in cases])
    labels = list(outputs)
    for a in range(len(labels)):
        for b in range(a + 1, len(labels)):
            gap = np.abs(outputs[labels[a]] - outputs[labels[b]]).max()
            assert gap > 1e-2, (labels[a], labels[b], gap)


@given(seed=st.integers(0, 2**32 - 1), budget=st.sampled_from([None, 2, 3, 6, 40]),
       protect_bos=st.booleans())
def test_no_mistake_is_the_reference(seed, budget, protect_bos):
    """The kit's own model of the layer (used for the diagnosis) is the reference when no mistake
    is made, with and without a budget."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((2, 3, 9, 4)) for _ in range(3))
    out, F = mistaken_output(q, k, v, selector_head=1, protect_bos=protect_bos, scale=0.6,
                             budget=budget)
    expected, cache = forward(q, k, v, selector_head=1, protect_bos=protect_bos, scale=0.6,
                              budget=budget)
    np.testing.assert_allclose(F, cache.F, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Broken callables are reported, never fatal


@pytest.mark.parametrize("fn, message", [
    (C.raises, "raised RuntimeError: CUDA out of memory (pretend)"),
    (C.wrong_shape, "returned shape (1, 2, 5, 4), expected (1, 2, 6, 4)"),
    (C.returns_tuple, "returned a tuple of 2"),
    (C.returns_list, "returned list"),
    (C.returns_nan, "returned NaN in 8 of 48 entries"),
    (lambda q, k, v: q.astype(np.int64), "returned dtype int64"),
    (lambda q, k, v: sys.exit(0), "raised SystemExit"),
], ids=["raises", "wrong-shape", "tuple", "list", "nan", "int", "sys-exit"])
def test_broken_functions_are_reported_in_one_line(fn, message):
    report = check_forward(fn)
    assert not report.passed
    assert len(report.failures) == 1 and message in report.failures[0], report.failures
    assert all(c.status == "skip" for c in report.checks[1:])


def test_a_hanging_function_times_out():
    report = check_forward(C.hangs, timeout=0.2)
    assert not report.passed
    assert "did not return within 0.2 s" in report.failures[0]


def test_a_cache_without_step_and_a_failing_step_are_reported():
    report = check_cache(C.no_step)
    assert "has no step(q, k, v) method" in report.failures[0]

    class Broken(C.ListCache):
        def step(self, q, k, v):
            return super().step(q, k, v)[:, :1] if self.position > 2 else super().step(q, k, v)

    report = check_cache(lambda B, H, D, K: Broken(B, H, D, K))
    assert "step 3 returned shape (1, 1, 4), expected (1, 2, 4)" in report.failures[0]


def test_a_failure_inside_one_check_is_a_finding_of_that_check():
    def fails_on_long_inputs(q, k, v):
        if q.shape[2] > 50:
            raise MemoryError("too long")
        return C.reference_port(q, k, v)

    report = check_forward(fails_on_long_inputs)
    status = {c.name: c.status for c in report.checks}
    assert status.pop("shapes") == "FAIL"
    assert set(status.values()) == {"pass", "skip"}, report.render()
    assert report.failures == ["shapes: case shape (1, 2, 64, 8) raised MemoryError: too long"]
    assert report.diagnosis == ()


def test_bad_arguments_of_the_api_raise():
    with pytest.raises(TypeError, match="fn must be callable"):
        check_forward(42)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        check_forward(reference, timeout=0)
    with pytest.raises(ValueError, match="must be a Python identifier"):
        check_forward(reference, scale="not a name")


def test_the_kit_does_not_import_torch(tmp_path):
    """Without torch the kit works: nothing imports it until a torch adapter is made."""
    code = ("import sys, selattn_reference.conformance as c, numpy as np; "
            "r = c.check_forward(lambda q, k, v: v); "
            "assert not r.passed and 'torch' not in sys.modules, sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_packaged_golden_vectors_are_the_tests_own():
    tests_golden = Path(__file__).parent / "data" / "golden"
    names = sorted(p.name for p in tests_golden.glob("*.npz"))
    assert names and names == sorted(p.name for p in GOLDEN_DIR.glob("*.npz"))
    for name in names:
        assert filecmp.cmp(tests_golden / name, GOLDEN_DIR / name, shallow=False), name


# ----------------------------------------------------------------------------------------------
# The command line


def run_check(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selattn_reference", "check", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_cli_exit_status_conformant_not_conformant_bad_argument(tmp_path):
    ok = run_check(tmp_path, f"{CANDIDATES}:float32_port")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.rstrip().endswith("verdict: CONFORMANT")
    bad = run_check(tmp_path, f"{CANDIDATES}:self_masked")
    assert bad.returncode == 1
    assert "diagnosis: the outputs match the reference with self-masked" in bad.stdout
    for args, message in (((f"{CANDIDATES}:NOT_CALLABLE",), "not a callable"),
                          (("no/such/file.py:fn",), "no such file"),
                          (("no_such_module:fn",), "No module named 'no_such_module'"),
                          (("just_a_name",), "must be FILE.py:FUNCTION or MODULE:FUNCTION"),
                          ((f"{CANDIDATES}:reference_port", "--timeout", "-1"), "must be > 0")):
        result = run_check(tmp_path, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr


def test_cli_cache_mistake_module_form_and_options(tmp_path):
    result = run_check(CANDIDATES.parent, "conformance_candidates:bos_evicted", "--cache")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "bos-evicted: the eviction rule may evict BOS" in result.stdout
    result = run_check(tmp_path, f"{CANDIDATES}:with_options", "--selector-head-arg", "sel",
                       "--protect-bos-arg", "keep_bos", "--scale-arg", "softmax_scale")
    assert result.returncode == 0, result.stdout
    assert "pass  options" in result.stdout


@pytest.mark.parametrize("name, message", [
    ("segfaults", "killed by signal"),
    ("exits", "ended with status 0 before the report was complete"),
    ("hangs", "did not return within 0.5 s"),
])
def test_cli_survives_crashes_exits_and_hangs(tmp_path, name, message):
    result = run_check(tmp_path, f"{CANDIDATES}:{name}", "--timeout", "0.5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stdout
    assert "NOT CONFORMANT" in result.stdout.splitlines()[-1]


def test_the_docs_show_the_real_report(tmp_path):
    """docs/conformance.md prints the report of examples/conformance_mine.py; it must be what the
    command prints (run from the repository's root, as the page says)."""
    root = Path(__file__).resolve().parents[1]
    doc = root / "docs" / "conformance.md"
    if not doc.exists():
        pytest.skip("docs/ is not next to the tests")
    text = doc.read_text(encoding="utf-8")
    shown = re.search(r"<!-- conformance-output -->\s*```text\n(.*?)\n```", text, re.S).group(1)
    result = subprocess.run([sys.executable, "-m", "selattn_reference", "check",
                             "examples/conformance_mine.py:attention"], cwd=root,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stdout.strip() == shown.strip()
    timeout = check_forward(C.hangs, timeout=0.5).render()
    for line in re.search(r"```text\n(  FAIL  call.*?)\n```", text, re.S).group(1).splitlines():
        assert line in timeout
