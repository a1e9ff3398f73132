"""Budget allocators. Importing this package registers every built-in solver."""
from __future__ import annotations

from typing import Any

from ..core import registry
from . import base, lagrangian, milp  # noqa: F401  (imported for their @register side effects)
from .baq import BAQ  # also registers "baq"
from .base import Allocator, Constraint, Problem, SolverError, Status
from .greedy import Greedy  # also registers "greedy"
from .lagrangian import Lagrangian, pareto_front
from .milp import MILP, BruteForce

__all__ = ["Allocator", "BAQ", "Constraint", "BruteForce", "Greedy", "Lagrangian", "MILP", "pareto_front", "Problem", "SolverError", "Status", "get_solver"]


def get_solver(name: str, **params: Any) -> Allocator:
    """Instantiate the solver registered as ``name``; unknown names list the known ones."""
    return registry.get("solver", name)(**params)
