"""Solvers: one registry, one signature: solve(problem, **options) -> (choice per unit, report).

`ilp` is exact for the table; `pareto` is the ZeroQ-style DP at the budget;
`uniform`, `rules`, `greedy` and `annealing` are the baselines users compare
against; `optuna` refines a plan with measured losses (it needs a `measure`).
"""
from __future__ import annotations

from ..errors import BitallocError
from .baselines import solve_annealing, solve_greedy, solve_rules, solve_uniform
from .ilp import solve_ilp
from .optuna_search import solve_optuna
from .pareto import pareto_front, solve_pareto
from .problem import WEIGHTINGS, Problem, build_problem

SOLVERS = {
    "ilp": solve_ilp,
    "pareto": solve_pareto,
    "optuna": solve_optuna,
    "uniform": solve_uniform,
    "rules": solve_rules,
    "greedy": solve_greedy,
    "annealing": solve_annealing,
}
TABLE_SOLVERS = ("uniform", "rules", "greedy", "annealing", "pareto", "ilp")  # need only the table


def get_solver(name: str):
    try:
        return SOLVERS[name]
    except KeyError:
        raise BitallocError(f"unknown solver '{name}' (known: {', '.join(sorted(SOLVERS))})") from None


__all__ = ["Problem", "SOLVERS", "TABLE_SOLVERS", "WEIGHTINGS", "build_problem", "get_solver", "pareto_front",
           "solve_ilp"]
