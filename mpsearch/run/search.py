"""``mpsearch.search(config)``: model + data in, measured mixed-precision plans out.

Stages: load model and data -> build the search space -> primitives (cached) ->
proxy tables -> predicted Pareto front per proxy -> allocator per (proxy, budget) ->
baselines at the same budgets -> measure every plan (perplexity, KL) -> plans (JSON),
results.csv, stages.csv, front_<proxy>.csv, pareto.png.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
from torch import nn

from ..core import registry
from ..core.files import check_out_dir, prepare_out_dir, safe_name, write_csv_atomic, write_json_atomic
from ..core.plan import Plan
from ..core.profiling import Stages
from ..core.progress import SearchProgress
from ..core.space import Decision
from ..core.stats import rank_correlation
from ..cost import BudgetError
from ..models.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION
from ..models.loader import LoadedModel
from ..quant import Format
from ..report.html import write_report
from ..solvers import Status, get_solver, pareto_front  # also registers the solvers
from ..solvers.baselines import recipe_formats
from .config import SearchConfig
from .outputs import SearchResult, nonfinite_plans, reference_row, results_table, write_outputs
from .refine import RefineConfig, proxy_warnings, refine_budget
from .session import Session

log = logging.getLogger(__name__)


def search(
    config: SearchConfig | None = None, *, model: str | nn.Module | None = None, data=None, **overrides
) -> SearchResult:
    """Run a whole search.

    ``search(budgets=("uniform:3",), proxies=("fisher",))`` searches the default model;
    ``search(model=module, data=my_data, space="cnn")`` searches your own ``nn.Module`` on
    your own data (:class:`mpsearch.models.protocol.ModelData`, e.g. ``BatchData(calib, held_out)``).
    A model name (``model="gemma3-270m"``) is a setting like any other."""
    if isinstance(model, str):
        overrides["model"] = model
    lm = None
    if model is not None and not isinstance(model, str):
        lm = loaded_object(model, data)
        overrides["model"] = lm.model_id
    elif data is not None:
        raise ValueError("data= goes with model= an nn.Module; a model by name reads its text or its own data")
    cfg = config or SearchConfig(**overrides)
    if config is not None and overrides:
        cfg = SearchConfig(**{**asdict(config), **overrides})
    if lm is not None and (cfg.calibration, cfg.evaluation) != (DEFAULT_CALIBRATION, DEFAULT_EVALUATION):
        raise ValueError("calibration / evaluation name text files; a model passed as an object takes data=")
    from ..core.space import SearchSpace

    if lm is not None and SearchSpace.from_file(cfg.space).with_rules(cfg.rules).runtime:
        raise ValueError(
            f"search space {cfg.space!r} decides layer inputs / the KV cache: that joint search needs a model by name "
            "(a transformers LM with its tokenizer); use a weights-only space for a model passed as an object"
        )
    if cfg.out_dir:  # before any work: never into a file, the root or someone else's folder
        prepare_out_dir(check_out_dir(cfg.out_dir))
    if SearchSpace.from_file(cfg.space).runtime:  # inputs / KV cache: decided with the weights in one problem
        from .joint import joint_search

        return joint_search(cfg)
    if lm is None:
        return run_search(cfg)
    with borrowed(lm.model):
        return run_search(cfg, lm)


def run_search(cfg: SearchConfig, lm: LoadedModel | None = None) -> SearchResult:
    """The search of a weights-only space, on ``cfg.model`` or on ``lm``."""
    progress = SearchProgress(cfg.progress)
    session = Session.open(cfg, Stages(progress=progress), costs=True, lm=lm)
    stages, decisions, numel = session.stages, session.decisions, session.numel

    plans: dict[str, Plan] = {}
    fronts: dict[str, pd.DataFrame] = {}
    for name in session.tables:
        with stages(f"pareto front {name}"):
            unbounded = session.problem(name)
            front = pareto_front(unbounded)
            fronts[name] = pd.DataFrame({"effective_bits": front.costs / numel, "predicted": front.losses})
        for b in session.budgets:
            with stages(f"solve {name} @ {b.label}"):
                problem = replace(unbounded, budget=b.total_bits(numel))
                solver = get_solver(cfg.solver, **solver_params(cfg.solver, decisions)).solve(problem)
            if solver.status_ not in Status.SOLUTION_PRESENT:
                limits = f" with {', '.join(cfg.constraints)}" if cfg.constraints else ""
                raise BudgetError(
                    f"{cfg.solver} returned {solver.status_} for budget {b.label}{limits}: no plan meets them all"
                )
            plans[f"{name}-{cfg.solver}@{b.label}"] = session.make_plan(
                session.formats(solver.choice_), b, proxy=name, solver=cfg.solver, kind="proxy"
            )
    if cfg.baselines:
        plans.update(baseline_plans(session))
    refinement = None
    if cfg.measure and cfg.refine > 0:
        extra, refinement = refined_plans(session, plans, RefineConfig(cfg.refine, cfg.seed))
        plans.update(extra)

    for plan in plans.values():
        for name, table in session.tables.items():
            plan.metrics[f"predicted_{name}"] = predicted_loss(table, plan.weight_formats())

    out = Path(cfg.out_dir) if cfg.out_dir else None
    if out is not None:  # plans and predictions first; then results.csv holds the plans measured so far
        write_outputs(out, plans, results_table(plans, None), pd.DataFrame(stages.records), proxy_tables(session), cfg)
        if session.costs_suite is not None:
            write_csv_atomic(
                out / "costs.csv",
                pd.DataFrame(
                    [
                        r
                        for name, p in plans.items()
                        for r in session.costs_suite.breakdown(name, p.weight_formats(), session.members)
                    ]
                ),
            )
    reference = None
    if cfg.measure:
        ev = session.evaluator
        reference = reference_row(ev.reference_.to_dict())
        if session.costs_suite is not None:  # the unquantized model as a deployment has it: 16-bit weights
            reference.update(session.costs_suite.row({}, session.members))
        if session.tasks is not None:
            with stages("tasks of the unquantized model"):
                reference.update(session.measure_tasks(None, desc="tasks reference"))
        progress.plans(len(plans))
        for i, (name, plan) in enumerate(plans.items()):
            t0 = time.perf_counter()
            with stages(f"evaluate {name}"):
                plan.metrics.update(session.measure(plan, desc=f"eval {name}"))
                if session.tasks is not None:
                    plan.metrics.update(session.measure_tasks(plan, desc=f"tasks {name}"))
            progress.measured(time.perf_counter() - t0)
            plan.provenance["evaluation"] = {"data": session.evaluation_name, "tokens": int(ev.tokens.numel())}
            if out is not None:  # results.csv grows as each plan is measured
                plan.save(out / "plans" / f"{safe_name(name)}.json")
                write_csv_atomic(out / "results.csv", results_table(dict(list(plans.items())[: i + 1]), reference))
                write_report(out)  # the report follows the results, so an interrupted search still has one

    table = results_table(plans, reference)
    stage_df = pd.DataFrame(stages.records)
    summary = search_summary(table, list(session.tables), refinement) if cfg.measure else {}
    for line in summary.get("warnings", []):
        log.warning("%s", line)
    if out is not None:
        write_outputs(out, plans, table, stage_df, proxy_tables(session), cfg)
        write_json_atomic(out / "summary.json", summary)
        if refinement is not None:
            write_csv_atomic(out / "refinement.csv", refinement)
        for name, f in fronts.items():
            f.to_csv(out / f"front_{safe_name(name)}.csv", index=False)
        if cfg.measure:
            from ..report.plots import pareto_plot

            plotted = table[table.kind != "reference"].assign(method=lambda d: [n.split("@")[0] for n in d.plan])
            pareto_plot(plotted, out / "pareto.png", y="kl", title="measured KL vs effective bits, per method")
        write_csv_atomic(out / "stages.csv", pd.DataFrame(stages.records))
        write_report(out)
    return SearchResult(plans, table, stage_df, out, session.tables, fronts, summary)


def proxy_tables(session: Session) -> dict[str, pd.DataFrame]:
    """The proxy tables the plans were solved from, by the file name they are written under."""
    return {f"proxy_table_{name}": t for name, t in session.tables.items()}


def refined_plans(
    session: Session, plans: dict[str, Plan], config: RefineConfig
) -> tuple[dict[str, Plan], pd.DataFrame]:
    """Per budget: each proxy's best refined plan, and ``returned@<budget>``, the best measured
    plan. Also every plan measured on the slice, as a table (the refinement's record)."""
    out: dict[str, Plan] = {}
    rows = []
    for b in session.budgets:
        mine = {n: p for n, p in plans.items() if p.budget.get("label") == b.label}
        with session.stages(f"refine @ {b.label}"):
            r = refine_budget(session, b, mine, config)
        every = {**mine, **r.plans}
        for name, plan in every.items():
            plan.metrics["slice_kl"] = r.slice_kl[name]
            rows.append(
                {
                    "budget": b.label,
                    "plan": name,
                    "kind": plan.provenance.get("kind"),
                    "proxy": plan.provenance.get("proxy"),
                    "effective_bits": plan.metrics["effective_bits"],
                    "slice_kl": r.slice_kl[name],
                    **{f"predicted_{p}": predicted_loss(t, plan.weight_formats()) for p, t in session.tables.items()},
                }
            )
        for proxy in {p.provenance.get("proxy") for p in r.plans.values()}:
            best = min((n for n, p in r.plans.items() if p.provenance.get("proxy") == proxy), key=r.slice_kl.get)
            out[f"{proxy}-refined@{b.label}"] = r.plans[best]
        best = every[r.returned]
        name = next((n for n, p in {**mine, **out}.items() if p is best), r.returned)
        out[f"returned@{b.label}"] = Plan(
            best.model_id,
            best.model_fingerprint,
            best.tensors,
            dict(best.budget),
            dict(best.metrics),
            {
                **best.provenance,
                "kind": "returned",
                "returned_from": name,
                "refinement": {"plans_measured": len(r.slice_kl), "slice_tokens": int(session.slice_tokens.numel())},
            },
            importance=best.importance,
            timings=dict(best.timings),
        )
    return out, pd.DataFrame(rows)


def search_summary(table: pd.DataFrame, proxies: list[str], refinement: pd.DataFrame | None = None) -> dict:
    """Each proxy's rank correlation with measured KL, over the plans measured on the evaluation
    text and over every plan the refinement measured on its slice; a warning for every proxy plan
    that measures worse than a baseline it was predicted to beat; the plan each budget returned."""
    plans = table[~table.kind.isin(["reference", "returned"])]
    corr = {
        p: rank_correlation(plans[f"predicted_{p}"].tolist(), plans["kl"].tolist())
        for p in proxies
        if f"predicted_{p}" in plans
    }
    out = {"correlation": corr, "warnings": proxy_warnings(table, proxies), "nonfinite": nonfinite_plans(table)}
    if refinement is not None and len(refinement):
        out["slice_correlation"] = {
            p: rank_correlation(refinement[f"predicted_{p}"].tolist(), refinement["slice_kl"].tolist())
            for p in proxies
            if f"predicted_{p}" in refinement
        }
        out["returned"] = {r.budget: r.source for _, r in table[table.kind == "returned"].iterrows()}
    return out


def loaded_object(model: nn.Module, data) -> LoadedModel:
    """A model passed as an object, with its data, as the session takes it (checked in :meth:`Session.open`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a model name or a torch.nn.Module, got {type(model).__name__}")
    if data is None:
        raise ValueError(
            "a model passed as an object needs data=: an object with name, calibration(chunks, skip) and "
            "evaluation(chunks) (mpsearch.models.protocol.ModelData; BatchData wraps batches you have)"
        )
    return LoadedModel(model, None, type(model).__name__, data=data)


@contextlib.contextmanager
def borrowed(model: nn.Module):
    """The search runs a user's model in eval mode without gradients on its weights; its own
    mode and ``requires_grad`` flags are given back afterwards (its weights are never changed)."""
    training, flags = model.training, [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        model.train(training)
        for p, flag in flags:
            p.requires_grad_(flag)


def solver_params(name: str, decisions: list[Decision]) -> dict:
    """Allocators that model loss per weight (BAQ) take each decision's size."""
    accepts = inspect.signature(registry.get("solver", name)).parameters
    return {"sizes": [d.numel for d in decisions]} if "sizes" in accepts else {}


BASELINES = {"uniform": "uniform", "recipe": "llama.cpp Q4_K_M-style recipe"}


def baseline_plans(session: Session) -> dict[str, Plan]:
    """Uniform plans for ``uniform:B`` budgets, the recipe itself for ``recipe:B`` budgets,
    and the recipe matched to every other budget."""
    out: dict[str, Plan] = {}
    for b in session.budgets:
        if b.reference is not None:  # uniform:B and recipe:B budgets are defined by a baseline plan
            kind = "uniform" if b.label.startswith("uniform:") else "recipe"
            out[b.reference_name] = session.make_plan(b.reference, b, baseline=BASELINES[kind], kind=kind)
            if b.label.startswith("recipe:"):
                continue
        bits = b.limit if b.metric == "bits" else b.total_bits(session.numel) / session.numel
        rec = recipe_formats(session.decisions, bits, session.space.candidate_formats())
        if rec is not None:
            out[f"recipe@{b.label}"] = session.make_plan(rec, b, baseline=BASELINES["recipe"], kind="recipe")
    return out


def predicted_loss(table: pd.DataFrame, formats: dict[str, Format]) -> float:
    """Sum of a proxy's per-tensor predictions for a plan (NaN if a format is not in the table)."""
    lookup = dict(zip(zip(table["tensor"], table["format"]), table["predicted"]))
    vals = [lookup.get((n, f.key)) for n, f in formats.items()]
    return float("nan") if any(v is None for v in vals) else float(sum(vals))
