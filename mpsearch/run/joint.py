"""One budget over weights, activations and the KV cache: the joint search.

The memory of a deployment is the decision weights' bytes plus the KV cache's bytes at a
context length and batch size; activations are transient, so they cost no memory and are
bounded instead by a rule (``--input-min-bits 8``) or by a MAC-weighted mean
(``--act-bits 6``, a constraint row of the same MILP). Each weight decision, each layer
input and each layer's K and V is one decision of one multiple-choice knapsack, its loss
the weight proxy's (``--proxy``) or the run-time proxy's (``--runtime-proxy``; ``kl``, the
measured single-target KL, is in the same units as the weights' ``measured_kl``).

``separate`` is the comparison a user would otherwise make: weights (with their inputs)
and the KV cache each get the budget's share in proportion to their fp16 sizes, and are
solved on their own.

Plans are measured on the inference path: each evaluation window of ``context`` tokens is
prefilled through the (quantized) cache, then its last ``decode`` tokens are decoded one at
a time (:class:`mpsearch.measure.evaluate.DecodeEvaluator`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.files import write_json_atomic
from ..core.format import Format
from ..core.plan import Plan
from ..cost import Budget, BudgetError
from ..measure.evaluate import DecodeEvaluator
from ..models import load_text, token_chunks
from ..quant.calibrate import calibrate
from ..quant.hooks import calib_for, calib_key
from ..solvers import Constraint, Problem, Status, get_solver
from .cached import cached_calibration
from .outputs import SearchResult, nonfinite_plans, reference_row, results_table, write_outputs
from .session import KL_SLICE, Session
from .targets import (
    RuntimeDecision,
    kv_fp16_bytes,
    load_runtime_proxy,
    mean_act_bits,
    runtime_decisions,
    runtime_losses,
    runtime_proxy,
    runtime_table,
)

log = logging.getLogger(__name__)


@dataclass
class Joint:
    """A prepared joint search: the weights' session plus the run-time decisions and their losses."""

    session: Session
    runtime: list[RuntimeDecision]
    calibration: dict[str, torch.Tensor]
    table: pd.DataFrame
    losses: list[np.ndarray]

    @classmethod
    def open(cls, cfg) -> "Joint":
        session = Session.open(cfg, joint=True)
        space = session.space
        if cfg.input_min_bits:
            space = space.with_runtime_min_bits("input", cfg.input_min_bits)
        runtime = runtime_decisions(space, session.model, session.decisions)
        with session.stages("calibrate activations / KV"):
            sites = {d.site: list(d.formats) for d in runtime}
            if cfg.use_cache:
                calibration = cached_calibration(
                    session.model, sites, session.calib, session.prims.weights, cfg.progress, cfg.seed
                )
            else:
                calibration = calibrate(session.model, sites, session.calib, cfg.progress, cfg.seed)
            calibration = spread_calibration(calibration, runtime)
        proxy = load_runtime_proxy(runtime_proxy(cfg))
        with session.stages("run-time sensitivities"):
            kl_tokens = session.calib[: KL_SLICE[0], : KL_SLICE[1]]
            table = runtime_table(
                session.model,
                runtime,
                session.calib,
                kl_tokens,
                calibration,
                session.prims.weights,
                cfg.use_cache,
                cfg.progress,
                measure_kl="kl" in proxy.needs,
            )
        losses = runtime_losses(table, runtime, proxy)
        return cls(session, runtime, calibration, table, losses)

    # ------------------------------------------------------------ the problem
    def weight_bytes(self) -> list[np.ndarray]:
        return [c / 8.0 for c in self.session.costs]

    def kv_bytes(self, context: int, batch: int) -> list[np.ndarray]:
        return [np.array([d.cache_bytes(j, context, batch) for j in range(len(d.formats))]) for d in self.runtime]

    def problem(
        self, proxy: str, budget_bytes: float, context: int, batch: int, act_bits: float, part: str = "all"
    ) -> tuple[Problem, list[int], list[int]]:
        """The knapsack over ``part`` (``all``, ``weights`` = weights and inputs, ``kv``), with the
        indices of the weight and run-time decisions it holds."""
        w_idx = list(range(len(self.session.decisions))) if part in ("all", "weights") else []
        r_idx = [i for i, d in enumerate(self.runtime) if part == "all" or (d.target == "input") == (part == "weights")]
        names = [self.session.decisions[i].name for i in w_idx] + [self.runtime[i].name for i in r_idx]
        options = [[f.key for f in self.session.decisions[i].formats] for i in w_idx] + [
            [f.key for f in self.runtime[i].formats] for i in r_idx
        ]
        wl, wb, kb = self.session.losses[proxy], self.weight_bytes(), self.kv_bytes(context, batch)
        loss = [wl[i] for i in w_idx] + [self.losses[i] for i in r_idx]
        cost = [wb[i] for i in w_idx] + [kb[i] for i in r_idx]
        constraints = []
        inputs = [i for i in r_idx if self.runtime[i].target == "input"]
        if act_bits and inputs:
            macs = sum(self.runtime[i].macs for i in inputs)
            rows = [np.zeros(len(o)) for o in options[: len(w_idx)]]
            rows += [
                np.array([d.macs * f.bits for f in d.formats], dtype=float)
                if d.target == "input"
                else np.zeros(len(d.formats))
                for d in (self.runtime[i] for i in r_idx)
            ]
            constraints.append(Constraint("act_bits", rows, act_bits * macs))
        return Problem.build(names, options, loss, cost, budget_bytes, constraints), w_idx, r_idx

    def solve(self, proxy: str, budget_bytes: float, context: int, batch: int, act_bits: float, allocation: str):
        """``(weight formats per tensor, run-time format per decision)`` or None when infeasible."""
        if allocation == "joint":
            parts = [("all", budget_bytes)]
        else:
            w16 = self.session.numel * 2.0
            kv16 = kv_fp16_bytes(self.runtime, context, batch)
            parts = [("weights", budget_bytes * w16 / (w16 + kv16)), ("kv", budget_bytes * kv16 / (w16 + kv16))]
        weights: dict[str, Format] = {}
        runtime: dict[str, Format] = {}
        for part, b in parts:
            problem, w_idx, r_idx = self.problem(proxy, b, context, batch, act_bits, part)
            if not problem.n_decisions:
                continue
            solver = get_solver("milp").solve(problem)
            if solver.status_ not in Status.SOLUTION_PRESENT:
                return None
            for k, j in zip(w_idx, solver.choice_):
                d = self.session.decisions[k]
                weights.update({m.name: d.formats[j] for m in d.members})
            for k, j in zip(r_idx, solver.choice_[len(w_idx) :]):
                runtime[self.runtime[k].name] = self.runtime[k].formats[j]
        return weights, runtime

    # ---------------------------------------------------------------- plans
    def make_plan(
        self, weights: dict[str, Format], runtime: dict[str, Format], context: int, batch: int, **provenance
    ) -> Plan:
        plan = self.session.make_plan(weights, **provenance)
        calibration = {}
        for d in self.runtime:
            f = runtime[d.name]
            for m in d.modules:
                plan.tensors.setdefault(m, {})[d.target] = f
                c = calib_for(self.calibration, m, d.target, f)
                calibration.update({calib_key(m, d.target, f, k): v for k, v in (c or {}).items()})
        plan.calibration = calibration or None
        losses = dict(zip((d.name for d in self.runtime), self.losses))
        proxy = provenance.get("proxy")
        if proxy in self.session.losses:
            choice = self.session.choice_of(weights)
            w = (
                sum(float(l[j]) for l, j in zip(self.session.losses[proxy], choice))
                if choice is not None
                else float("nan")
            )
            plan.metrics["predicted"] = w + sum(
                float(losses[d.name][d.formats.index(runtime[d.name])]) for d in self.runtime
            )
        kv = sum(
            d.cache_bytes(d.formats.index(runtime[d.name]), context, batch) for d in self.runtime if d.target != "input"
        )
        kv_elems = sum(batch * context * d.width for d in self.runtime if d.target != "input")
        plan.metrics.update(
            {
                "weight_bytes": plan.metrics["size_bytes"],
                "kv_bytes": kv,
                "total_bytes": plan.metrics["size_bytes"] + kv,
                "kv_bits": kv * 8 / kv_elems if kv_elems else float("nan"),
                "act_bits": mean_act_bits(self.runtime, runtime),
            }
        )
        return plan


