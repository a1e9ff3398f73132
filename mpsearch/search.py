"""``mpsearch.search(config)``: model + data in, measured mixed-precision plans out.

Stages: load model and data -> build the search space -> primitives (cached) ->
proxy tables -> predicted Pareto front per proxy -> allocator per (proxy, budget) ->
baselines at the same budgets -> measure every plan (perplexity, KL) -> plans (JSON),
results.csv, stages.csv, front_<proxy>.csv.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import __version__, registry
from .baselines import recipe_formats
from .cache import cache_dir, content_key
from .cost import Budget, BudgetError, decision_costs, plan_bits, plan_bytes
from .evaluate import Evaluator
from .models import load_model, load_text, token_chunks
from .models.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION
from .plan import Plan, fingerprint, write_json_atomic
from .primitives import compute_primitives, tokens_hash
from .profiling import Stages
from .proxies import load_proxy
from .proxies.table import cached_proxy_table, decision_losses
from .quant import Format, applied
from .solvers import Problem, Status, get_solver, pareto_front
from .space import Decision, Rule, SearchSpace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search needs; the CLI fills it from flags."""

    model: str = "smollm2"
    calibration: str = DEFAULT_CALIBRATION
    evaluation: str = DEFAULT_EVALUATION
    space: str = "llama"
    proxies: tuple[str, ...] = ("fisher",)
    budgets: tuple[str, ...] = ("uniform:3",)
    solver: str = "milp"
    rules: tuple[Rule, ...] = ()
    calib_seq_len: int = 512
    calib_chunks: int = 8
    eval_seq_len: int = 512
    eval_chunks: int = 16
    baselines: bool = True
    measure: bool = True
    threads: int = 2
    seed: int = 0
    out_dir: str = "runs/latest"
    use_cache: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.proxies:
            raise ValueError("give at least one proxy")
        if not self.budgets:
            raise ValueError("give at least one budget")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.calibration == self.evaluation:
            raise ValueError(f"calibration and evaluation data are both {self.calibration!r}: never evaluate on calibration text")


@dataclass
class SearchResult:
    plans: dict[str, Plan]
    table: pd.DataFrame
    stages: pd.DataFrame
    out_dir: Path | None = None
    proxy_tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    #: per proxy: the whole predicted Pareto front (lower convex hull), effective bits vs loss
    fronts: dict[str, pd.DataFrame] = field(default_factory=dict)


