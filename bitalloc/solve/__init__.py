"""Solvers: one registry, one signature: solve(problem, **options) -> (choice per unit, report)."""
from __future__ import annotations

from ..errors import BitallocError
from .ilp import solve_ilp
from .problem import Problem, build_problem

SOLVERS = {"ilp": solve_ilp}


def get_solver(name: str):
    try:
        return SOLVERS[name]
    except KeyError:
        raise BitallocError(f"unknown solver '{name}' (known: {', '.join(sorted(SOLVERS))})") from None


__all__ = ["Problem", "SOLVERS", "build_problem", "get_solver", "solve_ilp"]
