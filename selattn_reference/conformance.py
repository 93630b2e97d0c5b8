"""The conformance kit: check anyone's selective attention, or KV cache, against this spec, and
name the mistake when it is a known one.

>>> from selattn_reference.conformance import check_forward
>>> report = check_forward(my_attention)          # fn(q, k, v) -> out, (B, H, N, D) arrays
>>> print(report); report.passed, report.failures, report.diagnosis

``check_forward`` runs the golden vectors, causality, the BOS and self invariants, shapes, random
cases (ties and large logits included), the options, and for a torch function the gradients;
``check_cache`` decodes token by token against the reference's pruned forward at several
budgets. When a check fails, the outputs are compared with the reference made with each known
mistake (``conformance_mistakes``) and the report names the one they match. Tolerances:
``conformance_tolerances``. The same checks run from the command line:
``python -m selattn_reference check FILE.py:FUNCTION`` (docs/conformance.md).
"""

from __future__ import annotations

from typing import Callable, Optional

from .conformance_cache_checks import CACHE_CHECKS, CacheRun, diagnose_cache
from .conformance_calls import Caller
from .conformance_convention import Convention
from .conformance_forward import FORWARD_CHECKS, ForwardRun, diagnose_forward
from .conformance_mistakes import MISTAKES
from .conformance_report import FAIL, CheckResult, Report
from .conformance_torch import TorchCacheFactory, TorchFunction, is_torch_module

__all__ = ["MISTAKES", "CheckResult", "Report", "TorchCacheFactory", "TorchFunction",
           "check_cache", "check_forward"]

DEFAULT_TIMEOUT = 10.0   # seconds one call of the candidate may take


def _run(run, checks, diagnose, target: str, kind: str) -> Report:
    report = Report(target, kind)
    try:
        _run_checks(run, checks, report)
    finally:
        run.caller.close()
    numeric = [c for c in report.checks[1:] if c.status == FAIL]
    if numeric and run.caller.timed_out is None:
        report.diagnosis = diagnose(run)
    return report


def _run_checks(run, checks, report: Report) -> None:
    for check in checks:
        if report.checks and report.checks[0].status == FAIL:
            skipped = CheckResult(check.__name__[len("check_"):].replace("_", "-"), "not run")
            skipped.skip("the first call failed")
            report.checks.append(skipped)
            continue
        if run.caller.timed_out is not None:
            skipped = CheckResult(check.__name__[len("check_"):].replace("_", "-"), "not run")
            skipped.skip(f"the candidate timed out earlier ({run.caller.timed_out})")
            report.checks.append(skipped)
            continue
        report.checks.append(check(run))


def _name(obj) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def check_forward(fn: Callable, *, selector_head: Optional[str] = None,
                  protect_bos: Optional[str] = None, scale: Optional[str] = None,
                  torch: Optional[bool] = None, dtype=None, timeout: float = DEFAULT_TIMEOUT,
                  name: Optional[str] = None) -> Report:
    """Check a selective-attention forward function against the reference.

    Parameters
    ----------
    fn : ``fn(q, k, v) -> out`` on (B, H, N, D) float64 arrays (or tensors, see ``torch``):
        causal, selector head 0, BOS protected, scale ``1/sqrt(D)`` unless it takes options
    selector_head, protect_bos, scale : str or None, the names of fn's keyword arguments for
        the three options (None: fn does not take it; the kit then uses the default)
    torch : True for a torch function or module (tensors in and out); None: True for an
        ``nn.Module``, else False
    dtype : the torch adapter's dtype (default: a module's parameter dtype, else float64)
    timeout : float, seconds one call may take
    name : str, what the report calls fn (default its qualified name)

    Returns
    -------
    Report : ``.passed``, ``.failures``, ``.diagnosis``, ``.checks``; ``print(report)``
    """
    convention = Convention(selector_head, protect_bos, scale)
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if torch is None:
        torch = is_torch_module(fn)
    candidate = fn if isinstance(fn, TorchFunction) or not torch else TorchFunction(fn, dtype)
    run = ForwardRun(candidate, convention, Caller(timeout))
    return _run(run, FORWARD_CHECKS, diagnose_forward, name or _name(fn), "forward")


def check_cache(make: Callable, *, selector_head: Optional[str] = None,
                protect_bos: Optional[str] = None, scale: Optional[str] = None,
                torch: bool = False, dtype=None, timeout: float = DEFAULT_TIMEOUT,
                name: Optional[str] = None) -> Report:
    """Check a KV-cache factory against the reference's pruned forward.

    Parameters
    ----------
    make : ``make(batch, heads, head_dim, budget) -> cache`` with ``cache.step(q, k, v) -> out``,
        each (B, H, D). The budget counts every held key, the current token included; the held
        token with the largest F is evicted, the oldest on ties, never BOS
    selector_head, protect_bos, scale : str or None, names of make's keyword arguments for them
    torch : True when step takes and returns tensors
    dtype : the torch adapter's dtype (default float64)
    timeout : float, seconds one call (make or step) may take
    name : str, what the report calls make

    Returns
    -------
    Report
    """
    convention = Convention(selector_head, protect_bos, scale)
    if not callable(make):
        raise TypeError(f"make must be callable, got {type(make).__name__}")
    candidate = TorchCacheFactory(make, dtype) if torch else make
    run = CacheRun(candidate, convention, Caller(timeout))
    return _run(run, CACHE_CHECKS, diagnose_cache, name or _name(make), "cache")