def spread_calibration(calibration: dict[str, torch.Tensor], runtime: list[RuntimeDecision]) -> dict[str, torch.Tensor]:
    """Calibrated at each decision's site (its first module); every module of the decision reads the same input."""
    out = dict(calibration)
    for d in runtime:
        for f in d.formats:
            c = calib_for(calibration, d.modules[0], d.target, f) or {}
            for m in d.modules[1:]:
                out.update({calib_key(m, d.target, f, k): v for k, v in c.items()})
    return out


def joint_search(cfg):
    """:func:`mpsearch.run.search` for a space with ``[input]`` / ``[kv_cache]``: per weight proxy, budget and
    allocation one plan, measured on the decode path at ``context`` (full-sequence windows without a KV cache)."""

    joint = Joint.open(cfg)
    s = joint.session
    stages = s.stages
    budgets = [Budget.parse(b, s.decisions, s.space.base_format) for b in cfg.budgets]
    plans: dict[str, Plan] = {}
    infeasible: list[str] = []
    has_kv = any(d.target != "input" for d in joint.runtime)
    for proxy in s.tables:
        for b in budgets:
            limit = b.limit if b.metric == "bytes" else b.limit * s.numel / 8.0
            for allocation in cfg.allocations if has_kv else ("joint",):
                with stages(f"solve {proxy} {allocation} @ {b.label}"):
                    got = joint.solve(proxy, limit, cfg.context, cfg.batch, cfg.act_bits, allocation)
                if got is None:
                    smallest = joint.problem(proxy, limit, cfg.context, cfg.batch, 0)[0].min_budget
                    msg = (
                        f"budget {b.label} is infeasible for the {allocation} allocation (weights + KV at "
                        f"{cfg.context} tokens x "
                        f"{cfg.batch}{f', mean activation bits <= {cfg.act_bits:g}' if cfg.act_bits else ''}); "
                        f"the smallest plan of the space needs {smallest / 1e6:.3f} MB"
                    )
                    if allocation == "joint" or cfg.allocations == ("separate",):
                        raise BudgetError(msg)
                    log.warning(
                        "%s: no %s plan", msg, allocation
                    )  # a fixed split can fail where the joint problem does not
                    infeasible.append(f"{proxy} {allocation} @ {b.label}")
                    continue
                name = f"{proxy}+{runtime_proxy(cfg)}-{allocation}@{b.label}"
                plans[name] = joint.make_plan(
                    *got,
                    cfg.context,
                    cfg.batch,
                    budget=b,
                    proxy=proxy,
                    runtime_proxy=runtime_proxy(cfg),
                    solver="milp",
                    kind=allocation,
                    allocation=allocation,
                )
                plans[name].budget.update({"context": cfg.context, "batch": cfg.batch, "act_bits": cfg.act_bits})
    out = Path(cfg.out_dir) if cfg.out_dir else None
    reference = None
    if cfg.measure:
        ev = _evaluator(cfg, s)
        reference = reference_row(ev.reference_.to_dict())
        for name, plan in plans.items():
            with stages(f"evaluate {name}"):
                plan.metrics.update(s.measure(plan, f"eval {name}", ev))
    table = results_table(plans, reference)
    if out is not None:
        write_outputs(out, plans, table, pd.DataFrame(stages.records), {"runtime_table": joint.table}, cfg)
    summary = {
        "infeasible": infeasible,
        "warnings": [f"no plan for {x}: the fixed split does not fit" for x in infeasible],
        "nonfinite": nonfinite_plans(table) if cfg.measure else [],
    }
    if out is not None:
        from ..report.html import write_report

        write_json_atomic(out / "summary.json", summary)
        write_report(out)  # the weights' bit map, the front and the stage times; no cost models or tasks here yet
    return SearchResult(plans, table, pd.DataFrame(stages.records), out, {"runtime": joint.table}, summary=summary)


def _evaluator(cfg, s: Session):
    """Windows of ``context`` tokens decoded through the cache; without a KV cache, the usual full-sequence windows."""
    if not cfg.context:
        return s.evaluator
    from ..models.data import conventions

    text = load_text(cfg.evaluation)
    lead = conventions(s.lm.tokenizer, cfg.bos)["evaluation_leading"]
    tokens = token_chunks(s.lm.tokenizer, text, cfg.context, cfg.eval_chunks, lead=lead)
    with s.stages("evaluate reference (decode path)"):
        return DecodeEvaluator(tokens, decode=cfg.decode, progress=cfg.progress).fit(s.model)
