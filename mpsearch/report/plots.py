"""Figures a researcher looks at first: measured Pareto fronts per method, and a plan's bit map.

Both write PNGs with matplotlib's non-interactive backend (no display needed).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from ..core.format import Format


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def pareto_series(
    df: pd.DataFrame, y: str = "kl", method: str = "method", log_y: bool = True
) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """What both Pareto figures draw (the PNG here, the HTML report's plotly one): per ``method``,
    its measured plans and its measured front (sorted by bits), ``plotted`` holding the drawn ``y``.

    On a log axis an exact plan (``y`` = 0) would vanish: it is drawn at half the smallest positive value."""
    from ..core.stats import pareto_mask

    missing = {"effective_bits", y, method} - set(df.columns)
    if missing:
        raise ValueError(f"a Pareto figure needs columns {sorted(missing)}")
    data = df.dropna(subset=[y])
    plotted = data[y]
    if log_y:
        positive = data[y][data[y] > 0]
        plotted = plotted.clip(lower=float(positive.min()) / 2 if len(positive) else 1e-6)
    data = data.assign(plotted=plotted)
    out = []
    for name, g in data.groupby(method, sort=False):
        front = g[pareto_mask(g["effective_bits"].to_numpy(), g[y].to_numpy())].sort_values("effective_bits")
        out.append((name, g, front))
    return out


def pareto_plot(
    df: pd.DataFrame, path: str | Path, y: str = "kl", method: str = "method", title: str = "", log_y: bool = True
) -> Path:
    """Scatter every evaluated plan (effective bits vs ``y``), one colour per ``method``,
    with each method's measured Pareto front drawn as a step line."""
    series = pareto_series(df, y, method, log_y)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, g, front in series:
        pts = ax.scatter(g["effective_bits"], g["plotted"], s=14, alpha=0.45)
        ax.step(
            front["effective_bits"],
            front["plotted"],
            where="post",
            color=pts.get_facecolor()[0][:3],
            label=f"{name} ({len(g)})",
            lw=1.6,
        )
    ax.set_xlabel("effective bits per weight (scales and zeros included)")
    ax.set_ylabel(y)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title or f"measured {y} vs size: every evaluated plan, fronts as lines")
    return save_figure(fig, path)


def bit_grid(formats: Mapping[str, Format], in_features: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Layer x tensor-kind table of effective bits (nominal bits when ``in_features`` is unknown)."""
    cells: dict[tuple[int, str], float] = {}
    for name, fmt in formats.items():
        m = re.search(r"layers\.(\d+)\.(.+)$", name)
        if not m:
            continue
        kind = m[2].rsplit(".", 1)[-1]
        cells[(int(m[1]), kind)] = (
            fmt.effective_bits(in_features[name]) if in_features and name in in_features else float(fmt.bits)
        )
    if not cells:
        raise ValueError("no tensor named like 'layers.<N>.<kind>' in the plan; nothing to draw")
    layers = sorted({k[0] for k in cells})
    kinds = list(dict.fromkeys(k[1] for k in cells))  # first-seen order: the model's own order
    grid = pd.DataFrame(np.nan, index=layers, columns=kinds)
    for (layer, kind), v in cells.items():
        grid.loc[layer, kind] = v
    grid.index.name = "layer"
    return grid


def bit_heatmap(
    formats: Mapping[str, Format], path: str | Path, in_features: Mapping[str, int] | None = None, title: str = ""
) -> Path:
    """Per-layer bit map of one plan: rows are layers, columns tensor kinds, colour effective bits."""
    grid = bit_grid(formats, in_features)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * grid.shape[1], 1.0 + 0.28 * grid.shape[0]))
    im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=7)
    ax.set_ylabel("layer")
    for (r, c), v in np.ndenumerate(grid.to_numpy()):
        if np.isfinite(v):
            ax.text(
                c,
                r,
                f"{v:.3g}",
                ha="center",
                va="center",
                fontsize=6,
                color="w" if v < np.nanmean(grid.to_numpy()) else "k",
            )
    fig.colorbar(im, ax=ax, label="effective bits" if in_features else "bits")
    ax.set_title(title or "bits per tensor", fontsize=9)
    return save_figure(fig, path)
