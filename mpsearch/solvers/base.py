"""The allocation problem every solver answers, and the interface solvers share.

A bit-width plan is a multiple-choice knapsack: each decision (a tensor, or a
group of tied tensors whose loss/cost are summed upstream) picks exactly one
option, the summed cost must stay within a budget, and the summed proxy loss is
minimised. Solvers differ only in how they search; feasibility rules, result
bookkeeping and exact float64 re-evaluation of the chosen plan live here so
that every solver reports numbers computed the same way.
"""

from __future__ import annotations

import inspect
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np

#: Relative slack on the budget: a plan whose cost exceeds the budget by no more
#: than ``REL_TOL * |budget|`` counts as within budget (float summation noise).
REL_TOL = 1e-9


class Status:
    """Outcome of a solve; plain strings so they serialise into reports as-is."""

    OPTIMAL = "optimal"
    INFEASIBLE = "infeasible"
    INACCURATE = "optimal_inaccurate"
    ERROR = "error"
    #: Statuses for which ``choice_``/``loss_``/``cost_`` hold a usable plan.
    SOLUTION_PRESENT = (OPTIMAL, INACCURATE)


class SolverError(RuntimeError):
    """A solver crashed (not: the budget was infeasible). The message says what to try next."""


def _as_vector(values: Any) -> np.ndarray:
    """Copy to a read-only 1-D float64 array, so a Problem cannot be mutated behind our back."""
    arr = np.array(values, dtype=np.float64, copy=True).reshape(-1)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Constraint:
    """A further cost table with its own limit: ``sum_i cost[i][choice_i] <= limit``.

    Lets one problem bound bits, bytes, BOPs and latency at once (HAWQ-V3 style).
    ``cost[i][j]`` is the cost of option ``j`` of decision ``i`` (>= 0, finite).
    """

    name: str
    cost: tuple[np.ndarray, ...]
    limit: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", str(self.name))
        object.__setattr__(self, "cost", tuple(_as_vector(v) for v in self.cost))
        object.__setattr__(self, "limit", float(self.limit))
        if not math.isfinite(self.limit):
            raise ValueError(f"constraint {self.name!r}: limit must be finite, got {self.limit}")

    @property
    def min_total(self) -> float:
        """Smallest reachable total of this table on its own (every decision at its cheapest)."""
        return float(sum(float(c.min()) for c in self.cost))

    def fits(self, total: float) -> bool:
        return total <= self.limit + REL_TOL * abs(self.limit)


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields make value-equality ambiguous
class Problem:
    """A multiple-choice knapsack: pick one option per decision, total cost <= budget.

    ``loss[i][j]`` / ``cost[i][j]`` are the loss and cost (in budget units, >= 0)
    of option ``j`` of decision ``i``. Arrays are stored as read-only float64.
    ``constraints`` adds further cost tables with their own limits; only solvers
    with ``supports_constraints`` (the MILP, brute force) accept them.
    """

    decisions: tuple[str, ...]
    options: tuple[tuple[str, ...], ...]
    loss: tuple[np.ndarray, ...]
    cost: tuple[np.ndarray, ...]
    budget: float
    constraints: tuple[Constraint, ...] = ()

    def __post_init__(self) -> None:
        # Normalise containers first (frozen, hence object.__setattr__), then validate.
        object.__setattr__(self, "decisions", tuple(str(d) for d in self.decisions))
        object.__setattr__(self, "options", tuple(tuple(str(o) for o in opts) for opts in self.options))
        object.__setattr__(self, "loss", tuple(_as_vector(v) for v in self.loss))
        object.__setattr__(self, "cost", tuple(_as_vector(v) for v in self.cost))
        object.__setattr__(self, "budget", float(self.budget))
        object.__setattr__(self, "constraints", tuple(self.constraints))
        self._validate()

    def _validate(self) -> None:
        n = len(self.decisions)
        lengths = {"options": len(self.options), "loss": len(self.loss), "cost": len(self.cost)}
        if any(v != n for v in lengths.values()):
            raise ValueError(f"{n} decisions but lengths differ: {lengths}")
        if len(set(self.decisions)) != n:
            dupes = sorted({d for d in self.decisions if self.decisions.count(d) > 1})
            raise ValueError(f"duplicate decision names: {dupes}")
        for name, opts, loss, cost in zip(self.decisions, self.options, self.loss, self.cost):
            if not opts:
                raise ValueError(f"decision {name!r} has no options")
            if len(set(opts)) != len(opts):
                raise ValueError(f"decision {name!r} has duplicate option labels: {opts}")
            for what, arr in (("loss", loss), ("cost", cost)):
                if arr.shape != (len(opts),):
                    raise ValueError(f"decision {name!r}: {what} has {arr.size} entries for {len(opts)} options")
                bad = np.flatnonzero(~np.isfinite(arr))
                if bad.size:
                    j = int(bad[0])
                    raise ValueError(f"decision {name!r} option {opts[j]!r}: {what} is {arr[j]} (must be finite)")
            neg = np.flatnonzero(cost < 0)
            if neg.size:
                j = int(neg[0])
                raise ValueError(f"decision {name!r} option {opts[j]!r}: cost {cost[j]} is negative")
        if not math.isfinite(self.budget):
            raise ValueError(f"budget must be finite, got {self.budget}")
        seen = set()
        for con in self.constraints:
            if not isinstance(con, Constraint):
                raise TypeError(f"constraints must be Constraint objects, got {type(con).__name__}")
            if con.name in seen:
                raise ValueError(f"two constraints are named {con.name!r}")
            seen.add(con.name)
            if len(con.cost) != n:
                raise ValueError(f"constraint {con.name!r} has {len(con.cost)} cost rows for {n} decisions")
            for name, opts, c in zip(self.decisions, self.options, con.cost):
                if c.shape != (len(opts),):
                    raise ValueError(
                        f"constraint {con.name!r}, decision {name!r}: {c.size} costs for {len(opts)} options"
                    )
                if not np.all(np.isfinite(c)) or np.any(c < 0):
                    raise ValueError(
                        f"constraint {con.name!r}, decision {name!r}: costs must be finite and >= 0, got {c.tolist()}"
                    )

    @classmethod
    def build(
        cls,
        decisions: Sequence[str],
        options: Sequence[Sequence[str]],
        loss: Sequence[Sequence[float] | np.ndarray],
        cost: Sequence[Sequence[float] | np.ndarray],
        budget: float,
        constraints: Sequence[Constraint] = (),
    ) -> "Problem":
        """Construct from lists (or arrays); everything becomes tuples / float64 arrays."""
        return cls(
            decisions=tuple(decisions),
            options=tuple(tuple(o) for o in options),
            loss=tuple(_as_vector(v) for v in loss),
            cost=tuple(_as_vector(v) for v in cost),
            budget=float(budget),
            constraints=tuple(constraints),
        )

    @property
    def n_decisions(self) -> int:
        return len(self.decisions)

    @property
    def min_budget(self) -> float:
        """Smallest feasible budget: every decision takes its cheapest option."""
        return float(sum(float(c.min()) for c in self.cost))

    @property
    def max_useful_budget(self) -> float:
        """Cost of the unconstrained optimum (min loss per decision, ties -> cheapest).

        A larger budget cannot lower the loss further.
        """
        total = 0.0
        for loss, cost in zip(self.loss, self.cost):
            best = np.flatnonzero(loss == loss.min())
            total += float(cost[best].min())
        return total

    def fits(self, cost: float) -> bool:
        """Whether a plan of total ``cost`` is within budget (up to ``REL_TOL`` relative)."""
        return cost <= self.budget + REL_TOL * abs(self.budget)

    @property
    def is_feasible(self) -> bool:
        """Whether any plan fits the budget (with extra constraints: whether each fits on its
        own, a necessary condition; the MILP decides the rest)."""
        return self.fits(self.min_budget) and all(c.fits(c.min_total) for c in self.constraints)

    def constraint_totals(self, choice: Sequence[int]) -> dict[str, float]:
        """Total of every extra constraint's table for a plan."""
        return {c.name: float(sum(float(v[j]) for v, j in zip(c.cost, choice))) for c in self.constraints}

    def feasible(self, choice: Sequence[int]) -> bool:
        """Whether a plan meets the budget and every extra constraint."""
        totals = self.constraint_totals(choice)
        return self.fits(self.evaluate(choice)[1]) and all(c.fits(totals[c.name]) for c in self.constraints)

    @property
    def effective_budget(self) -> float:
        """Budget solvers should target: lifted to ``min_budget`` when within tolerance below it."""
        return max(self.budget, self.min_budget)

    def evaluate(self, choice: Sequence[int]) -> tuple[float, float]:
        """Exact float64 ``(loss, cost)`` of a plan, summed in decision order.

        Summation order matches :attr:`min_budget`, so the cheapest plan's cost
        equals ``min_budget`` bit for bit.
        """
        if len(choice) != self.n_decisions:
            raise ValueError(f"choice has {len(choice)} entries for {self.n_decisions} decisions")
        loss = float(sum(float(l[j]) for l, j in zip(self.loss, choice)))
        cost = float(sum(float(c[j]) for c, j in zip(self.cost, choice)))
        return loss, cost


