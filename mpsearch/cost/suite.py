"""Every cost of a search in one place: the cost models, their constraint rows, each plan's costs.

``CostSuite.build(hardware, energy, workload, shape, profile)`` builds every registered cost
model for a hardware profile (roofline), an energy table and a workload, and, given this
machine's measured kernel table, the measured latencies (a search opens it with
:func:`mpsearch.run.profile.open_costs`). :meth:`constraints` turns ``--constraint`` specs into MILP
rows; :meth:`row` and :meth:`breakdown` give a plan's costs for results.csv and costs.csv.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..core.format import Format
from ..core.space import Decision, Member
from ..solvers import Constraint
from . import BudgetError
from .model import ConstraintSpec, CostModel, ModelShape, Workload, cost_names, get_cost

log = logging.getLogger(__name__)
#: how a results column's unit suffix is written in a message
UNIT_NAMES = {"mj": "mJ"}


@dataclass
class CostSuite:
    models: dict[str, CostModel]
    workload: Workload
    hardware: str = ""

    @staticmethod
    def build(hw, energy_hw, workload: Workload, shape: ModelShape, profile=None) -> "CostSuite":
        """Every registered cost model for a hardware profile, an energy table and a workload; the
        measured ones only with this machine's kernel table (:func:`mpsearch.run.profile.open_costs`)."""
        models = {}
        for name in cost_names():
            cls = get_cost(name)
            if cls.needs == "measured" and profile is None:
                continue
            models[name] = cls(energy_hw if cls.needs == "energy" else hw, workload, shape, profile)
        return CostSuite(models, workload, hw.name)

    def constraints(self, decisions: list[Decision], specs: tuple[str, ...]) -> tuple[Constraint, ...]:
        """MILP rows for ``specs``: per decision and format its cost, the limit less the fixed part.
        A limit below what the cheapest plan costs is refused here, naming both figures."""
        out = []
        for text in specs:
            spec = ConstraintSpec.parse(text)
            if spec.cost not in self.models:
                raise BudgetError(
                    f"constraint {text!r}: cost {spec.cost!r} is not available in this search "
                    f"(available: {', '.join(self.models)})"
                )
            cm = self.models[spec.cost]
            table = cm.table(decisions)
            floor = cm.fixed() + sum(float(t.min()) for t in table)
            if floor > spec.limit * (1 + 1e-9):
                unit = f" {UNIT_NAMES.get(cm.unit, cm.unit)}" if cm.unit else ""
                raise BudgetError(
                    f"constraint {text!r} cannot be met: the cheapest plan costs {floor * cm.display:.4g}{unit} "
                    f"({cm.fixed() * cm.display:.4g}{unit} of it outside the decisions)"
                )
            scale = _scale(table, spec.limit)  # keep the MILP's rows near 1 whatever the unit
            out.append(Constraint(spec.cost, [t * scale for t in table], (spec.limit - cm.fixed()) * scale))
        names = [c.name for c in out]
        if len(set(names)) != len(names):
            raise BudgetError(f"two constraints on the same cost: {names}; give each cost once")
        return tuple(out)

    def row(self, formats: dict[str, Format], members: list[Member]) -> dict[str, float]:
        """Every cost of a plan, in its results column's unit."""
        return {cm.column: cm.total(formats, members) * cm.display for cm in self.models.values()}

    def timed(self) -> set[str]:
        """Columns read off this machine's clocks.

        Measured kernels, and the roofline when its peaks were measured here."""
        return {
            cm.column
            for cm in self.models.values()
            if cm.needs == "measured" or (cm.needs == "roofline" and self.hardware == "local")
        }

    def meets(self, formats: dict[str, Format], members: list[Member], specs: tuple[str, ...]) -> bool:
        """Whether a plan (any plan, a baseline too) is within every constraint."""
        return all(
            self.models[s.cost].total(formats, members) <= s.limit * (1 + 1e-9)
            for s in map(ConstraintSpec.parse, specs)
        )

    def breakdown(self, plan: str, formats: dict[str, Format], members: list[Member]) -> list[dict]:
        """Rows ``plan, cost, part, value`` (costs.csv): each cost split by tensor kind and the fixed part."""
        return [
            {"plan": plan, "cost": cm.column[len("cost_") :], "part": part, "value": v}
            for cm in self.models.values()
            for part, v in cm.breakdown(formats, members).items()
        ]


def _scale(table: list[np.ndarray], limit: float) -> float:
    top = max((float(t.max()) for t in table), default=0.0)
    return 1.0 / top if top > 0 else 1.0 / max(limit, 1e-30)
