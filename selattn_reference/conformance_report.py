"""The conformance report: one result per check, the diagnosis, and the verdict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

from .conformance_mistakes import MISTAKES

PASS, FAIL, SKIP = "pass", "FAIL", "skip"
SHOWN = 4   # findings printed per check (``Report.failures`` has them all)


@dataclass
class CheckResult:
    """What one check did and what it found.

    name : short name (``golden``, ``causality``, ...); did : one sentence, what it ran;
    status : ``PASS``, ``FAIL`` or ``SKIP``; findings : one line per problem (or, for a skip, why)
    """

    name: str
    did: str
    status: str = PASS
    findings: List[str] = field(default_factory=list)
    found: str = ""   # one line on what a passing check saw (e.g. the largest error)

    def fail(self, finding: str) -> None:
        self.status = FAIL
        self.findings.append(finding)

    def skip(self, why: str) -> None:
        self.status = SKIP
        self.findings.append(why)


@dataclass
class Report:
    """The result of a conformance check.

    Attributes
    ----------
    target : str, what was checked
    kind : ``"forward"`` or ``"cache"``
    checks : the results, in the order they ran
    diagnosis : labels of the known mistakes the outputs match (empty when none does)
    """

    target: str
    kind: str
    checks: List[CheckResult] = field(default_factory=list)
    diagnosis: Tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """True when no check failed (and the first call worked)."""
        return bool(self.checks) and all(c.status != FAIL for c in self.checks)

    @property
    def failures(self) -> List[str]:
        """One line per finding of every failed check, ``"check: finding"``."""
        return [f"{c.name}: {f}" for c in self.checks if c.status == FAIL for f in c.findings]

    def __bool__(self) -> bool:
        return self.passed

    def render(self) -> str:
        """The report as text: a line per check, its findings, the diagnosis and the verdict."""
        what = "forward function" if self.kind == "forward" else "KV-cache factory"
        lines = [f"selective-attention conformance: {self.target} ({what})"]
        width = max(len(c.name) for c in self.checks) if self.checks else 0
        for c in self.checks:
            lines.append(f"  {c.status:4}  {c.name:{width}}  {c.did}")
            if c.status == PASS and c.found:
                lines.append(f"        {'':{width}}  -> {c.found}")
            for finding in c.findings[:SHOWN]:
                lines.append(f"        {'':{width}}  -> {finding}")
            if len(c.findings) > SHOWN:
                lines.append(f"        {'':{width}}  -> ... and {len(c.findings) - SHOWN} more")
        if self.diagnosis:
            lines.append("diagnosis: the outputs match the reference with "
                         + " and ".join(self.diagnosis) + ":")
            for label in self.diagnosis:
                m = MISTAKES[label]
                lines.append(f"  {label}: {m.sentence}")
                lines.append(f"  {'':{len(label)}}  breaks the listing's line: {m.line}")
        elif not self.passed and any(c.name != "call" for c in self.checks if c.status == FAIL):
            lines.append("diagnosis: none of the known mistakes explains the outputs")
        lines.append("verdict: CONFORMANT" if self.passed else "verdict: NOT CONFORMANT")
        return "\n".join(lines)

    __str__ = render