def search(config: SearchConfig | None = None, **overrides) -> SearchResult:
    """Run a whole search; ``search(budgets=("uniform:3",), proxies=("fisher",))`` works too."""
    cfg = config or SearchConfig(**overrides)
    if config is not None and overrides:
        cfg = SearchConfig(**{**asdict(config), **overrides})
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    stages = Stages()
    proxies = [load_proxy(p) for p in cfg.proxies]  # a typo fails before any heavy work
    space = SearchSpace.from_file(cfg.space).with_rules(cfg.rules)

    with stages("load model"):
        lm = load_model(cfg.model)
        model = lm.model
    with stages("build space"):
        decisions = space.build(model)
        members = [m for d in decisions for m in d.members]
        numel = sum(m.numel for m in members)
        costs = decision_costs(decisions)
        budgets = [Budget.parse(b, decisions, space.base_format) for b in cfg.budgets]
        check_budgets(budgets, costs, numel)
    with stages("load data"):
        calib = token_chunks(lm.tokenizer, load_text(cfg.calibration), cfg.calib_seq_len, cfg.calib_chunks)
        evalt = token_chunks(lm.tokenizer, load_text(cfg.evaluation), cfg.eval_seq_len, cfg.eval_chunks) if cfg.measure else None
    needs = set().union(*(p.needs for p in proxies))
    with stages("primitives"):
        prims = compute_primitives(model, [m.name for m in members], calib, needs, cfg.use_cache, cfg.progress)

    tables, losses = {}, {}
    for p in proxies:
        with stages(f"proxy table {p.name}"):
            tables[p.name] = cached_proxy_table(p, model, decisions, prims, cfg.use_cache, cfg.progress)
            losses[p.name] = decision_losses(tables[p.name], decisions)

    fp, data_info = fingerprint(model), {"calibration": cfg.calibration, "calib_tokens": int(calib.numel()), "calib_sha": tokens_hash(calib)}
    provenance = {"data": data_info, "seed": cfg.seed, "space": space.name, "mpsearch_version": __version__}
    plans: dict[str, Plan] = {}
    fronts: dict[str, pd.DataFrame] = {}
    names, options = [d.name for d in decisions], [[f.key for f in d.formats] for d in decisions]
    for p in proxies:
        with stages(f"pareto front {p.name}"):
            unbounded = Problem.build(names, options, losses[p.name], costs, float(sum(float(c.max()) for c in costs)))
            front = pareto_front(unbounded)
            fronts[p.name] = pd.DataFrame({"effective_bits": front.costs / numel, "predicted": front.losses})
        for b in budgets:
            with stages(f"solve {p.name} @ {b.label}"):
                problem = replace(unbounded, budget=b.total_bits(numel))
                solver = get_solver(cfg.solver, **solver_params(cfg.solver, decisions)).solve(problem)
            if solver.status_ not in Status.SOLUTION_PRESENT:
                raise BudgetError(f"{cfg.solver} returned {solver.status_} for budget {b.label}")
            formats = {m.name: d.formats[j] for d, j in zip(decisions, solver.choice_) for m in d.members}
            plans[f"{p.name}-{cfg.solver}@{b.label}"] = make_plan(lm.model_id, fp, formats, b, {**provenance, "proxy": p.name, "solver": cfg.solver})
    if cfg.baselines:
        plans.update(baseline_plans(decisions, budgets, space, lm.model_id, fp, provenance))

    for plan in plans.values():
        fmts = plan.weight_formats()
        plan.metrics.update({"effective_bits": plan_bits(fmts, members), "size_bytes": plan_bytes(fmts, members)})
        for p in proxies:
            plan.metrics[f"predicted_{p.name}"] = predicted_loss(tables[p.name], fmts)

    reference_row = None
    if cfg.measure:
        with stages("evaluate reference"):
            ev = Evaluator(evalt, progress=cfg.progress).fit(model)
        reference_row = {"plan": "reference (unquantized)", "kind": "reference", "effective_bits": 32.0, **ev.reference_.to_dict()}
        for name, plan in plans.items():
            with stages(f"evaluate {name}"):
                plan.metrics.update(measure(model, plan, ev, prims.weights, desc=f"eval {name}"))
            plan.provenance["evaluation"] = {"data": cfg.evaluation, "tokens": int(evalt.numel())}

    table = results_table(plans, reference_row)
    stage_df = pd.DataFrame(stages.records)
    out = Path(cfg.out_dir) if cfg.out_dir else None
    if out is not None:
        write_outputs(out, plans, table, stage_df, tables, cfg)
        for name, f in fronts.items():
            f.to_csv(out / f"front_{safe_name(name)}.csv", index=False)
    return SearchResult(plans, table, stage_df, out, tables, fronts)


def solver_params(name: str, decisions: list[Decision]) -> dict:
    """Allocators that model loss per weight (BAQ) take each decision's size."""
    accepts = inspect.signature(registry.get("solver", name)).parameters
    return {"sizes": [d.numel for d in decisions]} if "sizes" in accepts else {}


def check_budgets(budgets: list[Budget], costs: list[np.ndarray], numel: int) -> None:
    """Fail before any heavy work when a budget is below the smallest feasible one."""
    min_bits = sum(float(c.min()) for c in costs)
    for b in budgets:
        if b.total_bits(numel) < min_bits * (1 - 1e-12):
            raise BudgetError(
                f"budget {b.label} is infeasible: the smallest feasible budget is "
                f"{min_bits / numel:.4f} effective bits per weight ({min_bits / 8 / 1e6:.3f} MB) for this search space"
            )


