"""docs/results-text.md says what the bundled text models and docs/results-text.json say.

Regenerating the numbers takes about 35 minutes (``selattn text-results``), too long for CI; these
checks keep the page, the JSON it was written from and the bundled checkpoints consistent, and
score the bundled models on a few test windows against the JSON's full-cache figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from selattn_lm import text_results
from selattn_lm.task_registry import load_task_checkpoint
from selattn_lm.task_text import bits_per_byte
from selattn_lm.backends import CAttention

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results-text.md"
RESULTS = json.loads((ROOT / "docs" / "results-text.json").read_text(encoding="utf-8"))


def test_the_doc_table_is_the_json_rendered():
    doc = DOC.read_text(encoding="utf-8")
    table = doc.split(text_results.TABLE_BEGIN, 1)[1].split(text_results.TABLE_END, 1)[0]
    assert table.strip() == text_results.markdown_table(RESULTS).strip()


def test_the_bundled_checkpoints_are_the_ones_scored():
    assert RESULTS["checkpoints"] == {"selective": "text-selective.npz",
                                      "standard": "text-standard.npz"}
    for name, selective in (("selective", True), ("standard", False)):
        _, cfg, _, extra = load_task_checkpoint(text_results.DATA / f"text-{name}.npz",
                                                expect="text")
        assert cfg.selective is selective and extra["train_config"]["standard"] is not selective
        assert cfg.context == RESULTS["context"] and cfg.n_layers == RESULTS["n_layers"]
        sidecar = json.loads((text_results.DATA / f"text-{name}.json").read_text("utf-8"))
        assert sidecar["corpus"] == RESULTS["corpus"]


def test_the_bundled_models_score_as_the_json_says_on_the_first_windows():
    """The first 16 test windows (of 903) with the full cache, against the whole split's mean:
    an untrained or swapped model, or a broken scorer, is off by far more (an untrained model
    scores log2(258) = 8.0)."""
    pytest.importorskip("gensim")
    from selattn_lm.text import eval_windows, load_corpus

    test = eval_windows(load_corpus().test, RESULTS["context"], 16)
    bpb = {}
    for name in ("selective", "standard"):
        params, cfg, _, _ = load_task_checkpoint(text_results.DATA / f"text-{name}.npz",
                                                 expect="text")
        bpb[name] = bits_per_byte(params, cfg, *test, attention=CAttention())
        # measured: 2.193 and 2.368 on these windows against 2.241 and 2.349 on all 903
        assert np.isfinite(bpb[name]) and abs(bpb[name] - RESULTS["full"][name]) < 0.15, bpb
    assert bpb["selective"] < bpb["standard"]
