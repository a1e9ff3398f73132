"""``mpsearch.search(config)``: model + data in, measured mixed-precision plans out.

Stages: load model and data -> build the search space -> primitives (cached) ->
proxy tables -> predicted Pareto front per proxy -> allocator per (proxy, budget) ->
baselines at the same budgets -> measure every plan (perplexity, KL) -> plans (JSON),
results.csv, stages.csv, front_<proxy>.csv, pareto.png.
"""
from __future__ import annotations

import inspect
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..core import registry
from ..solvers.baselines import recipe_formats
from ..cost import BudgetError
from ..core.files import check_out_dir, prepare_out_dir
from ..models.data import BOS_CHOICES, DEFAULT_CALIBRATION, DEFAULT_EVALUATION
from ..report.html import write_report
from ..core.plan import Plan, write_json_atomic
from ..core.profiling import Stages
from ..core.progress import SearchProgress
from ..quant import Format, get_quantizer
from .refine import RefineConfig, proxy_warnings, rank_correlation, refine_budget
from .session import Session
from ..solvers import Status, get_solver, pareto_front  # also registers the solvers
from ..core.space import Decision, Rule

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
    #: calibration windows (from the start of the text, the calibration windows first) that
    #: GPTQ's Gram matrix and the ``oerr`` value are fitted on. GPTQ fits the whole [in, in]
    #: matrix and overfits a few thousand tokens: on SmolLM2's 1536-wide down_proj, 8 x 512
    #: tokens give it a larger output error on held-out text than RTN (README, "GPTQ needs
    #: clipped ranges and more calibration than the diagonal"). The refinement slice then
    #: starts after them.
    gram_chunks: int = 64
    #: Hutchinson probes per calibration sequence, and how many sequences (0 = all)
    hessian_probes: int = 2
    hessian_sequences: int = 0
    eval_seq_len: int = 512
    eval_chunks: int = 16
    #: measured refinement: plans measured per (proxy, budget) beyond the proxy plan and
    #: baselines (0: off), on refine_chunks x refine_seq_len calibration tokens after the calibration windows
    refine: int = 16
    refine_chunks: int = 4
    refine_seq_len: int = 256
    #: which windows start with the tokens the tokenizer puts in front (BOS): auto (all), none,
    #: calibration or evaluation only. Only for diagnosis: anything but auto shows the model text it never saw
    bos: str = "auto"
    #: weight the scale search of formats that take one (GGUF types) by each layer input's
    #: mean square per column, as llama.cpp does with an imatrix from the calibration text
    imatrix: bool = True
    #: memory (MB) for quantized tensors whose quantizer is slow (GPTQ, IQ3_S, weighted GGUF
    #: searches), reused across the plans a search measures; RTN is never kept
    memo_mb: int = 1024
    baselines: bool = True
    measure: bool = True
    threads: int = 2
    #: where the model computes: cpu, cuda, cuda:N or auto (cuda when available); the spelling is checked here,
    #: the device when the session opens (:func:`mpsearch.core.device.resolve_device`), still before heavy work
    device: str = "auto"
    seed: int = 0
    out_dir: str = "runs/latest"
    use_cache: bool = True
    progress: bool = True
    #: seconds between the saved states of a long primitive pass (a killed search resumes from the last one)
    checkpoint_every: float = 30.0
    #: spaces with run-time targets (:mod:`mpsearch.run.joint`): the context length a memory budget
    #: holds the KV cache at (0: no KV cache in the space), sequences per batch, tokens decoded
    #: one at a time through the cache when measuring, the run-time proxy, a MAC-weighted bound
    #: on the mean activation bits (0: none), and the allocations to make per budget
    context: int = 0
    batch: int = 1
    decode: int = 128
    runtime_proxy: str = "auto"
    act_bits: float = 0.0
    input_min_bits: int = 0
    allocations: tuple[str, ...] = ("joint", "separate")
    #: costs (:mod:`mpsearch.cost`): limits beside the budget (``latency_decode<=12ms``, ``energy<=25mJ``),
    #: the hardware profile the roofline latencies use (``local``: this machine, measured), the energy
    #: table, prompt tokens for the prefill latencies, and whether to time this machine's kernels
    #: (``measured_decode`` / ``measured_prefill``; cached per machine, model and space)
    constraints: tuple[str, ...] = ()
    hardware: str = "local"
    energy_table: str = "horowitz-45nm"
    prefill: int = 512
    profile: bool = True
    #: task accuracy (:mod:`mpsearch.measure.tasks`) of every measured plan: cloze items from the evaluation text
    #: (multiple-choice items: half as many), each with at most ``task_context`` tokens of context
    tasks: bool = True
    task_items: int = 100
    task_context: int = 64

    def __post_init__(self) -> None:
        """Everything that can be checked without the model is checked here, so a typo
        fails in a second, before the model loads (see :meth:`check`)."""
        if not self.proxies:
            raise ValueError("give at least one proxy")
        if not self.budgets:
            raise ValueError("give at least one budget")
        for name in ("calib_chunks", "gram_chunks", "eval_chunks", "calib_seq_len", "eval_seq_len", "threads", "hessian_probes", "hessian_sequences", "seed",
                     "refine", "refine_chunks", "refine_seq_len", "memo_mb", "task_items", "task_context"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        for name, least in (("calib_chunks", 1), ("gram_chunks", 1), ("eval_chunks", 1), ("calib_seq_len", 2), ("eval_seq_len", 2), ("refine", 0),
                            ("refine_chunks", 1), ("refine_seq_len", 2), ("memo_mb", 0), ("task_items", 2), ("task_context", 8)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if not isinstance(self.checkpoint_every, (int, float)) or isinstance(self.checkpoint_every, bool) or not self.checkpoint_every >= 0:
            raise ValueError(f"checkpoint_every must be a number of seconds >= 0, got {self.checkpoint_every!r}")
        from ..core.device import check_device_spec

        check_device_spec(self.device)
        for name, least in (("context", 0), ("batch", 1), ("decode", 1), ("input_min_bits", 0), ("prefill", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {v!r}")
        if self.decode > 32 and self.decode % 32:
            raise ValueError(f"decode must be at most 32 or a multiple of 32 (blocks of 32 decoded tokens are the bootstrap windows), got {self.decode}")
        if self.context and self.decode >= self.context:
            raise ValueError(f"decode ({self.decode}) must be shorter than the context ({self.context})")
        if not isinstance(self.act_bits, (int, float)) or not 0 <= self.act_bits <= 16:
            raise ValueError(f"act_bits must be 0 (no bound) or a mean bit width up to 16, got {self.act_bits!r}")
        bad = set(self.allocations) - {"joint", "separate"}
        if not self.allocations or bad:
            raise ValueError(f"allocations must be some of 'joint', 'separate'; got {list(self.allocations)}")
        if self.hessian_probes < 1 or self.hessian_sequences < 0:
            raise ValueError(f"hessian_probes must be >= 1 and hessian_sequences >= 0, got {self.hessian_probes}, {self.hessian_sequences}")
        if not isinstance(self.imatrix, bool):
            raise ValueError(f"imatrix must be true or false, got {self.imatrix!r}")
        if self.bos not in BOS_CHOICES:
            raise ValueError(f"bos must be one of {', '.join(BOS_CHOICES)}, got {self.bos!r}")
        if self.calibration == self.evaluation:
            raise ValueError(f"calibration and evaluation data are both {self.calibration!r}: never evaluate on calibration text")
        from ..models.loader import WITH_DATA

        if self.model in WITH_DATA and (self.calibration, self.evaluation) != (DEFAULT_CALIBRATION, DEFAULT_EVALUATION):
            raise ValueError(f"model {self.model!r} brings its own data; --calibration/--evaluation do not apply to it")
        self.check()

    def check(self) -> None:
        """Budgets, solver, proxies, search space and rules resolve (no model needed)."""
        from ..cost import parse_budget_text
        from ..proxies import load_proxy
        from ..core.space import SearchSpace

        for b in self.budgets:
            parse_budget_text(b)
        solver = registry.get("solver", self.solver)
        from ..cost.hardware import load_hardware
        from ..cost.model import ConstraintSpec

        for c in self.constraints:
            ConstraintSpec.parse(c)
        if self.constraints and not getattr(solver, "supports_constraints", False):
            raise ValueError(f"solver {self.solver!r} takes one budget; --constraint needs one that takes several (milp, brute)")
        if self.hardware != "local":
            load_hardware(self.hardware)
        load_hardware(self.energy_table)
        for p in self.proxies:
            load_proxy(p)
        space = SearchSpace.from_file(self.space).with_rules(self.rules)
        if space.runtime:
            from .joint import check_config

            if self.constraints:
                raise ValueError(f"search space {space.name!r} decides layer inputs / the KV cache too; --constraint is not "
                                 "implemented for the joint problem yet (use --budget, or a weights-only space)")
            check_config(self, space)
        elif self.context or self.act_bits or self.input_min_bits:
            raise ValueError(f"search space {space.name!r} decides weights only: --context, --act-bits and --input-min-bits "
                             "need a space with [input] or [kv_cache] (e.g. llama_wa, llama_wkv, llama_wakv)")
        if not self.imatrix:
            for f in space.candidate_formats() + [r.pin for r in space.rules if r.pin is not None]:
                if get_quantizer(f.quantizer).importance_kind == "gram":
                    raise ValueError(f"search space {space.source or space.name}: it offers {f.key}, which needs each layer input's "
                                     "Gram matrix from the calibration data; imatrix=False (--no-imatrix) turns that off")


def config_to_dict(cfg: SearchConfig) -> dict:
    """JSON-able settings (what a study stores so that a worker elsewhere opens the same session)."""
    out = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    out["rules"] = [{"match": r.match, "pin": r.pin.key if r.pin is not None else None, "min_bits": r.min_bits,
                     "max_bits": r.max_bits, "exclude": r.exclude} for r in cfg.rules]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def config_from_dict(d: dict, **overrides) -> SearchConfig:
    """The inverse of :func:`config_to_dict`; unknown keys are an error naming them."""
    names = {f.name for f in fields(SearchConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"search settings name unknown fields {sorted(unknown)} (written by another mpsearch version?)")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in {**d, **overrides}.items()}
    d["rules"] = tuple(Rule(r["match"], Format.parse(r["pin"]) if r["pin"] else None, r["min_bits"], r["max_bits"], r["exclude"])
                       for r in d.get("rules", ()))
    return SearchConfig(**d)


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


def search(config: SearchConfig | None = None, **overrides) -> SearchResult:
    """Run a whole search; ``search(budgets=("uniform:3",), proxies=("fisher",))`` works too."""
    cfg = config or SearchConfig(**overrides)
    if config is not None and overrides:
        cfg = SearchConfig(**{**asdict(config), **overrides})
    from ..core.space import SearchSpace

    if cfg.out_dir:  # before any work: never into a file, the root or someone else's folder
        prepare_out_dir(check_out_dir(cfg.out_dir))
    if SearchSpace.from_file(cfg.space).runtime:  # inputs / KV cache: decided with the weights in one problem
        from .joint import joint_search

        return joint_search(cfg)
    progress = SearchProgress(cfg.progress)
    session = Session.open(cfg, Stages(progress=progress), costs=True)
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
                raise BudgetError(f"{cfg.solver} returned {solver.status_} for budget {b.label}{limits}: no plan meets them all")
            plans[f"{name}-{cfg.solver}@{b.label}"] = session.make_plan(session.formats(solver.choice_), b, proxy=name, solver=cfg.solver,
                                                                         kind="proxy")
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
        write_outputs(out, plans, results_table(plans, None), pd.DataFrame(stages.records), session.tables, cfg)
        if session.costs_suite is not None:
            write_csv_atomic(out / "costs.csv", pd.DataFrame([r for name, p in plans.items()
                                                              for r in session.costs_suite.breakdown(name, p.weight_formats(), session.members)]))
    reference_row = None
    if cfg.measure:
        ev = session.evaluator
        reference_row = {"plan": "reference (unquantized)", "kind": "reference", "effective_bits": 32.0, **ev.reference_.to_dict()}
        if session.costs_suite is not None:  # the unquantized model as a deployment has it: 16-bit weights
            reference_row.update(session.costs_suite.row({}, session.members))
        if session.tasks is not None:
            with stages("tasks of the unquantized model"):
                reference_row.update(session.measure_tasks(None, desc="tasks reference"))
        progress.plans(len(plans))
        for i, (name, plan) in enumerate(plans.items()):
            t0 = time.perf_counter()
            with stages(f"evaluate {name}"):
                plan.metrics.update(session.measure(plan, desc=f"eval {name}"))
                if session.tasks is not None:
                    plan.metrics.update(session.measure_tasks(plan, desc=f"tasks {name}"))
            progress.measured(time.perf_counter() - t0)
            plan.provenance["evaluation"] = {"data": cfg.evaluation, "tokens": int(ev.tokens.numel())}
            if out is not None:  # results.csv grows as each plan is measured
                plan.save(out / "plans" / f"{safe_name(name)}.json")
                write_csv_atomic(out / "results.csv", results_table(dict(list(plans.items())[: i + 1]), reference_row))
                write_report(out)  # the report follows the results, so an interrupted search still has one

    table = results_table(plans, reference_row)
    stage_df = pd.DataFrame(stages.records)
    summary = search_summary(table, list(session.tables), refinement) if cfg.measure else {}
    for line in summary.get("warnings", []):
        log.warning("%s", line)
    if out is not None:
        write_outputs(out, plans, table, stage_df, session.tables, cfg)
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


def refined_plans(session: Session, plans: dict[str, Plan], config: RefineConfig) -> tuple[dict[str, Plan], pd.DataFrame]:
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
            rows.append({"budget": b.label, "plan": name, "kind": plan.provenance.get("kind"), "proxy": plan.provenance.get("proxy"),
                         "effective_bits": plan.metrics["effective_bits"], "slice_kl": r.slice_kl[name],
                         **{f"predicted_{p}": predicted_loss(t, plan.weight_formats()) for p, t in session.tables.items()}})
        for proxy in {p.provenance.get("proxy") for p in r.plans.values()}:
            best = min((n for n, p in r.plans.items() if p.provenance.get("proxy") == proxy), key=r.slice_kl.get)
            out[f"{proxy}-refined@{b.label}"] = r.plans[best]
        best = every[r.returned]
        name = next((n for n, p in {**mine, **out}.items() if p is best), r.returned)
        out[f"returned@{b.label}"] = Plan(
            best.model_id, best.model_fingerprint, best.tensors, dict(best.budget), dict(best.metrics),
            {**best.provenance, "kind": "returned", "returned_from": name,
             "refinement": {"plans_measured": len(r.slice_kl), "slice_tokens": int(session.slice_tokens.numel())}},
            importance=best.importance, timings=dict(best.timings))
    return out, pd.DataFrame(rows)


def search_summary(table: pd.DataFrame, proxies: list[str], refinement: pd.DataFrame | None = None) -> dict:
    """Each proxy's rank correlation with measured KL, over the plans measured on the evaluation
    text and over every plan the refinement measured on its slice; a warning for every proxy plan
    that measures worse than a baseline it was predicted to beat; the plan each budget returned."""
    plans = table[~table.kind.isin(["reference", "returned"])]
    corr = {p: rank_correlation(plans[f"predicted_{p}"].tolist(), plans["kl"].tolist()) for p in proxies if f"predicted_{p}" in plans}
    out = {"correlation": corr, "warnings": proxy_warnings(table, proxies), "nonfinite": nonfinite_plans(table)}
    if refinement is not None and len(refinement):
        out["slice_correlation"] = {p: rank_correlation(refinement[f"predicted_{p}"].tolist(), refinement["slice_kl"].tolist())
                                    for p in proxies if f"predicted_{p}" in refinement}
        out["returned"] = {r.budget: r.source for _, r in table[table.kind == "returned"].iterrows()}
    return out


def nonfinite_plans(table: pd.DataFrame) -> list[str]:
    """The plans whose measured perplexity or KL is NaN or infinite (the CLI then exits 1)."""
    cols = [c for c in ("ppl", "kl") if c in table]
    bad = ~np.isfinite(table[cols].astype(float)).all(axis=1) if cols else pd.Series(False, index=table.index)
    return [str(p) for p in table.loc[bad, "plan"]]


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


def results_table(plans: dict[str, Plan], reference_row: dict | None) -> pd.DataFrame:
    rows = [reference_row] if reference_row else []
    for name, plan in plans.items():
        rows.append({"plan": name, "kind": plan.provenance.get("kind", "proxy"), "budget": plan.budget.get("label"),
                     "proxy": plan.provenance.get("proxy"), "source": plan.provenance.get("returned_from", name), **plan.metrics,
                     **plan.timings})
    df = window_cis(pd.DataFrame(rows))
    first = [c for c in ("plan", "kind", "budget", "effective_bits", "size_bytes") if c in df]
    pred = sorted(c for c in df if c.startswith("predicted_"))
    meas = [c for c in ("ppl", "kl", "kl_lo", "kl_hi", "dkl_best", "dkl_best_lo", "dkl_best_hi", "ppl_ratio_best", "ppl_ratio_best_lo",
                        "ppl_ratio_best_hi", "cloze_acc", "mc_acc", "mc_acc_norm", "accuracy", "nll", "eval_tokens", "slice_kl") if c in df]
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
    cols = ("kl_lo", "kl_hi", "dkl_best", "dkl_best_lo", "dkl_best_hi", "ppl_ratio_best", "ppl_ratio_best_lo", "ppl_ratio_best_hi")
    for c in cols:
        df[c] = float("nan")
    for i in df.index[has]:
        df.loc[i, ["kl_lo", "kl_hi"]] = mean_ci(df.at[i, "kl_windows"])
    if "budget" in df:
        for _, rows in df[has & df["budget"].notna()].groupby("budget"):
            best = rows["kl"].idxmin()
            for i in rows.index:
                df.loc[i, ["dkl_best", "dkl_best_lo", "dkl_best_hi"]] = paired_diff_ci(df.at[i, "kl_windows"], df.at[best, "kl_windows"])
                d = paired_diff_ci(df.at[i, "nll_windows"], df.at[best, "nll_windows"])
                df.loc[i, ["ppl_ratio_best", "ppl_ratio_best_lo", "ppl_ratio_best_hi"]] = [float(np.exp(v)) for v in d]
    return df.drop(columns=[c for c in ("kl_windows", "nll_windows") if c in df])


def write_outputs(out: Path, plans: dict[str, Plan], table: pd.DataFrame, stages: pd.DataFrame, tables: dict[str, pd.DataFrame], cfg: SearchConfig) -> None:
    (out / "plans").mkdir(parents=True, exist_ok=True)
    for name, plan in plans.items():
        plan.save(out / "plans" / f"{safe_name(name)}.json")
    write_csv_atomic(out / "results.csv", table)
    write_csv_atomic(out / "stages.csv", stages)
    for name, t in tables.items():
        write_csv_atomic(out / f"proxy_table_{safe_name(name)}.csv", t)
    cfg_d = asdict(cfg)
    cfg_d["rules"] = [repr(r) for r in cfg.rules]
    write_json_atomic(out / "config.json", cfg_d)


def write_csv_atomic(path: Path, df: pd.DataFrame) -> None:
    """A reader (or a killed run) never sees half a table."""
    from ..store.cache import atomic_path

    tmp = atomic_path(path)
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)
