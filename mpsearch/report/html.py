"""One HTML page per search (``report.html`` beside ``results.csv``), readable offline.

``write_report(run_dir)`` reads a run folder as :func:`mpsearch.run.search.search` writes it
(results.csv, plans/*.json, proxy_table_<proxy>.csv, stages.csv, and costs.csv where a
cost model wrote one) and draws six plotly figures, with plotly.js embedded once in the
page. A figure whose inputs are missing (results.csv grows plan by plan during a search)
is replaced by a paragraph saying what is missing; a partial run never raises.
``python -m mpsearch.report.html RUN_DIR`` writes the report of a finished or running search.
"""

from __future__ import annotations

import html
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .plots import pareto_series

log = logging.getLogger(__name__)

FIGURES = ("pareto", "heatmap", "sensitivity", "predicted", "costs", "stages")
TITLES = {
    "pareto": "Measured Pareto front",
    "heatmap": "Bits per layer",
    "sensitivity": "Sensitivity per tensor",
    "predicted": "Predicted vs measured",
    "costs": "Cost breakdown per plan",
    "stages": "Stage times",
}
BASELINE_KINDS = ("reference", "uniform", "recipe")


class _Missing(Exception):
    """A figure's inputs are not (yet) in the run folder; the message says which."""


@dataclass(frozen=True)
class _Bits:
    """Stands in for a Format in :func:`mpsearch.report.plots.bit_grid` (which reads ``.bits``) when the value is
    already known."""

    bits: float


