"""docs/results-long-context.md says what docs/results-long-context.json says: the text between
the doc's markers is ``selattn_lm.study_report.markdown_tables`` of the JSON that ``selattn study
--json ... --update-doc ...`` wrote. Before the study's models are trained there is no JSON, and
the markers hold exactly the sentence below (so tables pasted by hand, or a JSON left out of a
commit, fail here)."""

from __future__ import annotations

import json
from pathlib import Path

from selattn_lm import study_report

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results-long-context.md"
RESULTS = ROOT / "docs" / "results-long-context.json"
NOT_MEASURED = "Not measured yet: the models of this study are still being trained."


def test_the_doc_tables_are_the_json_rendered():
    tables = study_report.tables_in_doc(DOC)
    if RESULTS.exists():
        results = json.loads(RESULTS.read_text(encoding="utf-8"))
        assert tables == study_report.markdown_tables(results).strip()
    else:
        assert tables == NOT_MEASURED


def test_the_doc_is_linked():
    for page in (ROOT / "README.md", ROOT / "docs" / "results-text.md"):
        assert "results-long-context.md" in page.read_text(encoding="utf-8"), page
