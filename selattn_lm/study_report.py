"""The long-context study's numbers (``selattn_lm.study.evaluate``) as Markdown tables and a
figure, and the tables put into a doc between markers.

``markdown_tables(results)`` is the whole text between the markers of
docs/results-long-context.md: the doc's tables are this function of the JSON file the command
wrote, which is what the doc's test checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from .doc_markers import replace_between_markers

TABLE_BEGIN = "<!-- study tables: begin (selattn study --update-doc) -->"
TABLE_END = "<!-- study tables: end -->"


def _num(x: Optional[float], digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _factor(x: Optional[float]) -> str:
    return "< 1 (never)" if x is None else f"{x:.1f}x"


def _vs(x: Optional[float], ref: Optional[float]) -> str:
    """``x (+d %)``: x and its change against ``ref``."""
    if x is None:
        return "n/a"
    if ref is None:
        return f"{x:.4f}"
    return f"{x:.4f} ({100 * (x / ref - 1):+.1f} %)"


def _budgets(b: Optional[List[int]]) -> str:
    if b is None:
        return "n/a"
    return str(b[0]) if len(set(b)) == 1 else ",".join(map(str, b))


def _reuse(scores: Optional[Dict[str, int]]) -> str:
    """How many scores the run computed and how many it took from ``--scores``."""
    if not scores or not scores.get("reused"):
        return ""
    return (f" ({scores['computed']} scores computed, {scores['reused']} reused from earlier "
            f"runs' --scores file)")


def _model(row: Dict[str, object]) -> str:
    label = row.get("label")
    return f"{row['role']}, seed {row['seed']}" + (f": {label}" if label else "")


def markdown_tables(results: Dict[str, object]) -> str:
    """The tables of docs/results-long-context.md (see the doc for what each column means)."""
    corpus = results["corpus"]
    contexts = results["contexts"]
    out = [f"Corpus `{results['corpus_name']}` ({corpus['source']}); test split "
           f"{corpus['test_bytes']:,} bytes. Per context: "
           + "; ".join(f"{c['context']} bytes, {c['test_windows']} test windows, "
                       f"{c['valid_windows']} validation windows, {c['n_layers']} layers"
                       for c in contexts) + f". Whole run: {results['seconds']:.0f} s"
           + _reuse(results.get("scores")) + ".", ""]

    out += ["**Full cache** (test bits per byte; spread: sample standard deviation and range "
            "over seeds)", "",
            "| context | model | seeds | mean | std | min | max |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in contexts:
        for kind in ("selective", "standard"):
            s = c["full"].get(kind)
            if s is not None:
                out.append(f"| {c['context']} | {kind} | {s['n']} | {s['mean']:.4f} | "
                           f"{_num(s['std'])} | {s['min']:.4f} | {s['max']:.4f} |")

    out += ["", "**Equal-perplexity memory factor** (target: the standard models' mean "
            "full-cache bits per byte at that context; budgets in slots per layer)", "",
            "| context | model | full cache | target | uniform budget | factor | bpb | "
            "per-layer budgets | factor | bpb |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for c in contexts:
        for r in c["models"]:
            u, p = r["uniform"], r["per_layer"]
            out.append(f"| {c['context']} | {_model(r)} | {r['full_bpb']:.4f} | "
                       f"{c['target']:.4f} | {_budgets(u['budgets'])} | {_factor(u['factor'])} "
                       f"| {_num(u['test_bpb'])} | {_budgets(p['budgets'])} | "
                       f"{_factor(p['factor'])} | {_num(p['test_bpb'])} |")

    for c in contexts:
        parts = []
        for kind, name in (("uniform", "uniform"), ("per_layer", "per-layer")):
            f = c["factors"][kind]
            if f["n"] == 0:
                text = "no seed reaches the target"
            elif f["n"] == 1:
                text = f"{f['mean']:.1f}x (1 seed)"
            else:
                text = f"{f['mean']:.1f}x mean over {f['n']} seeds ({f['min']:.1f}x to " \
                       f"{f['max']:.1f}x)"
            if f["never"] and f["n"]:
                text += f", {f['never']} never"
            parts.append(f"{name} {text}")
        out += ["", f"Context {c['context']}, selective seeds: " + "; ".join(parts) + "."]

    out += ["", "**Controls at the equal-perplexity budgets** (test bits per byte; selective "
            "sliding window: change against the same model's F eviction; standard columns: "
            "change against the standard model's full cache)", "",
            "| context | model | budgets | selective, F eviction | selective, sliding window "
            "| standard, sliding window | standard, H2O | standard, TOVA |",
            "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in contexts:
        std_full = {s["checkpoint"]: s["full_bpb"] for s in c["standard_models"]}
        for r in c["models"]:
            for kind in ("uniform", "per_layer"):
                ctl = r["controls"][kind]
                if ctl is None:
                    continue
                ref = std_full.get(ctl.get("standard"))
                out.append(f"| {c['context']} | {_model(r)} | {kind.replace('_', '-')} "
                           f"{_budgets(ctl['budgets'])} | {ctl['selective_cache']:.4f} | "
                           f"{_vs(ctl['selective_window'], ctl['selective_cache'])} | "
                           f"{_vs(ctl.get('standard_window'), ref)} | "
                           f"{_vs(ctl.get('standard_h2o'), ref)} | "
                           f"{_vs(ctl.get('standard_tova'), ref)} |")

    extra = [(c, r) for c in contexts for r in c["models"] if r["role"] != "selective"]
    if extra:
        out += ["", "**Other selective models** (finetuned: a standard model fine-tuned into a "
                "selective one; soft-budgets: pruning-aware fine-tuning; variant: trained from "
                "scratch another way, see its label)", "",
                "| context | model | steps | full cache | factor, uniform | factor, per-layer "
                "| at its soft budgets |",
                "| ---: | --- | ---: | ---: | ---: | ---: | --- |"]
        for c, r in extra:
            soft = r.get("soft_budgets")
            soft_text = "n/a" if not soft else \
                f"{soft['test_bpb']:.4f} at {_budgets(soft['budgets'])}"
            out.append(f"| {c['context']} | {_model(r)} | {r['steps'] if r['steps'] is not None else 'n/a'} | "
                       f"{r['full_bpb']:.4f} | {_factor(r['uniform']['factor'])} | "
                       f"{_factor(r['per_layer']['factor'])} | {soft_text} |")

    for c in contexts:
        cv = c["curve"]
        if cv is None:
            continue
        fs, fd = cv["full"]["selective"], cv["full"]["standard"]
        out += ["", f"**Budget curve, context {c['context']}** ({cv['selective']} and "
                f"{cv['standard']}; the same budget in every layer; change against each "
                f"model's full cache)", "",
                "| KV cache | slots | selective, F eviction | selective, sliding window | "
                "standard, sliding window | standard, H2O | standard, TOVA |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
                f"| full | {c['context']} | {fs:.4f} | {fs:.4f} | {fd:.4f} | {fd:.4f} | "
                f"{fd:.4f} |"]
        for pt in cv["points"]:
            out.append(f"| 1/{1 / pt['fraction']:g} | {pt['slots']} | "
                       f"{_vs(pt['selective_cache'], fs)} | {_vs(pt['selective_window'], fs)} | "
                       f"{_vs(pt['standard_window'], fd)} | {_vs(pt['standard_h2o'], fd)} | "
                       f"{_vs(pt['standard_tova'], fd)} |")
    return "\n".join(out)


def save_figure(results: Dict[str, object], path: Path) -> None:
    """One panel per context: bits per byte against the kept fraction of the cache (log scale),
    one line per method, the target as a dotted line and the equal-perplexity points (uniform)
    of every selective seed as stars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    contexts = results["contexts"]
    fig, axes = plt.subplots(1, len(contexts), figsize=(6.5 * len(contexts), 4.5),
                             squeeze=False)
    series = (("selective_cache", "selective, F eviction", "selective", "o-"),
              ("selective_window", "selective, sliding window", "selective", "s--"),
              ("standard_window", "standard, sliding window (+BOS)", "standard", "^--"),
              ("standard_h2o", "standard, H2O", "standard", "v--"),
              ("standard_tova", "standard, TOVA", "standard", "d--"))
    for ax, c in zip(axes[0], contexts):
        ax.set_xscale("log", base=2)         # before the ticks: setting the scale resets them
        cv = c["curve"]
        if cv is not None:
            for key, label, model, style in series:
                pts = [(1.0, cv["full"][model])] + [(p["fraction"], p[key])
                                                    for p in cv["points"]]
                ax.plot(*zip(*pts), style, label=label)
            xs = [1.0] + [p["fraction"] for p in cv["points"]]
            ax.set_xticks(xs)
            ax.set_xticklabels(["1"] + [f"1/{1 / f:g}" for f in xs[1:]])
        ax.axhline(c["target"], color="k", linestyle=":", linewidth=1,
                   label="standard, full cache (target)")
        stars = [(r["uniform"]["memory"] / r["uniform"]["full_memory"], r["uniform"]["test_bpb"])
                 for r in c["models"] if r["role"] == "selective" and r["uniform"]["factor"]]
        if stars:
            ax.plot(*zip(*stars), "k*", markersize=11, label="equal-perplexity points")
        ax.invert_xaxis()
        ax.set_xlabel("KV cache kept (fraction of the context, every layer)")
        ax.set_ylabel("test bits per byte (lower is better)")
        ax.set_title(f"{results['corpus_name']}, context {c['context']}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_doc(doc: Path, tables: str) -> None:
    """Replace the text between the markers of ``doc`` with ``tables``."""
    replace_between_markers(doc, TABLE_BEGIN, TABLE_END, tables)


def tables_in_doc(doc: Path) -> str:
    """The text between the markers of ``doc`` (stripped), for the doc's test to compare with
    ``markdown_tables`` of the JSON. ValueError when the markers are missing."""
    text = Path(doc).read_text(encoding="utf-8")
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise ValueError(f"{doc} has no table markers ({TABLE_BEGIN!r} ... {TABLE_END!r})")
    return text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip()
