"""Exact allocation by integer linear programming (scipy.optimize.milp / HiGHS).

    minimise   sum_u sum_o objective[u, o] x[u, o]
    subject to sum_o x[u, o] = 1          (one option per unit; a tie group is one unit)
               sum   cost_k[u, o] x[u, o] <= limit_k   for every budget k (bytes, BOPs, latency...)
               x binary

The objective is scaled to order one before HiGHS sees it, so its absolute gap
tolerance cannot stop the search early on tables whose errors are tiny.

Before branching, reduced-cost fixing shrinks the problem without changing its
optimum: with LB the LP relaxation's value, d_j a variable's reduced cost and
UB the value of any feasible plan (the greedy one), every plan at least as good
as UB has c.x >= LB + d_j x_j, so a variable with d_j > UB - LB is 0 in all of them.
With one budget, the reduced problem is then solved exactly without branching
by the Pareto DP (pareto.ExactFront), several times faster than HiGHS's branch
and bound on 7B-scale tables; with several budgets HiGHS branches.
"""
from __future__ import annotations

import logging
import time

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from scipy.sparse import csr_array, kron

from ..errors import BitallocError
from .problem import Problem

log = logging.getLogger(__name__)
MAX_DP_PLANS = 1_000_000  # partial plans the exact DP may hold before the ILP branches instead


def _one_each(units: int, options: int) -> LinearConstraint:
    return LinearConstraint(kron(csr_array(np.eye(units)), csr_array(np.ones((1, options)))), 1, 1)


def reduced_cost_bounds(problem: Problem, c: np.ndarray, one_each: LinearConstraint,
                        incumbent: np.ndarray | None = None) -> np.ndarray:
    """Upper bound (0 or 1) per variable after reduced-cost fixing against a feasible plan (default: greedy's)."""
    from .baselines import solve_greedy

    units, options = problem.loss.shape
    kinds = list(problem.limits)
    lp = linprog(c, A_ub=np.stack([problem.costs[k].reshape(-1) for k in kinds]),
                 b_ub=[problem.limits[k] for k in kinds], A_eq=one_each.A, b_eq=np.ones(units), bounds=(0, 1),
                 method="highs")
    if incumbent is None or not problem.feasible(incumbent):
        try:
            incumbent, _ = solve_greedy(problem)
        except BitallocError:  # the greedy start does not fit every budget: no bound to fix against
            return np.ones(units * options)
    if lp.status != 0:
        return np.ones(units * options)
    upper = float(c.reshape(units, options)[np.arange(units), incumbent].sum())
    slack = (upper - lp.fun) * (1 + 1e-9) + 1e-12
    return (lp.lower.marginals <= slack).astype(float)


def _solve_reduced_exactly(problem: Problem, upper: np.ndarray) -> np.ndarray:
    """The reduced ILP (one budget) solved without branching: the best fitting plan of its exact Pareto front."""
    from .pareto import ExactFront

    limit = problem.limits[problem.size_kind]
    front = ExactFront(problem, allowed=upper.reshape(problem.loss.shape) > 0, limit=limit, max_plans=MAX_DP_PLANS)
    return front.choice(limit)


def solve_ilp(problem: Problem, time_limit: float = 60.0, gap: float = 1e-6, incumbent: np.ndarray | None = None,
              method: str = "auto", _one_each_cache: LinearConstraint | None = None) -> tuple[np.ndarray, dict]:
    """Optimal choice per unit, and a report (method, status, gap, seconds).

    After reduced-cost fixing, `method` "milp" branches with HiGHS (within the
    relative `gap`; `time_limit` bounds its time, and the best plan found by
    then is returned with `optimal` false); "dp" solves the reduced problem
    exactly by the Pareto DP of pareto.py (one budget kind only); "auto" takes
    "dp" when there is one budget and the reduced front stays small, else "milp".
    `incumbent`, a plan known to fit, bounds the fixing (default: the greedy plan).
    """
    if method not in ("auto", "dp", "milp"):
        raise BitallocError(f"unknown ILP method '{method}' (auto, dp, milp)")
    problem.check_limits()
    start = time.perf_counter()
    units, options = problem.loss.shape
    one_each = _one_each_cache or _one_each(units, options)
    objective = problem.objective.reshape(-1)
    c = objective / (float(np.abs(objective).max()) or 1.0)
    upper = reduced_cost_bounds(problem, c, one_each, incumbent)
    fixed = int((upper == 0).sum())
    if method != "milp" and len(problem.limits) == 1:
        from .pareto import FrontTooLarge

        try:
            choice = _solve_reduced_exactly(problem, upper)
            return choice, {"solver": "ilp", "method": "dp", "status": "optimal", "optimal": True, "gap": 0.0,
                            "seconds": round(time.perf_counter() - start, 4), "variables": int(units * options),
                            "fixed_to_zero": fixed}
        except FrontTooLarge:
            log.info("reduced front too large for the DP; branching with HiGHS")
    elif method == "dp":
        raise BitallocError("the ILP's dp method handles one budget kind; use milp for several")
    budgets = [LinearConstraint(problem.costs[k].reshape(1, -1), -np.inf, limit) for k, limit in problem.limits.items()]
    result = milp(
        c=c, constraints=[one_each, *budgets], integrality=np.ones(units * options),
        bounds=Bounds(0, upper), options={"time_limit": time_limit, "mip_rel_gap": gap},
    )
    seconds = time.perf_counter() - start
    if result.x is None:
        raise BitallocError(f"the ILP found no plan within the budget ({result.message})")
    choice = result.x.reshape(units, options).argmax(axis=1)
    report = {
        "solver": "ilp", "method": "milp", "status": result.message, "optimal": bool(result.status == 0),
        "gap": float(getattr(result, "mip_gap", 0.0) or 0.0), "seconds": round(seconds, 4),
        "time_limit": time_limit, "variables": int(units * options), "fixed_to_zero": fixed,
    }
    if not problem.feasible(choice):
        raise BitallocError("the ILP's rounded solution breaks the budget; try a looser time limit")
    return choice, report
