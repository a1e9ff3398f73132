"""report.html: every figure is in the page, a partial run still gets a page, and a real
headless browser (Debian's chromium) renders every figure from the page alone, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mpsearch.core.format import Format
from mpsearch.core.plan import Plan
from mpsearch.report import html as html_report
from mpsearch.report.html import FIGURES, write_report

pytest.importorskip("plotly")

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYERS = 3
IN_FEATURES = 128
TENSORS = [
    f"model.layers.{l}.{'self_attn' if k.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{k}"
    for l in range(LAYERS)
    for k in KINDS
]
CANDIDATES = [Format(2, 64), Format(3, 64), Format(4, 64), Format(8, 64), Format.parse("q4_k")]


def full_run(run: Path) -> Path:
    """A finished search's folder, as mpsearch.run.search writes it (plus costs.csv)."""
    rng = np.random.default_rng(0)
    plans = {
        "uniform@bits:4": "uniform",
        "fisher-ilp@bits:3.5": "proxy",
        "kl-ilp@bits:3.5": "proxy",
        "recipe@bits:3.5": "recipe",
    }
    rows = [
        {
            "plan": "reference (unquantized)",
            "kind": "reference",
            "budget": None,
            "effective_bits": 32.0,
            "ppl": 12.0,
            "kl": 0.0,
        }
    ]
    costs = []
    for i, (name, kind) in enumerate(plans.items()):
        formats = {t: CANDIDATES[(i + j) % len(CANDIDATES)] for j, t in enumerate(TENSORS)}
        bits = float(np.mean([f.effective_bits(IN_FEATURES) for f in formats.values()]))
        plan = Plan(
            "tiny",
            "sha256:x",
            {t: {"weight": f} for t, f in formats.items()},
            {"label": name.split("@")[1]},
            {"effective_bits": bits},
            {"kind": kind},
        )
        plan.save(run / "plans" / f"{name.replace(':', '_')}.json")
        kl = 0.05 * 2.0 ** (4 - bits) * (1 + 0.1 * i)
        rows.append(
            {
                "plan": name,
                "kind": kind,
                "budget": name.split("@")[1],
                "effective_bits": bits,
                "predicted_fisher": kl * 3,
                "predicted_kl": kl * (1.5 - 0.1 * i),
                "ppl": 12.0 * (1 + kl),
                "kl": kl,
                "kl_lo": kl * 0.9,
                "kl_hi": kl * 1.1,
                "cost_bytes": bits * 1e6,
                "cost_latency_decode_ms": bits / 2,
            }
        )
        for cost in ("bytes", "latency_decode_ms"):
            costs += [
                {"plan": name, "cost": cost, "part": part, "value": float(rng.uniform(1, 10))}
                for part in (*KINDS, "fixed")
            ]
    pd.DataFrame(rows).to_csv(run / "results.csv", index=False)
    pd.DataFrame(costs).to_csv(run / "costs.csv", index=False)
    for proxy in ("fisher", "kl"):
        pd.DataFrame(
            [
                {
                    "decision": t,
                    "tensor": t,
                    "format": f.key,
                    "option": j,
                    "bits": f.effective_bits(IN_FEATURES),
                    "numel": 128.0 * IN_FEATURES,
                    "qerr": 2.0**-f.bits,
                    "predicted": float(rng.uniform(0.5, 2)) * 2.0**-f.bits,
                    "predicted_se": 0.01 * 2.0**-f.bits if proxy == "kl" and j else float("nan"),
                }
                for t in TENSORS
                for j, f in enumerate(CANDIDATES)
            ]
        ).to_csv(run / f"proxy_table_{proxy}.csv", index=False)
    pd.DataFrame(
        [
            {"stage": s, "seconds": sec, "rss_before_mb": 500.0, "rss_after_mb": 600.0, "peak_rss_mb": 700.0}
            for s, sec in (("load model", 3.0), ("proxy tables", 10.0), ("solve fisher", 0.5), ("evaluate fisher", 8.0))
        ]
    ).to_csv(run / "stages.csv", index=False)
    (run / "config.json").write_text(json.dumps({"model": "tiny", "proxies": ["fisher", "kl"]}))
    return run


