"""Budget allocators, each registered by its own module (looked up by name: :func:`get_solver`)."""

from __future__ import annotations

from typing import Any

from ..core import registry
from .baq import BAQ
from .base import Allocator, Constraint, Problem, SolverError, Status
from .brute import BruteForce
from .greedy import Greedy
from .lagrangian import Lagrangian, pareto_front
from .milp import MILP

__all__ = [
    "Allocator",
    "BAQ",
    "Constraint",
    "BruteForce",
    "Greedy",
    "Lagrangian",
    "MILP",
    "pareto_front",
    "Problem",
    "SolverError",
    "Status",
    "get_solver",
]


def get_solver(name: str, **params: Any) -> Allocator:
    """Instantiate the solver registered as ``name``; unknown names list the known ones."""
    return registry.get("solver", name)(**params)