def make_plan(model_id: str, fp: str, formats: dict[str, Format], budget: Budget | None, provenance: dict) -> Plan:
    tensors = {n: {"weight": f} for n, f in formats.items()}
    return Plan(model_id, fp, tensors, budget.to_dict() if budget else {}, {}, dict(provenance))


def baseline_plans(decisions: list[Decision], budgets: list[Budget], space: SearchSpace, model_id: str, fp: str, provenance: dict) -> dict[str, Plan]:
    """Uniform plans for ``uniform:B`` budgets, the recipe itself for ``recipe:B`` budgets,
    and the recipe matched to every other budget."""
    out: dict[str, Plan] = {}
    numel = sum(d.numel for d in decisions)
    for b in budgets:
        if b.reference is not None:  # uniform:B and recipe:B budgets are defined by a baseline plan
            kind = "uniform" if b.label.startswith("uniform:") else "llama.cpp Q4_K_M-style recipe"
            out[b.reference_name] = make_plan(model_id, fp, b.reference, b, {**provenance, "baseline": kind})
            if b.label.startswith("recipe:"):
                continue
        bits = b.limit if b.metric == "bits" else b.total_bits(numel) / numel
        rec = recipe_formats(decisions, bits, space.candidate_formats())
        if rec is not None:
            out[f"recipe@{b.label}"] = make_plan(model_id, fp, rec, b, {**provenance, "baseline": "llama.cpp Q4_K_M-style recipe"})
    return out


def predicted_loss(table: pd.DataFrame, formats: dict[str, Format]) -> float:
    """Sum of a proxy's per-tensor predictions for a plan (NaN if a format is not in the table)."""
    lookup = dict(zip(zip(table["tensor"], table["format"]), table["predicted"]))
    vals = [lookup.get((n, f.key)) for n, f in formats.items()]
    return float("nan") if any(v is None for v in vals) else float(sum(vals))


def plan_hash(plan: Plan) -> str:
    body = json.dumps({n: {t: f.to_dict() for t, f in e.items() if f} for n, e in sorted(plan.tensors.items())}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:20]


def measure(model, plan: Plan, ev: Evaluator, model_hash: str, desc: str = "eval") -> dict:
    """Perplexity and KL of ``plan``; cached by (model weights, plan, eval tokens) so reruns resume."""
    path = cache_dir() / "evals" / f"{content_key(model_hash, plan_hash(plan), tokens_hash(ev.tokens), ev.batch_size)}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("evaluation cache %s is corrupt; measuring again", path)
    with applied(model, plan):
        q = ev.score(model, desc=desc).to_dict()
    write_json_atomic(path, q)
    return q


def results_table(plans: dict[str, Plan], reference_row: dict | None) -> pd.DataFrame:
    rows = [reference_row] if reference_row else []
    for name, plan in plans.items():
        kind = "baseline" if "baseline" in plan.provenance else "search"
        rows.append({"plan": name, "kind": kind, "budget": plan.budget.get("label"), **plan.metrics})
    df = pd.DataFrame(rows)
    first = [c for c in ("plan", "kind", "budget", "effective_bits", "size_bytes") if c in df]
    pred = sorted(c for c in df if c.startswith("predicted_"))
    meas = [c for c in ("ppl", "kl", "nll", "eval_tokens") if c in df]
    return df[first + pred + meas + [c for c in df if c not in first + pred + meas]]


def write_outputs(out: Path, plans: dict[str, Plan], table: pd.DataFrame, stages: pd.DataFrame, tables: dict[str, pd.DataFrame], cfg: SearchConfig) -> None:
    (out / "plans").mkdir(parents=True, exist_ok=True)
    for name, plan in plans.items():
        plan.save(out / "plans" / f"{safe_name(name)}.json")
    table.to_csv(out / "results.csv", index=False)
    stages.to_csv(out / "stages.csv", index=False)
    for name, t in tables.items():
        t.to_csv(out / f"proxy_table_{safe_name(name)}.csv", index=False)
    cfg_d = asdict(cfg)
    cfg_d["rules"] = [repr(r) for r in cfg.rules]
    write_json_atomic(out / "config.json", cfg_d)


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)
