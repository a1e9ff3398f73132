"""Measured refinement: a search never returns a plan that measures worse than its own baselines.

A proxy is an additive guess; on a model where it misleads, its MILP plan can measure
worse than uniform (Fisher on Gemma-3-270M did, by 20-29% in KL, while its calibration
windows lacked the BOS Gemma expects). So after the MILP,
for every budget, plans are *measured* on a small slice of calibration text (KL to the
reference; never the evaluation text, which stays for the final report):

1. **candidates**: every proxy's plan, the baselines (uniform, recipe), and a path from
   each proxy plan toward each baseline that is a valid choice: the MILP on
   ``proxy loss + mu x bits moved away from the baseline``, ``mu`` on a grid scaled so that
   ``mu = 1`` charges the proxy's whole predicted gain for moving every bit it moves. Small
   ``mu`` trusts the proxy, large ``mu`` keeps the baseline: a trust region around a plan
   known to work;
2. **local search** from the best candidate: cost-neutral swaps (one decision one format
   up, others down until the budget fits), accepted when the measured KL falls, until
   ``evaluations`` plans have been measured;
3. the **returned plan** is the best measured one among all of these, baselines included.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..core.plan import Plan
from ..cost import Budget
from ..solvers import Problem, Status, get_solver

log = logging.getLogger(__name__)

#: trust-region weights, from "follow the proxy" to "stay at the baseline"
MU_GRID = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class RefineConfig:
    """``evaluations``: measured plans per (proxy, budget) besides the proxy plan and baselines (0: no refinement)."""

    evaluations: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.evaluations, int) or self.evaluations < 0:
            raise ValueError(f"refine evaluations must be an integer >= 0, got {self.evaluations!r}")


@dataclass
class Refined:
    """What refinement found for one budget: the returned plan's name and every measured plan."""

    returned: str
    #: plan name -> slice KL, every plan measured for this budget
    slice_kl: dict[str, float]
    #: new plans the refinement made (path and local search), by name
    plans: dict[str, Plan]


def refine_budget(session, budget: Budget, plans: dict[str, Plan], config: RefineConfig) -> Refined:
    """Measure ``plans`` (the proxy plans and baselines of ``budget``) on the session's slice,
    add the trust-region path and the local search for each proxy plan, return the best."""
    limit = budget.total_bits(session.numel) * (1 + 1e-12)
    measured: dict[str, float] = {}
    by_choice: dict[tuple, str] = {}

    def measure(name: str, plan: Plan) -> float:
        if name not in measured:
            measured[name] = float(
                session.measure(plan, desc=f"refine {name}", evaluator=session.slice_evaluator)["kl"]
            )
        return measured[name]

    choices = {name: session.choice_of(plan.weight_formats()) for name, plan in plans.items()}
    for name, plan in plans.items():
        measure(name, plan)
        if choices[name] is not None:
            by_choice.setdefault(choices[name], name)
    # baselines that are valid choices: the trust region's anchors
    anchors = [
        c for n, c in choices.items() if c is not None and plans[n].provenance.get("kind") in ("uniform", "recipe")
    ]
    made: dict[str, Plan] = {}
    for name, plan in plans.items():
        proxy, start = plan.provenance.get("proxy"), choices[name]
        if proxy is None or "refine" in plan.provenance or start is None:
            continue
        spent = 0

        def add(choice: tuple, how: str) -> float | None:
            nonlocal spent
            if choice in by_choice:
                return measured[by_choice[choice]]
            if spent >= config.evaluations or not session.fits(choice, limit):
                return None
            spent += 1
            new = f"{proxy}-refine{len(made) + 1}@{budget.label}"
            made[new] = session.make_plan(session.formats(choice), budget, proxy=proxy, refine=how, kind="refined")
            by_choice[choice] = new
            return measure(new, made[new])

        problem = session.problem(proxy, budget.total_bits(session.numel))
        for anchor in anchors:
            for choice in trust_region_path(problem, start, anchor):
                add(choice, "trust region toward a baseline")
        best = min((c for c in by_choice if session.fits(c, limit)), key=lambda c: measured[by_choice[c]])
        rng = np.random.default_rng(config.seed)
        tries = 0
        while spent < config.evaluations and tries < 20 * config.evaluations + 20:
            tries += 1
            cand = swap(session, best, limit, rng)
            if cand is None or cand in by_choice:
                continue
            kl = add(cand, "local search")
            if kl is not None and kl < measured[by_choice[best]]:
                best = cand
    # with constraints beyond the bits, a baseline that breaks one cannot be returned
    allowed = [
        n
        for n in measured
        if not session.constraints or (n in made or (choices.get(n) is not None and session.fits(choices[n], limit)))
    ]
    returned = min(allowed or measured, key=measured.get)
    log.info(
        "budget %s: returned %s (slice KL %.4g); %d plans measured",
        budget.label,
        returned,
        measured[returned],
        len(measured),
    )
    return Refined(returned, measured, made)


