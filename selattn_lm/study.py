"""The long-context study (docs/results-long-context.md): selective and standard text models of
several seeds and contexts, scored on the test split with full and pruned KV caches.

``selattn study MANIFEST`` (``run``) reads a manifest of checkpoints of ``selattn train --task
text`` (``read_manifest``: a JSON file listing them with their role, or a folder of them) and,
for every context, measures on the test split:

- bits per byte with the full cache of every model; mean and spread over seeds per (kind,
  context);
- the equal-perplexity memory factor (``selattn_lm.memory_factor``) of every selective model:
  the target is the mean full-cache bits per byte of the standard models at that context; the
  candidates are uniform budgets (one slot resolution) and the greedy per-layer path calibrated
  on the validation split (``selattn_lm.text_results.search_path``, stopped once its validation
  bits per byte exceed the standard models' by ``SEARCH_SLACK``);
- the controls at the budgets found (uniform and per-layer): the selective model under a
  sliding window with F applied (``SelectiveSlidingWindow``) against its own F eviction, and the
  standard model of the same seed (else the lowest seed) under a sliding window, H2O and TOVA
  (``selattn_reference.eviction_baselines``);
- a curve for the figure: the first selective seed and its standard model at ``fractions`` of
  the context, every method;
- extra rows for fine-tuned selective models (role ``finetuned``: a standard model fine-tuned
  into a selective one; role ``soft-budgets``: pruning-aware fine-tuning) and for selective
  models trained another way (role ``variant``, e.g. another memory-loss schedule; not counted
  in the seed statistics), with the same measurements and, for ``soft-budgets``, the bits per
  byte at the budgets they were tuned for.

Scores can be kept between runs (``--scores FILE``, ``selattn_lm.score_store``): a run that adds
a model to the manifest scores only what is new.

It writes the numbers as JSON, the tables as Markdown (``selattn_lm.study_report``), the figure
as a PNG, and can rewrite the tables of a doc between its markers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from selattn_reference.eviction_baselines import (
    TOVA,
    HeavyHitters,
    SelectiveSlidingWindow,
    SlidingWindow,
)

from . import model as lm
from .backends import CAttention
from .memory_factor import Budgets, equal_quality_point, uniform_candidates
from .progress import progress_bar
from .score_store import ScoreStore, model_key, windows_digest
from .task_registry import load_task_checkpoint
from .task_text import TextTask, bits_per_byte
from .text_results import search_path
from .threads import set_threads

ROLES = ("selective", "standard", "finetuned", "soft-budgets", "variant")
SELECTIVE_ROLES = ("selective", "finetuned", "soft-budgets", "variant")
DEFAULT_FRACTIONS = (1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32)
SEARCH_SLACK = 0.05            # the per-layer search stops 5 % above the standard's valid bpb
NUMPY_ELEMENTS = 1 << 20       # NumPy backends: windows per pass x N x N at most (4 at 512)
MAX_MANIFEST_BYTES = 1 << 20
MAX_ENTRIES = 1000


# ----------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class Entry:
    """One checkpoint of the study: its path, role (``ROLES``), seed, a label for tables and
    its name in the results (the path as the manifest gives it; default the file name)."""

    path: Path
    role: str
    seed: Optional[int] = None
    label: Optional[str] = None
    name: Optional[str] = None


def _entry(d: object, base: Path, where: str) -> Entry:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: each entry must be an object, got {type(d).__name__}")
    unknown = sorted(set(d) - {"path", "role", "seed", "label"})
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(unknown)}")
    path, role = d.get("path"), d.get("role")
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: 'path' must be a non-empty string")
    if role not in ROLES:
        raise ValueError(f"{where}: 'role' must be one of {', '.join(ROLES)}, got {role!r}")
    seed, label = d.get("seed"), d.get("label")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"{where}: 'seed' must be an int >= 0, got {seed!r}")
    if label is not None and not isinstance(label, str):
        raise ValueError(f"{where}: 'label' must be a string")
    return Entry(path=base / path, role=role, seed=seed, label=label, name=path)


def read_manifest(path) -> List[Entry]:
    """The checkpoints of a study.

    ``path`` is a JSON file ``{"checkpoints": [{"path": ..., "role": ..., "seed": ...,
    "label": ...}, ...]}`` (paths relative to the file's folder; ``seed`` and ``label``
    optional: the seed defaults to the training seed in the checkpoint), or a folder, whose
    ``*.npz`` files are taken with roles read from the checkpoints (``role_of``).

    Raises ValueError naming the file when it is missing, too large or malformed.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise ValueError(f"{path} holds no checkpoints (*.npz)")
        if len(files) > MAX_ENTRIES:
            raise ValueError(f"{path} holds {len(files)} checkpoints, more than {MAX_ENTRIES}")
        return [Entry(path=f, role=role_of(f)) for f in files]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ValueError(f"manifest {str(path)!r} does not exist") from None
    if size > MAX_MANIFEST_BYTES:
        raise ValueError(f"manifest {str(path)!r} is {size} bytes, more than "
                         f"{MAX_MANIFEST_BYTES}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"manifest {str(path)!r} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
        raise ValueError(f"manifest {str(path)!r} needs a 'checkpoints' list")
    items = data["checkpoints"]
    if not items or len(items) > MAX_ENTRIES:
        raise ValueError(f"manifest {str(path)!r} must list 1 to {MAX_ENTRIES} checkpoints")
    entries = [_entry(d, path.parent, f"manifest {path.name}, entry {i}")
               for i, d in enumerate(items)]
    if len({e.path.resolve() for e in entries}) != len(entries):
        raise ValueError(f"manifest {str(path)!r} lists a checkpoint twice")
    return entries


def role_of(path: Path) -> str:
    """A checkpoint's role from its settings: ``standard`` when not selective; ``soft-budgets``
    when trained with soft budgets; ``finetuned`` when started from another checkpoint; else
    ``selective``."""
    _, cfg, _, extra = load_task_checkpoint(path, expect="text")
    train = extra.get("train_config") or {}
    if not cfg.selective:
        return "standard"
    if train.get("soft_budgets"):
        return "soft-budgets"
    if train.get("init_from"):
        return "finetuned"
    return "selective"


@dataclass
class Model:
    """A loaded checkpoint of the study."""

    entry: Entry
    params: Dict[str, np.ndarray]
    cfg: "lm.ModelConfig"
    task: TextTask
    train: Dict[str, object]

    @property
    def name(self) -> str:
        return self.entry.name or self.entry.path.name

    @property
    def seed(self) -> int:
        if self.entry.seed is not None:
            return self.entry.seed
        return int(self.train.get("seed", 0))

    @property
    def kind(self) -> str:
        return "selective" if self.cfg.selective else "standard"


def load_models(entries: Sequence[Entry], corpus_path: Optional[str] = None) -> List[Model]:
    """Load every checkpoint and check the set: text models of one corpus; each role's kind
    (selective or standard) as its checkpoint says; no two models of one role, context and seed
    among the main ones (``selective``, ``standard``). ``corpus_path``: read the corpus from
    there instead of where the checkpoints say (None: as they say)."""
    models = []
    for e in entries:
        params, cfg, task, extra = load_task_checkpoint(e.path, expect="text")
        if corpus_path is not None:
            task = replace(task, corpus_path=str(corpus_path))
        models.append(Model(e, params, cfg, task, dict(extra.get("train_config") or {})))
    corpora = {m.task.corpus for m in models}
    if len(corpora) != 1:
        raise ValueError(f"the checkpoints were trained on different corpora: "
                         f"{', '.join(sorted(corpora))}")
    seen = set()
    for m in models:
        want_selective = m.entry.role in SELECTIVE_ROLES
        if bool(m.cfg.selective) != want_selective:
            raise ValueError(f"{m.name}: role {m.entry.role!r} needs a "
                             f"{'selective' if want_selective else 'standard'} model, and it "
                             f"is {m.kind}")
        if m.entry.role in ("selective", "standard"):
            key = (m.entry.role, m.cfg.context, m.seed)
            if key in seen:
                raise ValueError(f"two {m.entry.role} models of context {m.cfg.context} with "
                                 f"seed {m.seed}")
            seen.add(key)
    return models


# ----------------------------------------------------------------------------------------------
# Measurements


def spread(values: Sequence[float]) -> Dict[str, object]:
    """Mean, sample standard deviation (None for one value), min, max and count."""
    values = [float(v) for v in values]
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


class Scorer:
    """Bits per byte of the models on fixed windows, memoised per (model, method, budgets) in
    ``store`` (a ``ScoreStore``: in memory, or a file kept between runs), keyed by the
    checkpoint's and the windows' contents."""

    def __init__(self, windows: Tuple[np.ndarray, np.ndarray],
                 store: Optional[ScoreStore] = None) -> None:
        self.windows = windows
        self.c = CAttention()
        self.store = ScoreStore() if store is None else store
        self.windows_key = windows_digest(*windows)
        self.digests: Dict[str, str] = {}

    def __call__(self, model: Model, method: str, budgets: Optional[Budgets] = None) -> float:
        """``method``: ``cache`` (the model's own KV cache: F eviction for a selective model),
        ``selective_window``, ``window``, ``h2o`` or ``tova``. Budgets of at least the context
        in every layer evict nothing: every method is then the full cache (on the C kernels)."""
        if budgets is None or all(b >= model.cfg.context for b in budgets):
            method, budgets = "cache", None
        key = self.store.key(model_key(model.entry.path, self.digests), self.windows_key, method,
                             budgets)
        score = self.store.get(key)
        if score is None:
            numpy_batch = max(1, NUMPY_ELEMENTS // model.cfg.context ** 2)    # (B, H, N, N)
            attention, batch = {
                "cache": (self.c, 32),
                "selective_window": (SelectiveSlidingWindow(), numpy_batch),
                "window": (SlidingWindow(), numpy_batch),
                "h2o": (HeavyHitters(), numpy_batch),
                "tova": (TOVA(), numpy_batch),
            }[method]
            score = bits_per_byte(model.params, model.cfg, *self.windows, attention=attention,
                                  budgets=None if budgets is None else list(budgets),
                                  batch_size=batch)
            self.store.put(key, score)
        return score


def _controls(test: Scorer, model: Model, standard: Optional[Model],
              budgets: Optional[Budgets]) -> Optional[Dict[str, object]]:
    """The selective model's F eviction and sliding window, and the standard model's sliding
    window, H2O and TOVA, at ``budgets`` (None: no row)."""
    if budgets is None:
        return None
    row: Dict[str, object] = {"budgets": list(budgets),
                              "selective_cache": test(model, "cache", budgets),
                              "selective_window": test(model, "selective_window", budgets)}
    if standard is not None:
        row.update(standard=standard.name, standard_window=test(standard, "window", budgets),
                   standard_h2o=test(standard, "h2o", budgets),
                   standard_tova=test(standard, "tova", budgets))
    return row


def evaluate_context(models: Sequence[Model], context: int, *, test_windows: Optional[int],
                     valid_windows: int, fractions: Sequence[float],
                     log: Callable[[str], None], search_slack: float = SEARCH_SLACK,
                     store: Optional[ScoreStore] = None) -> Dict[str, object]:
    """Every measurement of one context (see the module docstring). Returns a JSON-able dict."""
    at = [m for m in models if m.cfg.context == context]
    standards = sorted((m for m in at if m.entry.role == "standard"), key=lambda m: m.seed)
    selectives = [m for m in at if m.entry.role in SELECTIVE_ROLES]
    if not standards:
        raise ValueError(f"context {context}: the study needs at least one standard model "
                         f"(the target of the memory factor)")
    task = at[0].task
    store = ScoreStore() if store is None else store
    test = Scorer(task.windows("test", context, test_windows, spread=True), store)
    valid = Scorer(task.windows("valid", context, valid_windows, spread=True), store)
    n_layers = at[0].cfg.n_layers
    if any(m.cfg.n_layers != n_layers for m in at):
        raise ValueError(f"context {context}: the models have different numbers of layers")

    full = {m.name: test(m, "cache") for m in at}
    for m in at:
        log(f"study: context {context}: {m.name} ({m.entry.role}, seed {m.seed}): full cache "
            f"{full[m.name]:.4f} bits per byte")
    by_kind = {}
    for role in ("selective", "standard"):
        vals = {m.seed: full[m.name] for m in at if m.entry.role == role}
        if vals:
            by_kind[role] = dict(spread(list(vals.values())),
                                 seeds={str(s): v for s, v in sorted(vals.items())})
    target = by_kind["standard"]["mean"]
    valid_target = statistics.fmean(valid(m, "cache") for m in standards)

    rows = []
    for m in progress_bar(selectives, desc=f"study: context {context}", unit="model"):
        paired = next((s for s in standards if s.seed == m.seed), standards[0])
        uniform = equal_quality_point(uniform_candidates(context, n_layers),
                                      lambda b: test(m, "cache", b), target)
        valid_full = valid(m, "cache")
        if uniform.index is None:             # the full cache is above the target already
            path = [((context,) * n_layers, valid_full)]
        else:
            path = search_path(lambda b: valid(m, "cache", b), n_layers, context,
                               log=lambda line: log(f"study: {m.name}: {line}"), tolerance=max(
                                   0.0, valid_target * (1 + search_slack) - valid_full))
        per_layer = equal_quality_point([b for b, _ in path], lambda b: test(m, "cache", b),
                                        target)
        row = {"checkpoint": m.name, "role": m.entry.role, "seed": m.seed,
               "label": m.entry.label, "steps": m.train.get("steps"),
               "init_from": m.train.get("init_from"), "full_bpb": full[m.name],
               "valid_bpb": valid_full, "uniform": uniform.to_dict(),
               "per_layer": dict(per_layer.to_dict(), path_valid_bpb=[
                   [list(b), s] for b, s in path]),
               "controls": {"uniform": _controls(test, m, paired, uniform.budgets),
                            "per_layer": _controls(test, m, paired, per_layer.budgets)}}
        soft = m.train.get("soft_budgets")
        if soft:
            soft = tuple(int(b) for b in soft)
            row["soft_budgets"] = {"budgets": list(soft), "test_bpb": test(m, "cache", soft)}
        rows.append(row)
        log(f"study: context {context}: {m.name}: memory factor "
            f"{_fmt_factor(uniform.factor)} (uniform {uniform.budgets and uniform.budgets[0]}), "
            f"{_fmt_factor(per_layer.factor)} (per layer {per_layer.budgets})")

    factors = {}
    for kind in ("uniform", "per_layer"):
        found = [r[kind]["factor"] for r in rows if r["role"] == "selective"]
        reached = [f for f in found if f is not None]
        factors[kind] = dict(spread(reached) if reached else {"n": 0},
                             never=len(found) - len(reached))

    curve = None
    main = [m for m in selectives if m.entry.role == "selective"]
    if main and fractions:
        sel = min(main, key=lambda m: m.seed)
        std = next((s for s in standards if s.seed == sel.seed), standards[0])
        points = []
        for f in fractions:
            slots = max(2, int(round(f * context)))
            b = (slots,) * n_layers
            points.append({"fraction": f, "slots": slots,
                           "selective_cache": test(sel, "cache", b),
                           "selective_window": test(sel, "selective_window", b),
                           "standard_window": test(std, "window", b),
                           "standard_h2o": test(std, "h2o", b),
                           "standard_tova": test(std, "tova", b)})
        curve = {"selective": sel.name, "standard": std.name,
                 "full": {"selective": full[sel.name], "standard": full[std.name]},
                 "points": points}
    return {"context": context, "n_layers": n_layers, "test_windows": len(test.windows[0]),
            "valid_windows": len(valid.windows[0]), "target": target,
            "valid_target": valid_target, "full": by_kind, "factors": factors,
            "standard_models": [{"checkpoint": s.name, "seed": s.seed, "full_bpb": full[s.name]}
                                for s in standards],
            "models": rows, "curve": curve}


def _fmt_factor(f: Optional[float]) -> str:
    return "none" if f is None else f"{f:.2f}x"


def evaluate(entries: Sequence[Entry], *, test_windows: Optional[int] = None,
             valid_windows: int = 64, fractions: Sequence[float] = DEFAULT_FRACTIONS,
             corpus_path: Optional[str] = None, search_slack: float = SEARCH_SLACK,
             log: Optional[Callable[[str], None]] = None,
             scores: Optional[Path] = None) -> Dict[str, object]:
    """The whole study (every context of the manifest). Returns a JSON-able dict.

    Parameters
    ----------
    entries : the checkpoints (``read_manifest``)
    test_windows : score N non-overlapping test windows of each context, evenly spaced over the
        split (``TextTask.windows(spread=True)``; None: all)
    valid_windows : validation windows of the per-layer search, evenly spaced likewise
    fractions : kept fractions of the context for the curve
    corpus_path : where to read the corpus (None: where the checkpoints say)
    search_slack : the per-layer search stops once no cut keeps the validation bits per byte
        within this relative margin above the standard models' (0.05: 5 %)
    log : callable taking one line of progress (default: stderr)
    scores : a file of scores kept between runs (``selattn_lm.score_store``; None: none)
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    for name, n in (("test_windows", test_windows), ("valid_windows", valid_windows)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    if isinstance(search_slack, bool) or not isinstance(search_slack, (int, float)) \
            or not 0 <= search_slack < float("inf"):
        raise ValueError(f"search_slack must be a finite number >= 0, got {search_slack!r}")
    fractions = [float(f) for f in fractions]
    if not all(0 < f < 1 for f in fractions):
        raise ValueError(f"fractions must be in (0, 1), got {fractions}")
    t0 = time.perf_counter()
    store = ScoreStore(scores)
    models = load_models(entries, corpus_path)
    contexts = sorted({m.cfg.context for m in models})
    results = [evaluate_context(models, N, test_windows=test_windows,
                                valid_windows=valid_windows, fractions=fractions, log=log,
                                search_slack=search_slack, store=store)
               for N in contexts]
    return {"corpus": models[0].task.text().summary(), "corpus_name": models[0].task.corpus,
            "search_slack": search_slack, "contexts": results,
            "seconds": round(time.perf_counter() - t0, 1),
            "scores": {"computed": store.computed, "reused": store.reused}}


# ----------------------------------------------------------------------------------------------
# selattn study


def add_commands(subparsers) -> None:
    """Add ``study`` to the ``selattn`` parser's subparsers."""
    p = subparsers.add_parser(
        "study", help="the long-context study: memory factor and controls "
                      "(docs/results-long-context.md)",
        description="Score selective and standard text models (seeds, contexts, fine-tuned "
                    "variants) on the test split: full-cache bits per byte, the equal-perplexity "
                    "memory factor (uniform and per-layer budgets) and the controls (selective "
                    "sliding window; standard sliding window, H2O, TOVA). Prints Markdown "
                    "tables; writes JSON and a PNG.")
    p.add_argument("manifest", type=Path,
                   help="a JSON manifest of checkpoints with their roles, or a folder of "
                        "checkpoints (roles read from them)")
    p.add_argument("--test-windows", type=int, default=None,
                   help="score only N test windows, evenly spaced over the split (default: "
                        "all)")
    p.add_argument("--valid-windows", type=int, default=64,
                   help="validation windows of the per-layer budget search, evenly spaced "
                        "over the split [64]")
    p.add_argument("--fractions", type=float, nargs="*", default=list(DEFAULT_FRACTIONS),
                   help="kept fractions of the context for the curve [1/2 1/4 1/8 1/16 1/32]")
    p.add_argument("--search-slack", type=float, default=SEARCH_SLACK,
                   help="stop the per-layer search once its validation bits per byte exceed the "
                        "standard models' by this relative margin [0.05]")
    p.add_argument("--corpus-path", type=str, default=None, metavar="PATH",
                   help="read the models' corpus from PATH (default: where the checkpoints say; "
                        "for python-code, the pinned wheel in the cache folder)")
    p.add_argument("--json", type=Path, default=Path("study.json"),
                   help="where to write the numbers [study.json]")
    p.add_argument("--png", type=Path, default=Path("study.png"),
                   help="where to draw the curves (needs matplotlib) [study.png]")
    p.add_argument("--scores", type=Path, default=None, metavar="JSON",
                   help="keep every score in this file and reuse the ones it holds (keyed by "
                        "the checkpoints' and windows' contents): a run that adds a model scores "
                        "only what is new")
    p.add_argument("--update-doc", type=Path, default=None, metavar="MARKDOWN",
                   help="rewrite the tables between the markers of this file "
                        "(docs/results-long-context.md)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the C kernels and of NumPy's BLAS alike (default: every "
                        "core this process may use)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import selattn_c
    from . import study_report
    selattn_c.require_extension("selattn study")
    set_threads(args.threads, "c")
    results = evaluate(read_manifest(args.manifest), test_windows=args.test_windows,
                       valid_windows=args.valid_windows, fractions=args.fractions,
                       corpus_path=args.corpus_path, search_slack=args.search_slack,
                       scores=args.scores)
    table = study_report.markdown_tables(results)
    print(table)
    args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    from .mask_plot import have_matplotlib
    if have_matplotlib():
        study_report.save_figure(results, args.png)
        print(f"wrote {args.png}")
    else:
        print("no matplotlib: no PNG (pip install '.[plot]')")
    if args.update_doc is not None:
        study_report.update_doc(args.update_doc, table)
        print(f"updated the tables in {args.update_doc}")
    return 0