def write_report(run_dir: str | Path, title: str | None = None) -> Path:
    """Write ``run_dir/report.html`` (atomically) and return its path."""
    import plotly.offline

    from .._version import __version__
    from ..core.files import write_text_atomic

    run_dir = Path(run_dir)
    sections = []
    for name in FIGURES:
        try:
            fig, caption = _BUILDERS[name](run_dir)
            fig.update_layout(template="plotly_white", margin=dict(t=60, l=60, r=20, b=60))
            body = fig.to_html(
                full_html=False,
                include_plotlyjs=False,
                div_id=f"fig-{name}-plot",
                config={"displaylogo": False, "responsive": True},
            )
            body = f'<p class="caption">{html.escape(caption)}</p>\n{body}'
        except _Missing as e:
            body = f'<p class="missing">Not drawn: {html.escape(str(e))}</p>'
        except Exception as e:  # a figure that fails must not cost the page (or the search that writes it)
            log.warning("report figure %s could not be drawn: %s: %s", name, type(e).__name__, e)
            body = (
                f'<p class="missing">Could not be drawn ({html.escape(type(e).__name__)}: {html.escape(str(e))}).</p>'
            )
        sections.append(f'<div class="figure" id="fig-{name}">\n<h2>{TITLES[name]}</h2>\n{body}\n</div>')
    config = run_dir / "config.json"
    if config.exists():
        text = html.escape(config.read_text(encoding="utf-8"), quote=False)
        config_html = f"<details><summary>config.json</summary><pre>{text}</pre></details>"
    else:
        config_html = "<p>no config.json in the run folder</p>"
    title = title or f"mpsearch report: {run_dir.resolve().name}"
    toc = "\n".join(f'<li><a href="#fig-{n}">{TITLES[n]}</a></li>' for n in FIGURES)
    page = _PAGE.format(
        title=html.escape(title),
        plotlyjs=plotly.offline.get_plotlyjs(),
        toc=toc,
        sections="\n".join(sections),
        version=html.escape(__version__),
        run_dir=html.escape(str(run_dir.resolve())),
        config=config_html,
    )
    return write_text_atomic(run_dir / "report.html", page)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 1em}} .caption{{color:#444}}
.missing{{color:#a33;font-style:italic}} .figure{{margin-bottom:2.5em}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style>
<script type="text/javascript">{plotlyjs}</script>
</head><body>
<h1>{title}</h1>
<nav><ul>
{toc}
</ul></nav>
{sections}
<footer><hr><p>mpsearch {version}; run folder <code>{run_dir}</code></p>
{config}
</footer></body></html>
"""


# ------------------------------------------------------------------ inputs
def _csv(path: Path, needs: tuple[str, ...] = ()) -> pd.DataFrame:
    if not path.exists():
        raise _Missing(f"no {path.name} in the run folder yet")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise _Missing(f"{path.name} is empty") from None
    lacking = [c for c in needs if c not in df]
    if lacking or df.empty:
        raise _Missing(f"{path.name} has " + (f"no column(s) {lacking}" if lacking else "no rows yet"))
    return df


def _results(run_dir: Path, needs: tuple[str, ...] = ("plan", "kind", "effective_bits")) -> pd.DataFrame:
    df = _csv(run_dir / "results.csv", needs)
    return df[df["kind"] != "reference"].assign(method=lambda d: [str(p).split("@")[0] for p in d["plan"]])


def _proxy_tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for p in sorted(run_dir.glob("proxy_table_*.csv")):
        try:
            out[p.stem.removeprefix("proxy_table_")] = pd.read_csv(p)
        except pd.errors.EmptyDataError:
            continue
    return out


def _order(tensors) -> list[str]:
    """Tensor names by layer, then in first-seen (the model's) order of kinds; others last."""
    tensors = list(dict.fromkeys(tensors))
    kinds = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in tensors))

    def key(n: str):
        m = re.search(r"layers\.(\d+)\.", n)
        return (0, int(m[1]), kinds.index(n.rsplit(".", 1)[-1])) if m else (1, 0, tensors.index(n))

    return sorted(tensors, key=key)


def _short(name: str) -> str:
    m = re.search(r"layers\.(\d+)\.(.+)$", name)
    return f"L{m[1]}.{m[2].rsplit('.', 1)[-1]}" if m else name


def _log_ok(values) -> bool:
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    return len(v) > 0 and bool((v > 0).all())


# ----------------------------------------------------------------- figures
def _pareto(run_dir: Path):
    import plotly.graph_objects as go

    df = _results(run_dir)
    if "kl" not in df or df["kl"].notna().sum() == 0:
        raise _Missing(
            "results.csv has no measured KL yet (plans are measured one by one; or the search ran with measure=False)"
        )
    costs = [c for c in df if c.startswith("cost_")]
    fig = go.Figure()
    for method, g, front in pareto_series(df, "kl", "method"):
        text = [
            f"<b>{r.plan}</b><br>bits {r.effective_bits:.3f}<br>KL {r.kl:.4g}"
            + (f"<br>ppl {r.ppl:.4g}" if "ppl" in g else "")
            + "".join(f"<br>{c[5:]} {r[c]:.4g}" for c in costs if pd.notna(r[c]))
            for _, r in g.iterrows()
        ]
        err = {}
        if {"kl_lo", "kl_hi"} <= set(g):
            err = dict(
                error_y=dict(
                    type="data",
                    array=(g["kl_hi"] - g["kl"]).clip(lower=0).fillna(0).tolist(),
                    arrayminus=(g["kl"] - g["kl_lo"]).clip(lower=0).fillna(0).tolist(),
                    thickness=1,
                )
            )
        trace = go.Scatter(
            x=g["effective_bits"],
            y=g["plotted"],
            mode="markers",
            name=f"{method} ({len(g)})",
            text=text,
            hovertemplate="%{text}<extra></extra>",
            legendgroup=method,
            **err,
        )
        fig.add_trace(trace)
        if len(front) > 1:
            fig.add_trace(
                go.Scatter(
                    x=front["effective_bits"],
                    y=front["plotted"],
                    mode="lines",
                    line=dict(shape="hv", width=1),
                    legendgroup=method,
                    showlegend=False,
                    hoverinfo="skip",
                )
            )
    fig.update_layout(
        height=520,
        xaxis_title="effective bits per weight (scales and zeros included)",
        yaxis_title="measured KL to the unquantized model",
        yaxis_type="log",
        legend_title="method (plans)",
    )
    return fig, (
        "Each point is a measured plan, one colour per method; lower and further left is better, and the step line is "
        "each method's measured front. Bars are the 95% bootstrap interval over evaluation windows; hover for ppl and "
        "costs."
    )


def _heatmap(run_dir: Path):
    import plotly.graph_objects as go

    from ..core.files import safe_name
    from ..core.plan import Plan, PlanError
    from .plots import bit_grid

    files = sorted((run_dir / "plans").glob("*.json")) if (run_dir / "plans").is_dir() else []
    if not files:
        raise _Missing("no plans/*.json in the run folder yet")
    try:  # plans by their names in results.csv (files hold safe names), in its order
        names = {safe_name(str(p)): str(p) for p in _results(run_dir, ("plan", "kind"))["plan"]}
    except _Missing:
        names = {}
    files.sort(key=lambda f: (list(names).index(f.stem) if f.stem in names else len(names), f.stem))
    lookup = {}
    for t in _proxy_tables(run_dir).values():
        if {"tensor", "format", "bits"} <= set(t):
            lookup.update(zip(zip(t["tensor"], t["format"]), t["bits"]))
    grids, nominal = [], False
    for f in files:
        try:
            plan = Plan.load(f)
            formats = plan.weight_formats()
            keys = list(dict.fromkeys(fm.key for fm in formats.values()))
            bits = {n: lookup.get((n, fm.key), np.nan) for n, fm in formats.items()}
            nominal |= any(np.isnan(b) for b in bits.values())
            grid = bit_grid({n: _Bits(fm.bits if np.isnan(bits[n]) else bits[n]) for n, fm in formats.items()})
            which = bit_grid({n: _Bits(keys.index(fm.key)) for n, fm in formats.items()})
        except (PlanError, ValueError):  # unreadable, or no layer-named tensors: nothing to draw for this plan
            continue
        text = [[keys[int(v)] if np.isfinite(v) else "" for v in row] for row in which.to_numpy()]
        grids.append((names.get(f.stem, f.stem), plan.provenance.get("kind"), grid, text))
    if not grids:
        raise _Missing("no plan in plans/ has tensors named like 'layers.<N>.<kind>'")
    lo = min(float(np.nanmin(g.to_numpy())) for _, _, g, _ in grids)
    hi = max(float(np.nanmax(g.to_numpy())) for _, _, g, _ in grids)
    first = next((i for i, (_, kind, _, _) in enumerate(grids) if kind not in BASELINE_KINDS), 0)
    fig = go.Figure()
    for i, (name, _, grid, text) in enumerate(grids):
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(),
                x=list(grid.columns),
                y=list(grid.index),
                text=text,
                texttemplate="%{text}",
                zmin=lo,
                zmax=hi,
                colorscale="Viridis",
                colorbar_title="bits",
                name=name,
                visible=i == first,
                hovertemplate="layer %{y} %{x}<br>%{text}: %{z:.3f} bits<extra></extra>",
            )
        )
    buttons = [
        dict(label=name, method="update", args=[{"visible": [j == i for j in range(len(grids))]}, {"title": name}])
        for i, (name, _, _, _) in enumerate(grids)
    ]
    fig.update_layout(
        title=grids[first][0],
        height=max(380, 140 + 22 * max(len(g.index) for _, _, g, _ in grids)),
        updatemenus=[dict(buttons=buttons, active=first, x=1.0, xanchor="right", y=1.12, yanchor="top")],
        yaxis=dict(title="layer", autorange="reversed", dtick=1),
        xaxis_title="tensor kind",
    )
    how = "nominal bits where no proxy table lists the format" if nominal else "effective bits from the proxy tables"
    return fig, (
        f"Pick a plan in the menu: rows are layers, columns tensor kinds, colour the stored bits per weight ({how}), "
        "and each cell names its format."
    )


def _sensitivity(run_dir: Path):
    import plotly.graph_objects as go

    tables = {p: t for p, t in _proxy_tables(run_dir).items() if {"tensor", "format", "predicted"} <= set(t) and len(t)}
    if not tables:
        raise _Missing("no proxy_table_<proxy>.csv in the run folder yet")
    fig, owner, unknown_se, log = go.Figure(), [], 0, True
    order = _order(t for tab in tables.values() for t in tab["tensor"])
    for proxy, t in tables.items():
        log &= _log_ok(t["predicted"])
        se = t["predicted_se"] if "predicted_se" in t else pd.Series(np.nan, index=t.index)
        unknown_se += int(se.isna().sum())
        for fmt, g in t.groupby("format", sort=False):
            g = g.drop_duplicates("tensor").set_index("tensor").reindex([n for n in order if n in set(g["tensor"])])
            bars = (1.96 * g["predicted_se"]) if "predicted_se" in g else None
            fig.add_trace(
                go.Scatter(
                    x=[_short(n) for n in g.index],
                    y=g["predicted"],
                    mode="markers",
                    name=f"{proxy}: {fmt}",
                    error_y=None if bars is None else dict(type="data", array=bars.tolist(), thickness=1),
                    text=list(g.index),
                    visible=proxy == next(iter(tables)),
                    hovertemplate="%{text}<br>" + f"{fmt}: " + "%{y:.4g}<extra></extra>",
                )
            )
            owner.append(proxy)
    buttons = [
        dict(label=p, method="update", args=[{"visible": [o == p for o in owner]}, {"title": f"proxy {p}"}])
        for p in tables
    ]
    fig.update_layout(
        title=f"proxy {next(iter(tables))}",
        height=520,
        yaxis_type="log" if log else "linear",
        yaxis_title="predicted loss increase",
        legend_title="proxy: format",
        xaxis=dict(title="tensor (layer, kind)", categoryorder="array", categoryarray=[_short(n) for n in order]),
        updatemenus=[dict(buttons=buttons, x=1.0, xanchor="right", y=1.12, yanchor="top")] if len(tables) > 1 else [],
    )
    note = f" {unknown_se} value(s) have no standard error (NaN) and are drawn without a bar." if unknown_se else ""
    return fig, (
        "Each point is a proxy's predicted loss for quantizing one tensor to one format (pick the proxy in the menu); "
        "higher means more sensitive, and bars are 95% intervals (1.96 standard errors; zero for deterministic "
        f"proxies).{note}"
    )


def _predicted(run_dir: Path):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from ..core.stats import rank_correlation

    df = _results(run_dir)
    df = df[df["kind"] != "returned"]
    proxies = [c[len("predicted_") :] for c in df if c.startswith("predicted_")]
    if not proxies or "kl" not in df or df["kl"].notna().sum() == 0:
        raise _Missing("results.csv has no predicted_<proxy> column or no measured KL yet")
    cols = min(3, len(proxies))
    rows = -(-len(proxies) // cols)
    rho = {p: rank_correlation(df[f"predicted_{p}"].tolist(), df["kl"].tolist())["spearman"] for p in proxies}
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{p}: Spearman {rho[p]:.2f}" for p in proxies])
    for i, p in enumerate(proxies):
        g = df.dropna(subset=[f"predicted_{p}", "kl"])
        r, c = i // cols + 1, i % cols + 1
        fig.add_trace(
            go.Scatter(
                x=g[f"predicted_{p}"],
                y=g["kl"],
                mode="markers",
                name=f"{p} (Spearman {rho[p]:.2f})",
                text=list(g["plan"]),
                hovertemplate="%{text}<br>predicted %{x:.4g}<br>KL %{y:.4g}<extra></extra>",
            ),
            row=r,
            col=c,
        )
        fig.update_xaxes(
            title_text=f"predicted_{p}", type="log" if _log_ok(g[f"predicted_{p}"]) else "linear", row=r, col=c
        )
        fig.update_yaxes(title_text="measured KL", type="log" if _log_ok(g["kl"]) else "linear", row=r, col=c)
    fig.update_layout(height=380 * rows)
    return fig, (
        "One panel per proxy: each point is a plan, its predicted loss against its measured KL; a proxy that ranks "
        "plans "
        "well gives a rising cloud and a Spearman rank correlation near 1 (NaN with fewer than 3 plans)."
    )


def _costs(run_dir: Path):
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    if (run_dir / "costs.csv").exists():
        df = _csv(run_dir / "costs.csv", ("plan", "cost", "part", "value"))
        stacked = True
    else:
        res = _results(run_dir, ("plan", "kind"))
        cost_cols = [c for c in res if c.startswith("cost_")]
        if not cost_cols:
            raise _Missing("no costs.csv and no cost_* column in results.csv")
        df = res.melt(id_vars="plan", value_vars=cost_cols, var_name="cost").assign(
            cost=lambda d: d["cost"].str[5:], part="total"
        )
        stacked = False
    costs = list(dict.fromkeys(df["cost"]))
    parts = sorted(dict.fromkeys(df["part"]), key=lambda p: p == "fixed")  # what lies outside the decisions goes on top
    plans = list(dict.fromkeys(df["plan"]))
    fig = make_subplots(
        rows=len(costs), cols=1, shared_xaxes=True, subplot_titles=costs, vertical_spacing=0.3 / len(costs)
    )
    shown: set[str] = set()
    for r, cost in enumerate(costs, start=1):
        sub = df[df["cost"] == cost].groupby(["part", "plan"], sort=False)["value"].sum()
        for j, part in enumerate(parts):
            if part in sub.index.get_level_values(0):
                v = sub[part].reindex(plans)
                fig.add_trace(
                    go.Bar(
                        x=plans,
                        y=v,
                        name=str(part),
                        legendgroup=str(part),
                        showlegend=part not in shown,
                        marker_color=qualitative.Plotly[j % len(qualitative.Plotly)],
                        hovertemplate="%{x}<br>" + f"{part}: " + "%{y:.4g}<extra></extra>",
                    ),
                    row=r,
                    col=1,
                )
                shown.add(part)
        fig.update_yaxes(title_text=cost, row=r, col=1)
    fig.update_layout(barmode="stack", height=140 + 260 * len(costs), legend_title="part")
    if stacked:
        return fig, (
            "One panel per cost: each bar is a plan, split into the tensor kinds it quantizes plus 'fixed' "
            "(what lies outside the decisions); hover a segment for its value."
        )
    return fig, "One panel per cost (no costs.csv, so totals from results.csv): each bar is a plan's total cost."


def _stages(run_dir: Path):
    import plotly.graph_objects as go

    df = _csv(run_dir / "stages.csv", ("stage", "seconds"))
    labels = [f"{i + 1}. {s}" for i, s in enumerate(df["stage"])]
    peak = df["peak_rss_mb"] if "peak_rss_mb" in df else pd.Series(np.nan, index=df.index)
    fig = go.Figure(
        go.Bar(
            x=df["seconds"],
            y=labels,
            orientation="h",
            customdata=peak,
            hovertemplate="%{y}<br>%{x:.2f} s<br>peak RSS %{customdata:.0f} MB<extra></extra>",
        )
    )
    fig.update_layout(
        height=120 + 22 * len(df), xaxis_title="seconds", yaxis=dict(autorange="reversed", automargin=True)
    )
    return fig, (
        f"Wall-clock seconds of each stage in run order ({df['seconds'].sum():.1f} s in all); "
        "hover a bar for the peak resident memory during that stage."
    )


_BUILDERS = {
    "pareto": _pareto,
    "heatmap": _heatmap,
    "sensitivity": _sensitivity,
    "predicted": _predicted,
    "costs": _costs,
    "stages": _stages,
}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m mpsearch.report.html RUN_DIR")
    print(write_report(Path(sys.argv[1])))
