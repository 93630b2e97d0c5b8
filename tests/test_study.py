"""The long-context study (``selattn study``, ``selattn_lm.study`` and ``selattn_lm.study_report``)
on tiny models with made-up weights and a small Wikipedia-style dump written by the test: the
manifest, the memory factor where the answer is known by construction, the controls, the
command end to end, and the doc's tables as the JSON rendered. No training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import selattn_c
from selattn_lm import model as lm
from selattn_lm import study, study_report
from selattn_lm.checkpoint import save_checkpoint
from selattn_lm.cli import main
from selattn_lm.task_text import TextTask, bits_per_byte
from selattn_reference.eviction_baselines import SelectiveSlidingWindow

from test_text_data import write_dump

pytestmark = pytest.mark.skipif(not selattn_c.extension_built(),
                                reason="the study scores on the C kernels")

CONTEXT = 16
SMALL = dict(test_windows=6, valid_windows=3, fractions=(1 / 2, 1 / 4))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forward passes: OpenMP's start-up on a busy machine would dominate."""
    before = selattn_c.get_num_threads()
    selattn_c.set_num_threads(1)
    yield
    selattn_c.set_num_threads(before)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    dump = write_dump(tmp_path_factory.mktemp("corpus") / "dump.xml")
    return TextTask(corpus="wiki", corpus_path=str(dump), eval_windows=3)


def model_cfg(selective: bool, context: int = CONTEXT) -> lm.ModelConfig:
    return lm.ModelConfig(vocab_size=258, context=context, n_layers=2, n_heads=2, d_model=16,
                          selective=selective, eps=0.0)


def save(path: Path, task: TextTask, params, selective: bool, seed: int = 0,
         context: int = CONTEXT, **train) -> Path:
    extra = {"task": task.settings(), "train_config": {"seed": seed, "steps": 0, **train},
             "metric": "valid_bpb", "valid_bpb": 0.0}
    save_checkpoint(path, params, model_cfg(selective, context), extra=extra)
    return path


def random_params(seed: int, selective: bool = True, context: int = CONTEXT):
    params = lm.init_params(model_cfg(selective, context), seed=seed)
    for name in params:                   # larger weights than the init: attention matters
        if name.endswith(("wqkv", "wo")):
            params[name] *= 4.0
    return params


def attention_blind(params):
    """The same model with every attention output projection zero: no budget changes it."""
    out = {k: v.copy() for k, v in params.items()}
    for name in out:
        if name.endswith(("attn.wo", "attn.bo")):
            out[name][...] = 0.0
    return out