class Allocator(ABC):
    """Base class for solvers, scikit-learn style.

    ``__init__`` only stores keyword parameters (no work, no validation beyond
    types) so solvers can be built from config files and cloned cheaply.
    ``solve(problem)`` is called once per budget point; it returns ``self`` with
    the fitted attributes (trailing underscore) set:

    - ``status_``: one of :class:`Status`
    - ``choice_``: option index per decision, or ``None`` without a solution
    - ``loss_`` / ``cost_``: exact float64 totals of ``choice_``, or ``None``
    - ``min_budget_``: ``problem.min_budget`` (reported even when infeasible)
    - ``problem_``: the problem solved
    - ``wall_time_``: seconds spent in :meth:`solve`
    - ``solver_status_``: the backend's raw status string, or ``None``
    - ``constraint_costs_``: totals of ``problem.constraints`` for ``choice_`` (empty without)

    An infeasible budget is a normal outcome (``status_ == "infeasible"``),
    never an exception; :class:`SolverError` is reserved for solver crashes.
    """

    #: Registry name, set by each subclass.
    name: ClassVar[str] = "base"
    #: Whether the solver honours ``Problem.constraints`` (others refuse such problems).
    supports_constraints: ClassVar[bool] = False

    status_: str
    choice_: tuple[int, ...] | None
    loss_: float | None
    cost_: float | None
    min_budget_: float
    problem_: Problem
    wall_time_: float
    solver_status_: str | None

    @classmethod
    def is_available(cls) -> bool:
        """Called before construction (e.g. when listing solvers or skipping tests):
        whether this solver's backend is installed. Default: always available."""
        return True

    def get_params(self) -> dict[str, Any]:
        """The keyword parameters given to ``__init__`` (for logging / cloning)."""
        sig = inspect.signature(type(self).__init__)
        skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        params = list(sig.parameters.values())[1:]  # drop self
        return {p.name: getattr(self, p.name) for p in params if p.kind not in skip}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    def solve(self, problem: Problem) -> "Allocator":
        """Called once per (problem, budget): checks feasibility, runs :meth:`_solve`,
        then re-evaluates the plan exactly. Returns ``self``."""
        if problem.constraints and not self.supports_constraints:
            names = ", ".join(c.name for c in problem.constraints)
            raise ValueError(
                f"solver {self.name!r} handles one budget, but the problem has extra constraints ({names}); use 'milp'"
            )
        start = time.perf_counter()
        self.problem_ = problem
        self.constraint_costs_ = {}
        self.min_budget_ = problem.min_budget
        self.choice_ = None
        self.loss_ = None
        self.cost_ = None
        self.solver_status_ = None
        if not problem.is_feasible:
            self.status_ = Status.INFEASIBLE
        else:
            status, choice = self._solve(problem)
            self.status_ = status
            if status in Status.SOLUTION_PRESENT:
                if choice is None:
                    raise SolverError(
                        f"{type(self).__name__} reported {status!r} without a plan; "
                        "this is a solver bug, try another solver (e.g. 'brute' on tiny cases)"
                    )
                self.choice_ = tuple(int(j) for j in choice)
                self.loss_, self.cost_ = problem.evaluate(self.choice_)
                self.constraint_costs_ = problem.constraint_totals(self.choice_)
        self.wall_time_ = time.perf_counter() - start
        return self

    @abstractmethod
    def _solve(self, problem: Problem) -> tuple[str, Sequence[int] | None]:
        """Called by :meth:`solve` only for feasible problems; return ``(status, choice)``.

        ``choice`` must be a plan with ``problem.fits(cost)`` whenever the status
        is in ``Status.SOLUTION_PRESENT``; loss/cost are recomputed by the caller.
        """


def greedy_repair(problem: Problem, choice: Sequence[int]) -> tuple[int, ...]:
    """Make an over-budget plan fit by cheap downgrades, smallest loss increase per cost saved first.

    A heuristic fallback (for numerical trouble or time limits), not an optimiser.
    Terminates because the all-cheapest plan fits whenever ``problem.is_feasible``.
    """
    plan = [int(j) for j in choice]
    _, total = problem.evaluate(plan)
    while not problem.fits(total):
        best: tuple[float, float, int, int] | None = None  # (ratio, -saving, i, j)
        for i, (loss, cost) in enumerate(zip(problem.loss, problem.cost)):
            cur = plan[i]
            for j in np.flatnonzero(cost < cost[cur]):
                saving = float(cost[cur] - cost[j])
                key = (float(loss[j] - loss[cur]) / saving, -saving, i, int(j))
                if best is None or key < best:
                    best = key
        if best is None:  # nothing cheaper anywhere: plan is already all-cheapest
            break
        _, _, i, j = best
        plan[i] = j
        _, total = problem.evaluate(plan)
    return tuple(plan)
