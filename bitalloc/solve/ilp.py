"""Exact allocation by integer linear programming (scipy.optimize.milp / HiGHS).

    minimise   sum_u sum_o loss[u, o] x[u, o]
    subject to sum_o x[u, o] = 1          (one option per unit)
               sum   cost_k[u, o] x[u, o] <= limit_k   for every budget k
               x binary
"""
from __future__ import annotations

import logging
import time

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array, kron

from ..errors import BitallocError
from .problem import Problem

log = logging.getLogger(__name__)


def solve_ilp(problem: Problem, time_limit: float = 60.0) -> tuple[np.ndarray, dict]:
    """Optimal choice per unit, and a report (status, optimality gap, seconds)."""
    for kind, limit in problem.limits.items():
        if problem.minimum(kind) > limit:
            raise BitallocError(
                f"budget {kind} <= {limit:.6g} is below the smallest possible plan ({problem.minimum(kind):.6g})"
            )
    units, options = problem.loss.shape
    one_each = LinearConstraint(kron(csr_array(np.eye(units)), csr_array(np.ones((1, options)))), 1, 1)
    budgets = [LinearConstraint(problem.costs[k].reshape(1, -1), -np.inf, limit) for k, limit in problem.limits.items()]
    start = time.perf_counter()
    result = milp(
        c=problem.loss.reshape(-1), constraints=[one_each, *budgets], integrality=np.ones(units * options),
        bounds=Bounds(0, 1), options={"time_limit": time_limit, "mip_rel_gap": 1e-9},
    )
    seconds = time.perf_counter() - start
    if result.x is None:
        raise BitallocError(f"the ILP found no plan within the budget ({result.message})")
    choice = result.x.reshape(units, options).argmax(axis=1)
    report = {
        "solver": "ilp", "status": result.message, "optimal": bool(result.status == 0),
        "gap": float(getattr(result, "mip_gap", 0.0) or 0.0), "seconds": round(seconds, 4),
    }
    if not problem.feasible(choice):
        raise BitallocError("the ILP's rounded solution breaks the budget; try a looser time limit")
    return choice, report
