"""A prepared model + data + search space: the shared start of every search method.

``Session.open(config)`` loads the model, builds the decisions, checks the budgets,
computes the primitives and proxy tables (all cached), so a proxy MILP, an Optuna
study or a predictor search can each turn choices into plans and measure them the
same way, with the same evaluation cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np
import torch

from .._version import __version__
from ..core.device import device_parts, exact_fp32, resolve_device
from ..core.format import Format
from ..core.plan import Plan, fingerprint
from ..core.profiling import Stages
from ..core.space import Decision, SearchSpace
from ..cost import Budget, BudgetError, decision_costs, plan_bits, plan_bytes
from ..cost.model import ConstraintSpec
from ..measure.evaluate import Evaluator, evaluator_for
from ..models.batches import as_batches
from ..models.data import conventions
from ..models.loader import LoadedModel
from ..primitives import Primitives, PrimitiveSettings, compute_primitives
from ..primitives.sensitivity import kl_key, measured_kl
from ..proxies import load_proxy
from ..proxies.table import decision_losses
from ..quant import applied, get_quantizer
from ..quant.memo import QuantMemo
from ..solvers import Problem
from ..store.cache import (
    CacheEntryError,
    cache_dir,
    content_key,
    read_json,
    tokens_hash,
    write_json,
)
from .cached import EVAL_SCHEMA, cached_proxy_tables, check_quality, check_tasks, plan_hash
from .config import SearchConfig
from .prepare import model_and_text, own_data, task_evaluator, text_data

log = logging.getLogger(__name__)
#: measured-KL sensitivity runs on a slice of the calibration text: 1 sequence x 256 tokens
#: (each of the ~3,000 (tensor, format) pairs reruns part of the model on it)
KL_SLICE = (1, 256)


@dataclass
class Session:
    """Everything one search needs in memory. Build it with :meth:`open`."""

    config: SearchConfig
    lm: object
    space: SearchSpace
    decisions: list[Decision]
    budgets: list[Budget]
    calib: torch.Tensor
    eval_tokens: torch.Tensor | None
    prims: Primitives | None
    #: per tensor, the layer input's mean square per column (llama.cpp's imatrix), for the
    #: formats whose quantizer weights its scale search by it; None when none does
    importance: dict[str, torch.Tensor] | None = None
    #: the refinement slice (calibration text after the calibration windows, and after the
    #: Gram windows when the search fits a Gram matrix), or None
    slice_tokens: torch.Tensor | None = None
    #: the windows the Gram matrix is fitted on (``gram_chunks``, the calibration windows first)
    gram_tokens: torch.Tensor | None = None
    tables: dict = field(default_factory=dict)
    losses: dict[str, list[np.ndarray]] = field(default_factory=dict)
    stages: Stages = field(default_factory=Stages)
    #: further limits (latency, energy...) every allocation of this session honours, as MILP rows
    constraints: tuple = ()
    #: the search's cost models (:class:`mpsearch.cost.suite.CostSuite`), when opened with ``costs=True``
    costs_suite: object = None
    #: cloze and multiple-choice items from the evaluation text (:class:`mpsearch.measure.tasks.TaskEvaluator`), when
    #: asked for
    tasks: object = None

    @classmethod
    def open(
        cls,
        cfg,
        stages: Stages | None = None,
        extra_proxies: list | None = None,
        joint: bool = False,
        costs: bool = False,
        lm: LoadedModel | None = None,
    ) -> "Session":
        """Load, build and compute in stages; a typo in a proxy or budget fails before heavy work.
        ``extra_proxies`` are :class:`~mpsearch.proxies.Proxy` objects computed beside the config's.
        ``joint=True``: the weights' part of a joint search (:mod:`mpsearch.run.joint`), which reads the
        budgets (weights + KV) and decides the space's ``[input]`` / ``[kv_cache]`` itself. ``costs=True``: build
        the cost models and the ``--constraint`` rows (timing this machine's kernels if asked) before the heavy stages.
        ``cfg.device`` is resolved first (a missing GPU fails before anything loads); the model moves there once the
        cost models are built, and every pass after that runs on it (tokens stay on the CPU until a pass uses them).
        ``lm``: a model already in memory (``mpsearch.search(model=module, data=...)``), used instead of loading
        ``cfg.model``; the data it brings is checked against :class:`mpsearch.models.protocol.ModelData` first."""
        device = resolve_device(getattr(cfg, "device", "cpu"))  # a missing GPU fails before anything loads
        stages = stages or Stages()
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        proxies = [load_proxy(p) for p in cfg.proxies] + list(extra_proxies or [])
        space = _space(cfg, joint)
        lm, texts = model_and_text(cfg, lm, stages)
        with stages("build space"):
            decisions = space.build(lm.model)
            budgets = [] if joint else [Budget.parse(b, decisions, space.base_format) for b in cfg.budgets]
            check_budgets(budgets, decision_costs(decisions), sum(d.numel for d in decisions))
        suite, constraints = _cost_models(cfg, lm, decisions, stages) if costs else (None, ())
        if device.type != "cpu":  # after the cost models: profile-device times this machine's CPU kernels
            with stages(f"move model to {device}"):
                lm.model.to(device)
                exact_fp32(device)
        needs, weighted, gram_decisions = _needs(cfg, proxies, decisions)
        prepare = text_data if lm.data is None else own_data
        calib, evalt, gram_tokens, sliced = prepare(cfg, lm, texts, "gram" in needs, stages)
        s = cls(
            cfg,
            lm,
            space,
            decisions,
            budgets,
            calib,
            evalt,
            None,
            slice_tokens=sliced,
            stages=stages,
            gram_tokens=gram_tokens if "gram" in needs else None,
            constraints=constraints,
            costs_suite=suite,
            tasks=None if joint else task_evaluator(cfg, lm, texts, stages),
        )
        s._statistics(needs, weighted, gram_decisions, device)
        with stages("proxy tables"):
            s.tables = cached_proxy_tables(
                proxies, lm.model, decisions, s.prims, cfg.use_cache, cfg.progress, s.importance
            )
        s.losses = {name: decision_losses(table, decisions) for name, table in s.tables.items()}
        s.prims.values.clear()  # the tables hold all the allocators read; the arrays are as large as the model
        return s

    def _statistics(self, needs: set[str], weighted: bool, gram_decisions: list[Decision], device) -> None:
        """The primitives the proxies need (cached), the importance the quantizers read, and measured KL."""
        cfg, stages, model = self.config, self.stages, self.model
        settings = PrimitiveSettings(
            hessian_probes=cfg.hessian_probes, hessian_sequences=cfg.hessian_sequences, seed=cfg.seed
        )
        names = [m.name for m in self.members]

        def primitives(batches, families: set[str]) -> Primitives:
            return compute_primitives(
                model,
                names,
                batches,
                families,
                cfg.use_cache,
                cfg.progress,
                settings,
                stages,
                checkpoint_every=cfg.checkpoint_every,
            )

        self.prims = primitives(self.calib, needs - {"gram"})
        if "gram" in needs:
            g = primitives(self.gram_tokens, {"gram"})
            self.prims.values.update(g.values)
            self.prims.family_keys.update(g.family_keys)
        if weighted:
            self.importance = {m.name: self.prims.xtx[m.name].detach().clone() for m in self.members}
            self.importance.update({m.name: self.prims.gram[m.name] for d in gram_decisions for m in d.members})
        if "kl" in needs:
            with stages("measured KL per (tensor, format)"):
                kl_tokens = as_batches(self.calib).head(*KL_SLICE)
                table = measured_kl(
                    model, self.decisions, kl_tokens, self.prims.weights, cfg.use_cache, cfg.progress, self.importance
                )
                self.prims.kl = {
                    (t, f): float(v) for t, f, v in table[["tensor", "format", "kl"]].itertuples(index=False)
                }
                self.prims.kl_key = kl_key(
                    self.prims.weights,
                    kl_tokens,
                    [(m.name, f) for d in self.decisions for m in d.members for f in d.formats],
                    self.importance,
                    device=device,
                )

    # -- the search space as arrays -------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.lm.model

    @property
    def members(self):
        return [m for d in self.decisions for m in d.members]

    @property
    def numel(self) -> int:
        return sum(d.numel for d in self.decisions)

    @cached_property
    def costs(self) -> list[np.ndarray]:
        """Total effective bits of each option of each decision."""
        return decision_costs(self.decisions)

    def problem(self, proxy: str, total_bits: float | None = None) -> Problem:
        """The knapsack for one proxy; ``total_bits`` defaults to 'everything fits'."""
        costs = self.costs
        budget = total_bits if total_bits is not None else float(sum(float(c.max()) for c in costs))
        return Problem.build(
            [d.name for d in self.decisions],
            [[f.key for f in d.formats] for d in self.decisions],
            self.losses[proxy],
            costs,
            budget,
            self.constraints,
        )

    def fits(self, choice: Sequence[int], total_bits: float) -> bool:
        """Whether a choice is within ``total_bits`` and every constraint of the session."""
        return self.choice_cost(choice) <= total_bits and all(
            c.fits(sum(float(v[j]) for v, j in zip(c.cost, choice))) for c in self.constraints
        )

    def formats(self, choice: Sequence[int]) -> dict[str, Format]:
        """Per-tensor formats of a choice (one option index per decision; tied members share it)."""
        if len(choice) != len(self.decisions):
            raise ValueError(f"choice has {len(choice)} entries for {len(self.decisions)} decisions")
        return {m.name: d.formats[int(j)] for d, j in zip(self.decisions, choice) for m in d.members}

    def choice_of(self, formats: dict[str, Format]) -> tuple[int, ...] | None:
        """The choice that gives ``formats`` (None if a decision's members differ or a format is not an option)."""
        choice = []
        for d in self.decisions:
            fmts = {formats.get(m.name) for m in d.members}
            if len(fmts) != 1 or (f := fmts.pop()) not in d.formats:
                return None
            choice.append(d.formats.index(f))
        return tuple(choice)

    def effective_bits(self, formats: dict[str, Format]) -> float:
        return plan_bits(formats, self.members)

    # -- plans and their measurement ------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.model)

    @cached_property
    def memo(self) -> QuantMemo:
        """Slow quantizations (GPTQ, IQ3_S, weighted GGUF searches) reused across measured plans."""
        return QuantMemo(max_bytes=int(self.config.memo_mb * 2**20))

    @cached_property
    def provenance(self) -> dict:
        """Computed once: every measured trial makes a plan, and hashing the calibration each time is waste."""
        cfg = self.config
        if self.lm.data is None:
            data = {
                "calibration": cfg.calibration,
                "calib_tokens": int(self.calib.numel()),
                "calib_sha": tokens_hash(self.calib),
                "windows": conventions(self.lm.tokenizer, cfg.bos),
            }
        else:
            data = {
                "calibration": f"{self.lm.data.name}: {len(self.calib)} training batches",
                "calib_sha": tokens_hash(self.calib),
            }
        out = {"data": data, "seed": cfg.seed, "space": self.space.name, "mpsearch_version": __version__}
        if self.importance:
            out["importance"] = "calibration: each layer input's mean square per column (llama.cpp's imatrix)"
            if any(t.dim() == 2 for t in self.importance.values()):
                out["importance"] += "; X^T X / n of the inputs of layers offered GPTQ formats"
        return out

    def make_plan(self, formats: dict[str, Format], budget: Budget | None = None, **provenance) -> Plan:
        tensors = {n: {"weight": f} for n, f in formats.items()}
        plan = Plan(
            self.lm.model_id,
            self.fingerprint,
            tensors,
            budget.to_dict() if budget else {},
            {},
            {**self.provenance, **provenance},
            importance=importance_needed(formats, self.importance),
        )
        plan.metrics.update(
            {"effective_bits": plan_bits(formats, self.members), "size_bytes": plan_bytes(formats, self.members)}
        )
        suite = self.costs_suite
        if (
            suite is not None
        ):  # every cost, in its results column's unit; those read off this machine's clocks beside the plan
            timed = suite.timed()
            for column, value in suite.row(formats, self.members).items():
                (plan.timings if column in timed else plan.metrics)[column] = value
            if self.config.constraints:
                on_timed = any(
                    suite.models[ConstraintSpec.parse(c).cost].column in timed for c in self.config.constraints
                )
                meets = suite.meets(formats, self.members, self.config.constraints)
                (plan.timings if on_timed else plan.metrics)["meets_constraints"] = meets
        return plan

    @property
    def evaluation_name(self) -> str:
        """What plans are measured on: the evaluation text, or the name of the model's own data."""
        return self.config.evaluation if self.lm.data is None else self.lm.data.name

    @property
    def evaluator(self) -> Evaluator:
        """Fitted on first use: the reference model's log-probs on the evaluation tokens."""
        if self.eval_tokens is None:
            raise ValueError("this session was opened with measure=False; nothing to measure on")
        return self._fitted("_evaluator", self.eval_tokens, "evaluate reference", self.config.progress)

    @property
    def slice_evaluator(self) -> Evaluator:
        """Fitted on first use on the refinement slice: calibration text after the calibration windows."""
        if self.slice_tokens is None:
            raise ValueError("this session has no refinement slice (refine=0 or measure=False)")
        return self._fitted("_slice_evaluator", self.slice_tokens, "evaluate reference on the refinement slice", False)

    def _fitted(self, attr: str, tokens: torch.Tensor, stage: str, progress: bool) -> Evaluator:
        if getattr(self, attr, None) is None:
            with self.stages(stage):
                setattr(self, attr, evaluator_for(as_batches(tokens), progress).fit(self.model))
        return getattr(self, attr)

    def choice_cost(self, choice: Sequence[int]) -> float:
        """Total effective bits of a choice."""
        return float(sum(float(c[j]) for c, j in zip(self.costs, choice)))

    @cached_property
    def options_by_cost(self) -> list[list[int]]:
        """Per decision, its option indices from cheapest to most expensive."""
        return [sorted(range(len(c)), key=lambda j: (float(c[j]), j)) for c in self.costs]

    def measure(self, plan: Plan, desc: str = "eval", evaluator: Evaluator | None = None) -> dict:
        """Perplexity and KL of ``plan`` (on the evaluation text, or on ``evaluator``'s tokens);
        cached by (model weights, plan with its quantizer versions, tokens with their shape),
        checked on read, so reruns resume. A plan with run-time formats also reports the share of its
        layer inputs rounded to zero (``kernel_proportion``); a decode-path evaluator keys by its settings."""
        ev = evaluator or self.evaluator
        how = ev.cache_parts if hasattr(ev, "cache_parts") else (ev.batch_size,)
        key = content_key(
            self.prims.weights, plan_hash(plan), tokens_hash(ev.tokens), *how, EVAL_SCHEMA, *device_parts(self.model)
        )
        path = cache_dir() / "evals" / f"{key}.json"
        if self.config.use_cache:
            q = read_json(path, key, EVAL_SCHEMA, lambda v: check_quality(v, ev.reference_.tokens))
            if q is not None:
                return q
        with applied(self.model, plan, memo=self.memo):
            q = ev.score(self.model, desc=desc).to_dict()
            hooks = getattr(self.model, "_mpsearch_runtime", None)
            if hooks is not None:
                counts = [c for (_, t), c in hooks.kernel.items() if t == "input"]
                q["kernel_proportion"] = sum(z for z, _ in counts) / max(1, sum(n for _, n in counts))
        try:
            check_quality(q, ev.reference_.tokens)
        except CacheEntryError as e:  # measured, not cached: a rerun measures it again
            log.warning("plan %s measured %s: %s; not cached", desc, {k: q[k] for k in ("ppl", "kl")}, e)
            return q
        if self.config.use_cache:
            write_json(path, q, key, EVAL_SCHEMA)
        return q

    def measure_tasks(self, plan: Plan | None, desc: str = "tasks") -> dict:
        """Task accuracy of ``plan`` (None: the unquantized model); cached like :meth:`measure`."""
        ev = self.tasks
        key = content_key(
            self.prims.weights,
            plan_hash(plan) if plan is not None else "reference",
            *ev.cache_parts,
            *device_parts(self.model),
        )
        path = cache_dir() / "tasks" / f"{key}.json"
        if self.config.use_cache:
            hit = read_json(path, key, ev.cache_parts[1], check_tasks)
            if hit is not None:
                return hit
        if plan is None:
            q = ev.score(self.model, desc=desc)
        else:
            with applied(self.model, plan, memo=self.memo):
                q = ev.score(self.model, desc=desc)
        if self.config.use_cache:
            write_json(path, q, key, ev.cache_parts[1])
        return q

    def measure_choice(self, choice: Sequence[int]) -> dict:
        """Measured quality of a choice, plus its effective bits (for Optuna / the predictor)."""
        plan = self.make_plan(self.formats(choice))
        return {**self.measure(plan, desc="eval"), "effective_bits": plan.metrics["effective_bits"]}


def _space(cfg, joint: bool) -> SearchSpace:
    """The config's space with its rules; one that decides inputs / the KV cache only for the joint search."""
    space = SearchSpace.from_file(cfg.space).with_rules(cfg.rules)
    if space.runtime and not joint:
        raise ValueError(
            f"search space {space.name!r} also decides layer inputs / the KV cache, which only `mpsearch search` "
            "(the joint MILP) handles; use a weights-only space (e.g. llama) here"
        )
    return space


def _cost_models(cfg, lm: LoadedModel, decisions: list[Decision], stages: Stages) -> tuple[object, tuple]:
    """The cost models and the ``--constraint`` rows, before the heavy stages (a bad constraint fails here)."""
    from .profile import open_costs

    suite = open_costs(cfg, lm.model, decisions, stages, fingerprint=str(lm.model_id))
    return suite, suite.constraints(decisions, cfg.constraints)


def _needs(cfg, proxies: list, decisions: list[Decision]) -> tuple[set[str], bool, list[Decision]]:
    """The primitive families to compute, whether the formats read an importance (llama.cpp's
    imatrix), and the decisions with a format that reads the whole Gram matrix (GPTQ)."""
    needs = set().union(*(p.needs for p in proxies))
    weighted = cfg.imatrix and any(get_quantizer(f.quantizer).reads_importance(f) for d in decisions for f in d.formats)
    gram_decisions = [
        d for d in decisions if any(get_quantizer(f.quantizer).importance_kind == "gram" for f in d.formats)
    ]
    if weighted:
        needs = needs | {"xtx"} | ({"gram"} if gram_decisions else set())
    return needs, weighted, gram_decisions


def check_budgets(budgets: list[Budget], costs: list[np.ndarray], numel: int) -> None:
    """Fail before any heavy work when a budget is below the smallest feasible one; warn
    when it is above what the space can use (every tensor at its largest format)."""
    min_bits = sum(float(c.min()) for c in costs)
    max_bits = sum(float(c.max()) for c in costs)
    for b in budgets:
        if b.total_bits(numel) < min_bits * (1 - 1e-12):
            raise BudgetError(
                f"budget {b.label} is infeasible: the smallest feasible budget is "
                f"{min_bits / numel:.4f} effective bits per weight ({min_bits / 8 / 1e6:.3f} MB) for this search space"
            )
        if b.total_bits(numel) > max_bits * (1 + 1e-12):
            log.warning(
                "budget %s exceeds what the search space can use: at most %.4f effective bits per weight "
                "(%.3f MB, every tensor in its largest format); the plan for it is that largest plan",
                b.label,
                max_bits / numel,
                max_bits / 8 / 1e6,
            )


def importance_needed(
    formats: dict[str, Format], importance: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor] | None:
    """The importance a plan keeps: for each tensor whose format reads one, what that
    quantizer reads (GPTQ the Gram matrix, the others its diagonal), nothing for the rest."""
    out = {}
    for name, fmt in formats.items():
        q = get_quantizer(fmt.quantizer)
        if importance and name in importance and q.reads_importance(fmt):
            t = importance[name]
            out[name] = t if q.importance_kind == "gram" or t.dim() == 1 else t.diagonal().clone()
    return out or None
