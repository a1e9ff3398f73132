"""What every search writes and returns: the results table (with bootstrap CIs over the evaluation
windows), the plans, the stage times, the tables behind the plans and the settings; one writer
for the proxy search and the joint W/A/KV search alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.files import safe_name, write_csv_atomic, write_json_atomic
from ..core.plan import Plan


@dataclass
class SearchResult:
    plans: dict[str, Plan]
    table: pd.DataFrame
    stages: pd.DataFrame
    out_dir: Path | None = None
    proxy_tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    #: per proxy: the whole predicted Pareto front (lower convex hull), effective bits vs loss
    fronts: dict[str, pd.DataFrame] = field(default_factory=dict)
    #: rank correlation of each proxy with measured KL, warnings, and which plan each budget returned
    summary: dict = field(default_factory=dict)


def nonfinite_plans(table: pd.DataFrame) -> list[str]:
    """The plans whose measured perplexity or KL is NaN or infinite (the CLI then exits 1)."""
    cols = [c for c in ("ppl", "kl") if c in table]
    bad = ~np.isfinite(table[cols].astype(float)).all(axis=1) if cols else pd.Series(False, index=table.index)
    return [str(p) for p in table.loc[bad, "plan"]]


def results_table(plans: dict[str, Plan], reference_row: dict | None) -> pd.DataFrame:
    rows = [reference_row] if reference_row else []
    for name, plan in plans.items():
        rows.append(
            {
                "plan": name,
                "kind": plan.provenance.get("kind", "proxy"),
                "budget": plan.budget.get("label"),
                "proxy": plan.provenance.get("proxy"),
                "source": plan.provenance.get("returned_from", name),
                **plan.metrics,
                **plan.timings,
            }
        )
    df = window_cis(pd.DataFrame(rows))
    first = [c for c in ("plan", "kind", "budget", "effective_bits", "size_bytes") if c in df]
    pred = sorted(c for c in df if c.startswith("predicted_"))
    meas = [
        c
        for c in (
            "ppl",
            "kl",
            "kl_lo",
            "kl_hi",
            "dkl_best",
            "dkl_best_lo",
            "dkl_best_hi",
            "ppl_ratio_best",
            "ppl_ratio_best_lo",
            "ppl_ratio_best_hi",
            "cloze_acc",
            "mc_acc",
            "mc_acc_norm",
            "accuracy",
            "nll",
            "eval_tokens",
            "slice_kl",
        )
        if c in df
    ]
    return df[first + pred + meas + [c for c in df if c not in first + pred + meas]]


def window_cis(df: pd.DataFrame) -> pd.DataFrame:
    """Bootstrap 95% CIs over the evaluation windows: ``kl_lo``/``kl_hi`` of each plan's KL, and
    ``dkl_best`` (its KL minus the best measured plan's of its budget) with a paired CI
    ``dkl_best_lo``/``dkl_best_hi``: a CI above 0 means the plan is worse beyond the text's noise;
    ``ppl_ratio_best`` (its perplexity over that plan's, from the paired per-window NLL) with its CI.
    The per-window values themselves stay in the plan files, not in the table."""
    from ..core.stats import mean_ci, paired_diff_ci

    if "kl_windows" not in df:
        return df
    df = df.copy()
    has = df["kl_windows"].map(lambda w: isinstance(w, list) and len(w) > 1)
    cols = (
        "kl_lo",
        "kl_hi",
        "dkl_best",
        "dkl_best_lo",
        "dkl_best_hi",
        "ppl_ratio_best",
        "ppl_ratio_best_lo",
        "ppl_ratio_best_hi",
    )
    for c in cols:
        df[c] = float("nan")
    for i in df.index[has]:
        df.loc[i, ["kl_lo", "kl_hi"]] = mean_ci(df.at[i, "kl_windows"])
    if "budget" in df:
        for _, rows in df[has & df["budget"].notna()].groupby("budget"):
            best = rows["kl"].idxmin()
            for i in rows.index:
                df.loc[i, ["dkl_best", "dkl_best_lo", "dkl_best_hi"]] = paired_diff_ci(
                    df.at[i, "kl_windows"], df.at[best, "kl_windows"]
                )
                d = paired_diff_ci(df.at[i, "nll_windows"], df.at[best, "nll_windows"])
                df.loc[i, ["ppl_ratio_best", "ppl_ratio_best_lo", "ppl_ratio_best_hi"]] = [float(np.exp(v)) for v in d]
    return df.drop(columns=[c for c in ("kl_windows", "nll_windows") if c in df])


def write_outputs(
    out: Path, plans: dict[str, Plan], table: pd.DataFrame, stages: pd.DataFrame, tables: dict[str, pd.DataFrame], cfg
) -> None:
    """``plans/*.json``, ``results.csv``, ``stages.csv``, each of ``tables`` as ``<name>.csv`` (the tables the
    plans were solved from) and ``config.json`` (the :class:`~mpsearch.run.config.SearchConfig`)."""
    write_plans(out, plans)
    write_tables(out, {"results": table, "stages": stages, **tables})
    write_json_atomic(out / "config.json", {**asdict(cfg), "rules": [repr(r) for r in cfg.rules]})


def write_plans(out: Path, plans: dict[str, Plan]) -> None:
    """Each plan as ``plans/<name>.json``, its name made safe for a file name."""
    (out / "plans").mkdir(parents=True, exist_ok=True)
    for name, plan in plans.items():
        plan.save(out / "plans" / f"{safe_name(name)}.json")


def write_tables(out: Path, tables: dict[str, pd.DataFrame]) -> None:
    """Each table as ``<name>.csv``, written whole (a reader never sees half a file)."""
    for name, t in tables.items():
        write_csv_atomic(out / f"{safe_name(name)}.csv", t)


def reference_row(quality: dict) -> dict:
    """The unquantized model's row of a results table."""
    return {"plan": "reference (unquantized)", "kind": "reference", "effective_bits": 32.0, **quality}