def manifest(path: Path, entries) -> Path:
    path.write_text(json.dumps({"checkpoints": entries}), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# The manifest


def test_manifest_roles_and_seeds(task, tmp_path):
    save(tmp_path / "sel.npz", task, random_params(0), True, seed=3)
    save(tmp_path / "std.npz", task, random_params(0, False), False)
    save(tmp_path / "ft.npz", task, random_params(1), True, init_from="std.npz")
    save(tmp_path / "soft.npz", task, random_params(2), True, soft_budgets=[4, 4])
    by_dir = {e.path.name: e.role for e in study.read_manifest(tmp_path)}
    assert by_dir == {"sel.npz": "selective", "std.npz": "standard", "ft.npz": "finetuned",
                      "soft.npz": "soft-budgets"}
    m = manifest(tmp_path / "m.json", [{"path": "sel.npz", "role": "selective"},
                                       {"path": "std.npz", "role": "standard", "seed": 7,
                                        "label": "baseline"}])
    models = study.load_models(study.read_manifest(m))
    assert [(x.seed, x.kind) for x in models] == [(3, "selective"), (7, "standard")]


@pytest.mark.parametrize("content, message", [
    ("not json", "not readable JSON"),
    ("[]", "'checkpoints' list"),
    ('{"checkpoints": []}', "1 to"),
    ('{"checkpoints": [{"path": "a.npz"}]}', "'role'"),
    ('{"checkpoints": [{"path": "a.npz", "role": "selective", "seed": -1}]}', "'seed'"),
    ('{"checkpoints": [{"path": "a.npz", "role": "selective", "x": 1}]}', "unknown keys"),
    ('{"checkpoints": [{"path": "a.npz", "role": "selective"}, '
     '{"path": "a.npz", "role": "standard"}]}', "twice"),
])
def test_bad_manifests(tmp_path, content, message):
    path = tmp_path / "m.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        study.read_manifest(path)


def test_missing_manifest_and_wrong_roles(task, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        study.read_manifest(tmp_path / "none.json")
    with pytest.raises(ValueError, match="no checkpoints"):
        study.read_manifest(tmp_path)
    save(tmp_path / "std.npz", task, random_params(0, False), False)
    m = manifest(tmp_path / "m.json", [{"path": "std.npz", "role": "selective"}])
    with pytest.raises(ValueError, match="needs a selective model"):
        study.load_models(study.read_manifest(m))


# ----------------------------------------------------------------------------------------------
# The memory factor where the answer is known


def test_an_attention_blind_model_keeps_its_score_down_to_two_slots(task, tmp_path):
    """Attention contributes nothing: every budget scores as the full cache, and the standard
    model (the same weights, standard attention) scores the same. The factor is context / 2 for
    uniform budgets and for the per-layer path (which goes down to 2 slots in every layer)."""
    blind = attention_blind(random_params(5))
    save(tmp_path / "sel.npz", task, blind, True)
    save(tmp_path / "std.npz", task, blind, False)
    m = manifest(tmp_path / "m.json", [{"path": "sel.npz", "role": "selective"},
                                       {"path": "std.npz", "role": "standard"}])
    results = study.evaluate(study.read_manifest(m), log=lambda line: None, **SMALL)
    (ctx,) = results["contexts"]
    (row,) = ctx["models"]
    assert row["full_bpb"] == ctx["target"]
    assert row["uniform"]["budgets"] == [2, 2] and row["uniform"]["factor"] == CONTEXT / 2
    assert row["per_layer"]["budgets"] == [2, 2] and row["per_layer"]["factor"] == CONTEXT / 2
    ctl = row["controls"]["uniform"]                  # attention-blind: every rule scores alike
    for key in ("selective_cache", "selective_window", "standard_window", "standard_h2o",
                "standard_tova"):
        assert ctl[key] == pytest.approx(row["full_bpb"], rel=1e-5), key


def test_a_model_worse_than_the_target_has_no_factor(task, tmp_path):
    """Selective: every logit 0 (exactly log2(258) bits per byte). Standard: a unigram model
    (the same logits at every position, the test split's byte frequencies), which is better."""
    zero = {k: np.zeros_like(v) for k, v in random_params(0).items()}
    unigram = {k: np.zeros_like(v) for k, v in random_params(0, False).items()}
    tokens, targets = task.windows("test", CONTEXT, 6, spread=True)    # the study's windows
    counts = np.bincount(targets.ravel(), minlength=258) + 1.0
    unigram["wte"][:, 0] = np.log(counts / counts.sum())     # logits = lnf.b . wte[v]
    unigram["lnf.b"][0] = 1.0
    save(tmp_path / "sel.npz", task, zero, True)
    save(tmp_path / "std.npz", task, unigram, False)
    m = manifest(tmp_path / "m.json", [{"path": "sel.npz", "role": "selective"},
                                       {"path": "std.npz", "role": "standard"}])
    results = study.evaluate(study.read_manifest(m), log=lambda line: None, **SMALL)
    (ctx,) = results["contexts"]
    (row,) = ctx["models"]
    assert row["full_bpb"] == pytest.approx(math.log2(258), rel=1e-6)
    assert ctx["target"] < row["full_bpb"] - 1.0
    assert row["uniform"]["factor"] is None and row["per_layer"]["factor"] is None
    assert row["controls"] == {"uniform": None, "per_layer": None}
    assert "< 1 (never)" in study_report.markdown_tables(results)


def test_the_factor_on_a_real_model_is_a_crossing(task, tmp_path):
    """Made-up weights: whatever the factor, its budget scores at or below the target and one
    slot less above it, measured here directly; the controls are the backends' own scores."""
    from selattn_lm.backends import CAttention
    from selattn_reference.eviction_baselines import TOVA
    params = random_params(11)
    save(tmp_path / "sel.npz", task, params, True)
    save(tmp_path / "std.npz", task, random_params(12, False), False)
    m = manifest(tmp_path / "m.json", [{"path": "sel.npz", "role": "selective"},
                                       {"path": "std.npz", "role": "standard"}])
    results = study.evaluate(study.read_manifest(m), log=lambda line: None, **SMALL)
    (ctx,) = results["contexts"]
    (row,) = ctx["models"]
    windows = task.windows("test", CONTEXT, 6, spread=True)           # the study's windows
    sel_cfg = model_cfg(True)

    def score(attention, K, params=params, cfg=sel_cfg):
        return bits_per_byte(params, cfg, *windows, attention=attention, budgets=[K, K])

    assert row["full_bpb"] < ctx["target"]           # measured: these seeds give a factor
    K = row["uniform"]["budgets"][0]
    assert K < CONTEXT
    assert score(CAttention(), K) <= ctx["target"]
    if K > 2:
        assert score(CAttention(), K - 1) > ctx["target"]
    ctl = row["controls"]["uniform"]
    assert ctl["selective_cache"] == row["uniform"]["test_bpb"]
    assert ctl["selective_window"] == pytest.approx(score(SelectiveSlidingWindow(), K),
                                                    rel=1e-6)
    std = study.load_models([study.Entry(tmp_path / "std.npz", "standard")])[0]
    assert ctl["standard_tova"] == pytest.approx(
        score(TOVA(), K, std.params, std.cfg), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def study_files(task, tmp_path_factory):
    """Two seeds of each kind at context 16, one pair at 24, a fine-tuned and a soft-budget
    model. At context 16 both standard models are the attention-blind seed 0 model, and so is
    the selective seed 0: its bits per byte are the target at every budget, so its factor is
    known (context / 2)."""
    d = tmp_path_factory.mktemp("study")
    entries = []
    blind = attention_blind(random_params(0))
    for seed in (0, 1):
        save(d / f"sel{seed}.npz", task, blind if seed == 0 else random_params(seed), True,
             seed=seed)
        save(d / f"std{seed}.npz", task, blind, False, seed=seed)
        entries += [{"path": f"sel{seed}.npz", "role": "selective"},
                    {"path": f"std{seed}.npz", "role": "standard"}]
    save(d / "sel24.npz", task, random_params(3, context=24), True, context=24)
    save(d / "std24.npz", task, random_params(4, False, context=24), False, context=24)
    save(d / "ft.npz", task, random_params(5), True, init_from="std0.npz", steps=30)
    save(d / "soft.npz", task, random_params(6), True, soft_budgets=[6, 5])
    save(d / "late.npz", task, random_params(7), True, eps_start=5)
    entries += [{"path": "sel24.npz", "role": "selective"},
                {"path": "std24.npz", "role": "standard"},
                {"path": "ft.npz", "role": "finetuned", "label": "std0 made selective"},
                {"path": "soft.npz", "role": "soft-budgets"},
                {"path": "late.npz", "role": "variant", "label": "memory loss later"}]
    return manifest(d / "manifest.json", entries)


def test_study_command_end_to_end(study_files, tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\n\n{study_report.TABLE_BEGIN}\nold\n{study_report.TABLE_END}\n"
                   "after\n", encoding="utf-8")
    args = ["study", str(study_files), "--test-windows", "6", "--valid-windows", "3",
            "--fractions", "0.5", "0.25", "--json", str(tmp_path / "s.json"),
            "--png", str(tmp_path / "s.png"), "--update-doc", str(doc), "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert [c["context"] for c in results["contexts"]] == [16, 24]
    c16 = results["contexts"][0]
    assert c16["full"]["selective"]["n"] == 2 and c16["full"]["standard"]["n"] == 2
    assert c16["target"] == pytest.approx(c16["full"]["standard"]["mean"])
    assert c16["full"]["standard"]["std"] == 0.0 and c16["full"]["selective"]["std"] > 0
    factors = c16["factors"]["uniform"]
    assert factors["n"] + factors["never"] == 2 and factors["max"] == CONTEXT / 2
    rows = {r["checkpoint"]: r for r in c16["models"]}
    for kind in ("uniform", "per_layer"):
        assert rows["sel0.npz"][kind]["factor"] == CONTEXT / 2
    assert set(rows) == {"sel0.npz", "sel1.npz", "ft.npz", "soft.npz", "late.npz"}
    assert rows["late.npz"]["role"] == "variant" and rows["late.npz"]["seed"] == 0
    assert c16["full"]["selective"]["seeds"] == {"0": rows["sel0.npz"]["full_bpb"],
                                                 "1": rows["sel1.npz"]["full_bpb"]}
    assert rows["ft.npz"]["role"] == "finetuned" and rows["ft.npz"]["steps"] == 30
    assert rows["soft.npz"]["soft_budgets"]["budgets"] == [6, 5]
    for r in c16["models"]:
        for kind in ("uniform", "per_layer"):
            ctl = r["controls"][kind]
            if ctl is not None:
                assert ctl["standard"] == ("std1.npz" if r["seed"] == 1 else "std0.npz")
    assert len(c16["curve"]["points"]) == 2 and c16["curve"]["selective"] == "sel0.npz"
    from selattn_lm.mask_plot import have_matplotlib
    if have_matplotlib():                        # the plot extra; the test extra may lack it
        assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not (tmp_path / "s.png").exists()
    tables = study_report.markdown_tables(results)
    assert tables in out
    assert study_report.tables_in_doc(doc) == tables.strip()
    assert doc.read_text(encoding="utf-8").endswith("after\n")
    assert "Other selective models" in tables and "std0 made selective" in tables
    assert "variant, seed 0: memory loss later" in tables


def test_scores_file_is_reused_only_for_the_same_contents(task, tmp_path):
    """``--scores``: a second run computes nothing and gives the same numbers; a checkpoint whose
    bytes changed is scored again though its name did not; a malformed file is refused."""
    save(tmp_path / "sel.npz", task, random_params(21), True)
    save(tmp_path / "std.npz", task, random_params(22, False), False)
    m = manifest(tmp_path / "m.json", [{"path": "sel.npz", "role": "selective"},
                                       {"path": "std.npz", "role": "standard"}])
    scores = tmp_path / "scores.json"
    first = study.evaluate(study.read_manifest(m), log=lambda line: None, scores=scores,
                           **SMALL)
    assert first["scores"]["computed"] > 0 and first["scores"]["reused"] == 0
    again = study.evaluate(study.read_manifest(m), log=lambda line: None, scores=scores,
                           **SMALL)
    assert again["scores"]["computed"] == 0 and again["scores"]["reused"] > 0
    assert again["contexts"] == first["contexts"]
    assert "reused from earlier" in study_report.markdown_tables(again)
    save(tmp_path / "sel.npz", task, random_params(23), True)          # new weights, same name
    third = study.evaluate(study.read_manifest(m), log=lambda line: None, scores=scores,
                           **SMALL)
    assert third["scores"]["computed"] > 0
    assert third["contexts"][0]["models"][0]["full_bpb"] != \
        first["contexts"][0]["models"][0]["full_bpb"]
    for bad in ('{"format": "other", "version": 1, "scores": {}}',
                '{"format": "selattn-study-scores", "version": 1, "scores": {"k": "x"}}',
                "not json"):
        scores.write_text(bad, encoding="utf-8")
        with pytest.raises(ValueError, match="scores"):
            study.evaluate(study.read_manifest(m), log=lambda line: None, scores=scores,
                           **SMALL)


def test_study_command_errors(study_files, tmp_path, capsys):
    assert main(["study", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["study", str(study_files), "--test-windows", "0"]) == 2
    assert "test_windows" in capsys.readouterr().err
    assert main(["study", str(study_files), "--search-slack", "nan"]) == 2
    assert "search_slack" in capsys.readouterr().err
    doc = tmp_path / "plain.md"
    doc.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no table markers"):
        study_report.tables_in_doc(doc)


def test_checkpoints_of_one_file_name_in_two_folders(task, tmp_path):
    """Seeds in folders of their own: the results name each model by its path in the
    manifest, so the two ``sel.npz`` stay apart."""
    blind = attention_blind(random_params(5))
    for seed in (0, 1):
        (tmp_path / f"s{seed}").mkdir()
        save(tmp_path / f"s{seed}" / "sel.npz", task,
             blind if seed == 0 else random_params(9), True, seed=seed)
        save(tmp_path / f"s{seed}" / "std.npz", task, blind, False, seed=seed)
    m = manifest(tmp_path / "m.json", [{"path": f"s{s}/{k}.npz", "role": r}
                                       for s in (0, 1) for k, r in (("sel", "selective"),
                                                                    ("std", "standard"))])
    results = study.evaluate(study.read_manifest(m), log=lambda line: None, **SMALL)
    rows = {r["checkpoint"]: r for r in results["contexts"][0]["models"]}
    assert set(rows) == {"s0/sel.npz", "s1/sel.npz"}
    assert rows["s0/sel.npz"]["full_bpb"] != rows["s1/sel.npz"]["full_bpb"]
    assert rows["s0/sel.npz"]["uniform"]["factor"] == CONTEXT / 2
    assert rows["s1/sel.npz"]["controls"]["uniform"] is None or \
        rows["s1/sel.npz"]["controls"]["uniform"]["standard"] == "s1/std.npz"


def test_corpus_path_overrides_the_checkpoints(task, tmp_path):
    moved = TextTask(corpus="wiki", corpus_path=str(tmp_path / "gone.xml"), eval_windows=3)
    blind = attention_blind(random_params(5))
    save(tmp_path / "sel.npz", moved, blind, True)
    save(tmp_path / "std.npz", moved, blind, False)
    entries = study.read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError):
        study.evaluate(entries, log=lambda line: None, **SMALL)
    results = study.evaluate(entries, corpus_path=task.corpus_path, log=lambda line: None,
                             **SMALL)
    assert results["contexts"][0]["models"][0]["uniform"]["factor"] == CONTEXT / 2