class FigureDivs(HTMLParser):
    """Per figure div (``id="fig-<name>"``): how many rendered plotly plots, SVGs, and missing-input paragraphs it
    holds."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str | None]] = []  # (tag, figure id it opens)
        self.found = {n: {"plots": 0, "svgs": 0, "missing": 0} for n in FIGURES}

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        opens = a.get("id", "")[4:] if a.get("id", "").startswith("fig-") and a["id"][4:] in FIGURES else None
        inside = [f for _, f in self.stack if f] + ([opens] if opens else [])
        for f in inside:
            self.found[f]["plots"] += "js-plotly-plot" in classes
            self.found[f]["svgs"] += tag == "svg" and "main-svg" in classes
            self.found[f]["missing"] += tag == "p" and "missing" in classes
        if tag not in self.VOID:
            self.stack.append((tag, opens))

    def handle_endtag(self, tag) -> None:
        while self.stack:
            if self.stack.pop()[0] == tag:
                break


def figure_divs(text: str) -> dict[str, dict[str, int]]:
    p = FigureDivs()
    p.feed(text)
    return p.found


def test_full_run_has_every_figure(tmp_path) -> None:
    path = write_report(full_run(tmp_path), title="tiny run")
    assert path == tmp_path / "report.html"
    text = path.read_text(encoding="utf-8")
    found = figure_divs(text)
    assert all(f["missing"] == 0 for f in found.values()), found
    for name in FIGURES:
        assert f'id="fig-{name}-plot"' in text
    assert text.count("Plotly.newPlot") == len(FIGURES)
    assert "<details>" in text and '"proxies"' in text and "tiny run" in text
    assert "https://cdn" not in text.split("<script", 2)[1][:2000]  # plotly.js inline, no network
    assert not list(tmp_path.glob(".report.html*"))  # the temporary file is gone
    heatmap = html_report._heatmap(tmp_path)[
        0
    ]  # plans by their results.csv names; the first one not a baseline shown first
    assert [t.name for t in heatmap.data] == list(pd.read_csv(tmp_path / "results.csv")["plan"][1:])
    assert heatmap.layout.title.text == "fisher-ilp@bits:3.5" and [t.visible for t in heatmap.data] == [
        False,
        True,
        False,
        False,
    ]


def test_partial_run_says_what_is_missing(tmp_path) -> None:
    pd.DataFrame(
        [
            {
                "plan": "fisher-ilp@bits:3.5",
                "kind": "proxy",
                "budget": "bits:3.5",
                "effective_bits": 3.5,
                "predicted_fisher": 0.1,
            }
        ]
    ).to_csv(tmp_path / "results.csv", index=False)
    done = subprocess.run(
        [sys.executable, "-m", "mpsearch.report.html", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    found = figure_divs(text)
    assert all(f["missing"] == 1 for f in found.values()), found
    assert (
        "no measured KL yet" in text
        and "no plans/*.json" in text
        and "no stages.csv" in text
        and "no costs.csv" in text
    )


def test_empty_folder_and_cost_columns_fallback(tmp_path) -> None:
    write_report(tmp_path)
    assert all(f["missing"] == 1 for f in figure_divs((tmp_path / "report.html").read_text(encoding="utf-8")).values())
    run = full_run(tmp_path / "run")
    (run / "costs.csv").unlink()
    text = write_report(run).read_text(encoding="utf-8")
    assert "totals from results.csv" in text and figure_divs(text)["costs"]["missing"] == 0


def chromium() -> str | None:
    return next(
        (
            p
            for p in map(shutil.which, ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome"))
            if p
        ),
        None,
    )


def test_browser_renders_every_figure(tmp_path) -> None:
    browser = chromium()
    if browser is None:
        if os.environ.get("CI") or os.environ.get("MPSEARCH_REQUIRE_BROWSER"):
            pytest.fail(
                "no Chromium on PATH: install Debian's chromium (apt-get install --no-install-recommends chromium, "
                "as scripts/setup.sh does) so the HTML report's browser test runs"
            )
        pytest.skip(
            "no Chromium on PATH (apt-get install chromium); CI / MPSEARCH_REQUIRE_BROWSER=1 make this a failure"
        )
    path = write_report(full_run(tmp_path / "run"))
    done = subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            path.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = figure_divs(done.stdout)
    for name, f in found.items():
        assert f["plots"] == 1 and f["svgs"] >= 1 and f["missing"] == 0, f"figure {name} not rendered: {f}"
