"""Pictures of the accumulated mask F of every layer, tokens on both axes (queries down, keys
across), like the paper's figures: a PNG when matplotlib is installed (``pip install
'selattn[plot]'``), an ASCII heatmap otherwise.

F is drawn clipped at ``vmax`` (default 5): a key whose F is 5 has its attention weight multiplied
by e^-5 < 1 %, so it is as good as masked, and a common scale makes layers and models comparable.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

DEFAULT_VMAX = 5.0
ASCII_LEVELS = " .:-=+*#%@"   # F = 0 ... F >= vmax


def have_matplotlib() -> bool:
    """True when matplotlib can be imported (the optional ``plot`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _check_masks(masks, tokens) -> List[np.ndarray]:
    if isinstance(masks, np.ndarray):
        masks = [masks]
    masks = [np.asarray(F, dtype=np.float64) for F in masks]
    if not masks:
        raise ValueError("masks must hold at least one (N, N) array")
    N = len(tokens)
    for layer, F in enumerate(masks):
        if F.shape != (N, N):
            raise ValueError(f"masks[{layer}] must have shape ({N}, {N}) for {N} tokens, "
                             f"got {F.shape}")
        if not np.isfinite(F).all():
            raise ValueError(f"masks[{layer}] contains NaN or infinity")
    return masks


def _check_vmax(vmax: float) -> float:
    if isinstance(vmax, bool) or not isinstance(vmax, (int, float, np.floating, np.integer)):
        raise TypeError(f"vmax must be a number, got {type(vmax).__name__}")
    if not (np.isfinite(vmax) and vmax > 0):
        raise ValueError(f"vmax must be a finite number > 0, got {vmax}")
    return float(vmax)


def _check_kept(kept, N: int, name: str = "kept") -> Optional[np.ndarray]:
    if kept is None:
        return None
    kept = np.asarray(kept)
    if kept.dtype.kind not in "iu" or kept.ndim != 1:
        raise TypeError(f"{name} must be a 1-D sequence of int positions")
    if kept.size and (kept.min() < 0 or kept.max() >= N):
        raise ValueError(f"{name} positions must be in [0, {N}), got {kept.tolist()}")
    return kept


def ascii_heatmap(F, tokens: Sequence[str], *, title: str = "", vmax: float = DEFAULT_VMAX,
                  kept: Optional[Sequence[int]] = None) -> str:
    """One layer's F as text: a row per query, a column per key, one character per cell.

    Parameters
    ----------
    F : (N, N) accumulated mask of one sequence
    tokens : N one-character labels (longer labels are cut to their first character)
    title : printed above the map
    vmax : F at or above it prints as the darkest level
    kept : positions a pruned KV cache still holds after the last token (marked '^' under the
        map), or None

    Returns
    -------
    str: title, key labels, N rows ``<query label> |<cells>|``, the kept marks if given, and a
    legend. Cells above the diagonal (future keys) are blank.
    """
    (F,) = _check_masks([F], tokens)
    vmax = _check_vmax(vmax)
    kept = _check_kept(kept, len(tokens))
    labels = [(t or " ")[0] if t.isprintable() else "?" for t in tokens]
    top = len(ASCII_LEVELS) - 1
    level = np.floor(np.clip(F, 0.0, vmax) / vmax * top + 0.5).astype(int)   # (N, N) nearest
    lines = [title] if title else []
    lines.append("  " + "".join(labels))
    for i, label in enumerate(labels):
        cells = "".join(ASCII_LEVELS[level[i, j]] for j in range(i + 1))
        lines.append(f"{label}|{cells.ljust(len(labels))}|")
    if kept is not None:
        marks = np.full(len(labels), " ")
        marks[kept] = "^"
        lines.append("  " + "".join(marks) + f"  <- the {kept.size} tokens the pruned cache holds")
    lines.append(f"  F: '{ASCII_LEVELS[0]}' = 0 ... '{ASCII_LEVELS[-1]}' >= {vmax:g} "
                 f"(rows: queries, columns: keys)")
    return "\n".join(lines)


def save_png(path, masks, tokens: Sequence[str], *, titles: Optional[Sequence[str]] = None,
             vmax: float = DEFAULT_VMAX, suptitle: str = "",
             kept: Optional[Sequence[Sequence[int]]] = None) -> None:
    """Draw every layer's F side by side and save a PNG (needs matplotlib).

    Parameters
    ----------
    path : where to write the PNG
    masks : list of (N, N) arrays, one per layer
    tokens : N labels for both axes
    titles : one title per layer (default ``layer l``)
    vmax : top of the colour scale (F is clipped there)
    suptitle : title of the whole figure
    kept : per layer, the positions a pruned KV cache still holds after the last token (outlined
        in red in the last row: the keys the last query can attend to), or None
    """
    masks = _check_masks(masks, tokens)
    vmax = _check_vmax(vmax)
    if kept is not None:
        if len(kept) != len(masks):
            raise ValueError(f"kept must have one entry per mask ({len(masks)}), got {len(kept)}")
        kept = [_check_kept(k, len(tokens), f"kept[{l}]") for l, k in enumerate(kept)]
    titles = list(titles) if titles is not None else [f"layer {l}" for l in range(len(masks))]
    if len(titles) != len(masks):
        raise ValueError(f"titles must have one entry per mask ({len(masks)}), got {len(titles)}")
    try:
        import matplotlib
        matplotlib.use("Agg")           # files only: never needs a display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("save_png needs matplotlib: pip install 'selattn[plot]' "
                           "(or use ascii_heatmap)") from exc
    N = len(tokens)
    cell = max(0.06, min(0.25, 9.0 / N))     # inches per token: readable labels up to N ~ 150
    side = N * cell + 1.0
    fig, axes = plt.subplots(1, len(masks), figsize=(side * len(masks) + 1.2, side + 0.6),
                             squeeze=False, layout="constrained")
    future = ~np.tri(N, dtype=bool)           # (N, N) above the diagonal: not drawn
    font = max(3.0, min(9.0, 72 * cell * 0.8))
    image = None
    for l, (ax, F, title) in enumerate(zip(axes[0], masks, titles)):
        image = ax.imshow(np.ma.masked_where(future, np.minimum(F, vmax)), cmap="viridis",
                          vmin=0.0, vmax=vmax, interpolation="nearest")
        if kept is not None:
            ax.scatter(kept[l], np.full(len(kept[l]), N - 1), marker="s", facecolors="none",
                       edgecolors="red", s=(72 * cell) ** 2, linewidths=1.0, zorder=3,
                       label="keys the last query still has (pruned cache)")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_title(title)
        ax.set_xticks(range(N))
        ax.set_yticks(range(N))
        ax.set_xticklabels(tokens, fontsize=font, fontfamily="monospace")
        ax.set_yticklabels(tokens, fontsize=font, fontfamily="monospace")
        ax.tick_params(length=0)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label=f"F (clipped at {vmax:g})")
    if suptitle:
        fig.suptitle(suptitle)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