def trust_region_path(problem: Problem, start: tuple, anchor: tuple) -> list[tuple]:
    """MILP plans between the proxy's plan ``start`` and ``anchor``: loss + mu x bits moved off the anchor."""
    cost = problem.cost
    loss = problem.loss
    moved = sum(abs(float(c[s]) - float(c[a])) for c, s, a in zip(cost, start, anchor))
    gain = sum(float(l[a]) - float(l[s]) for l, s, a in zip(loss, start, anchor))
    if moved <= 0 or gain <= 0:
        return []
    out = []
    solver = get_solver("milp")
    for mu in MU_GRID:
        penalty = [mu * gain / moved * np.abs(c - c[a]) for c, a in zip(cost, anchor)]
        p = Problem.build(
            problem.decisions,
            problem.options,
            [l + pen for l, pen in zip(loss, penalty)],
            cost,
            problem.budget,
            problem.constraints,
        )
        s = solver.solve(p)
        if s.status_ in Status.SOLUTION_PRESENT:
            choice = tuple(int(j) for j in s.choice_)
            if choice not in out:
                out.append(choice)
    return out


def swap(session, choice: tuple, limit: float, rng: np.random.Generator) -> tuple | None:
    """One decision one format up (by cost), then random others one format down until the plan fits."""
    order = session.options_by_cost
    pos = [order[i].index(j) for i, j in enumerate(choice)]
    up = [i for i in range(len(pos)) if pos[i] + 1 < len(order[i])]
    if not up:
        return None
    i = int(rng.choice(up))
    pos[i] += 1
    down = [k for k in range(len(pos)) if k != i and pos[k] > 0]
    rng.shuffle(down)
    new = lambda: tuple(order[k][p] for k, p in enumerate(pos))  # noqa: E731
    for k in down:
        if session.fits(new(), limit):
            break
        pos[k] -= 1
    cand = new()
    return cand if session.fits(cand, limit) else None


def proxy_warnings(table, proxies: list[str]) -> list[str]:
    """One line per proxy plan that measures worse than a baseline of its budget it was predicted to beat."""
    out = []
    for budget, rows in table[table.kind != "reference"].groupby("budget"):
        base = rows[rows.kind.isin(["uniform", "recipe"])]
        for _, r in rows[rows.kind == "proxy"].iterrows():
            proxy = r.get("proxy")
            col = f"predicted_{proxy}"
            if proxy not in proxies or col not in rows:
                continue
            for _, b in base.iterrows():
                if r[col] < b[col] and r["kl"] > b["kl"]:
                    out.append(
                        f"{r['plan']} was predicted to beat {b['plan']} ({col} {r[col]:.4g} vs {b[col]:.4g}) "
                        f"but measures worse (KL {r['kl']:.4g} vs {b['kl']:.4g})"
                    )
    return out
