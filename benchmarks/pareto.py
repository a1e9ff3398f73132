"""Benchmark: measured Pareto fronts of every allocation method on the default model.

One command, resumable (evaluations are cached, the Optuna study is a journal file):

    .venv/bin/python benchmarks/pareto.py [--threads 2] [--trials 60]

Model SmolLM2-135M; calibration 4,096 tokens of Pride and Prejudice; every plan is
measured (KL to the unquantized model, perplexity) on 4,096 tokens of Persuasion.
Budgets are effective bits per weight (fp16 scale and zero per group included),
from 3.25 to the recipe's 4.763. Methods:

- uniform: every tensor in one format (3-bit g64 = 3.5, 3-bit g32 = 4.0, 4-bit g64 = 4.5, 4-bit g32 = 5.0)
- recipe: llama.cpp's use_more_bits pattern, at its own sizes and squeezed into each budget
- greedy, baq, milp: the Fisher proxy's plans from each allocator at each budget
- nsga2: Optuna NSGA-II on measured KL, seeded with Fisher-front plans (3.2-4.8 bits)
- apq: a predictor fitted on every plan measured before it (greedy/BAQ/MILP and the
  NSGA-II trials), searched by MILP at each budget, 2 rounds

Writes benchmarks/results/pareto.{csv,json,png} and a bit heatmap of the best plan at 3.5 bits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from foundation import RESULTS, machine  # noqa: E402  (same folder)

from mpsearch.core.files import write_json_atomic
from mpsearch.core.stats import pareto_mask
from mpsearch.report.plots import bit_heatmap, pareto_plot
from mpsearch.run.evolution import EvolutionConfig, run_evolution
from mpsearch.run.search import SearchConfig, solver_params
from mpsearch.run.session import Session
from mpsearch.solvers import Status, get_solver
from mpsearch.solvers.baselines import recipe_formats
from mpsearch.solvers.predictor import PredictorConfig, predictor_search

BUDGETS = ("3.25", "uniform:3", "recipe:3", "uniform:3:32", "4.25", "uniform:4", "recipe:4")
UNIFORM = ("uniform:3", "uniform:3:32", "uniform:4", "uniform:4:32")
PROXY = "fisher"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trials", type=int, default=60, help="NSGA-II trials in total, seeds included")
    ap.add_argument("--population", type=int, default=12)
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS), help="results folder (default benchmarks/results)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cfg = SearchConfig(
        proxies=(PROXY,),
        budgets=BUDGETS + UNIFORM[-1:],
        threads=a.threads,
        eval_chunks=a.eval_chunks,
        out_dir="",
        progress=False,
    )
    s = Session.open(cfg)
    numel = s.numel
    rows: list[dict] = []

    def record(method: str, label: str, formats: dict, **extra) -> dict:
        plan = s.make_plan(formats)
        q = s.measure(plan, desc=f"{method}@{label}")
        row = {
            "method": method,
            "budget": label,
            "effective_bits": plan.metrics["effective_bits"],
            "kl": q["kl"],
            "ppl": q["ppl"],
            f"predicted_{PROXY}": float(sum(l[j] for l, j in zip(s.losses[PROXY], c)))
            if (c := s.choice_of(formats))
            else np.nan,
            **extra,
        }
        rows.append(row)
        print(
            f"{method:>8} @ {label:<13} {row['effective_bits']:.3f} bits  KL {q['kl']:.4f}  ppl {q['ppl']:.2f}",
            flush=True,
        )
        return row

    ref = s.evaluator.reference_
    print(f"reference ppl {ref.ppl:.2f} on {ref.tokens} tokens")
    by_label = {b.label: b for b in s.budgets}
    for label in UNIFORM:
        record("uniform", label, by_label[label].reference)
    for label in ("recipe:3", "recipe:4"):
        record("recipe", label, by_label[label].reference)
    for label in BUDGETS:
        b = by_label[label]
        if not label.startswith("recipe:"):
            rec = recipe_formats(s.decisions, b.total_bits(numel) / numel, s.space.candidate_formats())
            if rec is not None:
                record("recipe", label, rec)

    seeds, history = [], []
    solve_times = {}
    for method in ("greedy", "baq", "milp"):
        for label in BUDGETS:
            problem = s.problem(PROXY, by_label[label].total_bits(numel))
            solver = get_solver(method, **solver_params(method, s.decisions)).solve(problem)
            assert solver.status_ in Status.SOLUTION_PRESENT, (method, label, solver.status_)
            solve_times[f"{method}@{label}"] = solver.wall_time_
            row = record(method, label, s.formats(solver.choice_))
            history.append((solver.choice_, {"kl": row["kl"], "ppl": row["ppl"]}))
            if method == "milp":
                seeds.append(solver.choice_)

    # NSGA-II on measured KL, seeded with the Fisher front and the MILP plans.
    evo = EvolutionConfig(trials=a.trials, population=a.population, min_bits=3.2, max_bits=4.8, seed=0)
    trials = run_evolution(s, PROXY, evo, out / "pareto_run", extra_seeds=seeds)
    for _, t in trials[trials.measured.astype(bool)].iterrows():
        rows.append(
            {
                "method": "nsga2",
                "budget": "",
                "effective_bits": t.effective_bits,
                "kl": t.kl,
                "ppl": t.ppl,
                "nsga2_trial": int(t.trial),
                "nsga2_source": t.source,
            }
        )
        if not t.duplicate:
            history.append((t.choice, {"kl": t.kl, "ppl": t.ppl}))

    # APQ: fit on every plan measured so far, search the predictor with the MILP, measure, refit.
    budgets_bits = [by_label[label].total_bits(numel) for label in BUDGETS]
    apq = predictor_search(
        s.problem(PROXY),
        [d.numel for d in s.decisions],
        budgets_bits,
        s.measure_choice,
        history,
        PredictorConfig(rounds=2),
        progress=False,
    )
    for _, r in apq[apq["round"] >= 0].iterrows():
        label = BUDGETS[budgets_bits.index(r.budget)]
        record("apq", label, s.formats(r.choice), apq_round=int(r["round"]), apq_predicted_kl=r.predicted)

    df = pd.DataFrame(rows)
    df.to_csv(out / "pareto.csv", index=False)
    pareto_plot(
        df, out / "pareto.png", y="kl", title=f"SmolLM2-135M: measured KL vs effective bits ({len(df)} evaluations)"
    )
    best = df[(df.method == "milp") & (df.budget == "uniform:3")].iloc[0]
    milp35 = s.formats(seeds[BUDGETS.index("uniform:3")])
    bit_heatmap(
        milp35,
        out / "pareto_heatmap_milp_3.5bits.png",
        {m.name: m.in_features for m in s.members},
        title=f"fisher-milp at {best.effective_bits:.3f} effective bits (KL {best.kl:.3f})",
    )

    matched = []
    for label in BUDGETS:
        limit = by_label[label].total_bits(numel) / numel + 1e-9
        row = {"budget": label, "effective_bits": round(limit, 4)}
        for method in ("uniform", "recipe", "greedy", "baq", "milp", "apq", "nsga2"):
            pool = df[(df.method == method) & (df.effective_bits <= limit)]
            if method not in ("nsga2", "uniform"):  # plans made for this budget
                pool = pool[pool.budget == label]
            row[method] = float(pool.kl.min()) if len(pool) else None
        matched.append(row)
    matched = pd.DataFrame(matched)
    for method in ("nsga2", "apq"):
        matched[f"{method}_vs_milp"] = matched[method] / matched["milp"] - 1
    done = trials[trials.measured.astype(bool)]
    # How far the measured front moves beyond the proxy's: each NSGA-II plan against the
    # measured seed plans (the proxy's front), linearly interpolated at its bits.
    seeds_m = done[done.source == "seed"].sort_values("effective_bits")
    kids = done[(done.source == "nsga2") & ~done.duplicate.astype(bool)]
    ratio = kids.kl.to_numpy() / np.interp(kids.effective_bits, seeds_m.effective_bits, seeds_m.kl)
    summary = {
        "reference": ref.to_dict(),
        "eval_tokens": int(ref.tokens),
        "budgets": list(BUDGETS),
        "matched_kl": matched.to_dict(orient="records"),
        "nsga2": {
            "trials": int(len(trials)),
            "measured": int(len(done) - done.duplicate.astype(bool).sum()),
            "front_points": int(pareto_mask(done.effective_bits.to_numpy(), done.kl.to_numpy()).sum()),
            "front_from_nsga2": int(
                done[pareto_mask(done.effective_bits.to_numpy(), done.kl.to_numpy())].source.eq("nsga2").sum()
            ),
            "children_measured": int(len(kids)),
            "children_below_proxy_front": int((ratio < 1).sum()),
            "best_kl_ratio_to_proxy_front": float(ratio.min()) if len(ratio) else None,
            "median_kl_ratio_to_proxy_front": float(np.median(ratio)) if len(ratio) else None,
        },
        "apq_rounds": 2,
        "solve_seconds": solve_times,
        "stages": s.stages.records,
        "wall_seconds": time.perf_counter() - t_start,
        "threads": a.threads,
        "machine": machine(a.threads),
    }
    write_json_atomic(out / "pareto.json", summary)
    print(matched.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
