"""The whole size/quality trade-off from one table: the Pareto front of (bytes, predicted loss).

Two ways, one result shape:

- `exact` (default): dynamic programming over units that keeps, after each
  unit, every partial plan no other partial plan beats in both size and
  objective (Nemhauser-Ullmann).  The last list *is* the whole front, exact in
  the cost model's bytes: for any budget, the best plan on it is the optimum
  (the ILP's plan, found without branching).  Real tables keep it small
  (about 25k plans for 224 layers x 8 options); `eps` > 0 thins it, dropping
  plans that improve the objective by less than that fraction.
- `ilp`: the ILP solved at evenly spaced budgets (a parametric sweep); the only
  one that also honours further limits (BOPs, latency) besides the size.

A front is a list of points sorted by size, each strictly better than the one
before: {"size", "loss", "objective", "choice"}.
"""
from __future__ import annotations

import time

import numpy as np

from ..errors import BitallocError
from .baselines import greedy_fill
from .ilp import _one_each, solve_ilp
from .problem import Problem


class FrontTooLarge(BitallocError):
    """More partial plans than the caller allowed: use the ILP instead."""


class ExactFront:
    """Every Pareto-optimal plan of (size, objective), with the choices to rebuild each.

    `allowed` ([units, options] booleans) restricts each unit's options and
    `limit` drops partial plans that cannot fit it whatever the remaining units
    choose: the exact solver of a reduced ILP (see ilp.solve_ilp).
    """

    def __init__(self, problem: Problem, eps: float = 0.0, allowed: np.ndarray | None = None,
                 limit: float | None = None, max_plans: int | None = None):
        if set(problem.limits) - {problem.size_kind}:
            raise BitallocError(
                f"the Pareto DP trades one cost ({problem.size_kind}) and this run has several budgets "
                f"({', '.join(problem.limits)}): leave out the pareto solver (--solver/--compare), or give one budget"
            )
        self.problem = problem
        cost, objective = problem.costs[problem.size_kind], problem.objective
        allowed = np.ones(cost.shape, dtype=bool) if allowed is None else allowed
        cheapest = np.where(allowed, cost, np.inf).min(axis=1)
        after = np.concatenate([np.cumsum(cheapest[::-1])[::-1][1:], [0.0]])  # least cost of the units after u
        sizes, values = np.zeros(1), np.zeros(1)
        self.parents, self.picks = [], []
        for u in range(len(problem.units)):
            options = np.nonzero(allowed[u])[0]
            size = (sizes[:, None] + cost[u, options][None]).ravel()
            value = (values[:, None] + objective[u, options][None]).ravel()
            order = np.lexsort((value, size))
            size, value = size[order], value[order]
            best_before = np.concatenate([[np.inf], np.minimum.accumulate(value)[:-1]])
            keep = value < best_before * (1 - eps) if eps else value < best_before
            keep[0] = True
            if limit is not None:
                keep &= size + after[u] <= limit
            if max_plans is not None and keep.sum() > max_plans:
                raise FrontTooLarge(f"more than {max_plans} partial plans")
            if not keep.any():  # no partial plan can still end within the limit
                raise BitallocError(f"budget {problem.size_kind} <= {limit:.6g} is below the smallest possible plan")
            sizes, values = size[keep], value[keep]
            self.parents.append((order[keep] // len(options)).astype(np.int32))
            self.picks.append(options[order[keep] % len(options)].astype(np.int16))
        self.sizes, self.values = sizes, values

    def __len__(self) -> int:
        return len(self.sizes)

    def index(self, limit: float) -> int:
        i = int(np.searchsorted(self.sizes, limit, side="right")) - 1
        if i < 0:
            raise BitallocError(f"budget {self.problem.size_kind} <= {limit:.6g} is below the smallest possible plan "
                                f"({self.sizes[0]:.6g})")
        return i

    def choice(self, limit: float) -> np.ndarray:
        """The best plan whose size fits `limit`."""
        i = self.index(limit)
        choice = np.zeros(len(self.problem.units), dtype=np.int64)
        for u in range(len(self.problem.units) - 1, -1, -1):
            choice[u] = self.picks[u][i]
            i = self.parents[u][i]
        return choice

    def curve(self, points: int = 1000) -> dict:
        """Up to `points` front plans (size, objective), evenly spread, for drawing."""
        picks = np.unique(np.linspace(0, len(self) - 1, min(points, len(self))).round().astype(int))
        return {"size": self.sizes[picks].tolist(), "objective": self.values[picks].tolist()}


def size_range(problem: Problem) -> tuple[float, float]:
    """Smallest plan's size, and the size beyond which no plan lowers the objective."""
    kind = problem.size_kind
    rows = np.arange(len(problem.units))
    best = np.lexsort((problem.costs[kind], problem.objective), axis=1)[:, 0]
    return problem.minimum(kind), float(problem.costs[kind][rows, best].sum())


def _points(problem: Problem, choices) -> list[dict]:
    kind = problem.size_kind
    points = sorted(
        ({"size": problem.total(kind, c), "loss": problem.total("loss", c),
          "objective": problem.total("objective", c), "choice": [int(o) for o in c]} for c in choices),
        key=lambda p: (p["size"], p["objective"]),
    )
    front = []
    for point in points:
        if not front or point["objective"] < front[-1]["objective"]:
            front.append(point)
    return front


def _budgets(problem: Problem, points: int) -> np.ndarray:
    low, high = size_range(problem)
    return np.linspace(low, high, max(points, 2))


def front_exact(problem: Problem, points: int = 50) -> tuple[list[dict], dict]:
    front = ExactFront(problem.with_limits({}))
    return _points(problem, [front.choice(b) for b in _budgets(problem, points)]), \
        {"plans_on_front": len(front), "curve": front.curve()}


def front_ilp(problem: Problem, points: int = 50, time_limit: float = 10.0) -> tuple[list[dict], dict]:
    """Exact plans at evenly spaced budgets, smallest first.

    Each solve's incumbent (for reduced-cost fixing) is the previous budget's
    optimum, which still fits, greedily upgraded into the new room.
    """
    one_each = _one_each(*problem.loss.shape)
    choices = []
    for budget in _budgets(problem, points):
        sized = problem.with_limits({**problem.limits, problem.size_kind: budget})
        incumbent = greedy_fill(sized, choices[-1])[0] if choices else None
        try:
            choice, _ = solve_ilp(sized, time_limit, incumbent=incumbent, _one_each_cache=one_each)
        except BitallocError:  # another limit leaves no plan at this size
            continue
        choices.append(choice)
    return _points(problem, choices), {}


FRONTS = {"exact": front_exact, "ilp": front_ilp}


def pareto_front(problem: Problem, method: str = "exact", points: int = 50) -> dict:
    """The front at `points` budgets as plain data (JSON-ready), with the method and the seconds it took."""
    if method not in FRONTS:
        raise BitallocError(f"unknown front method '{method}' (known: {', '.join(FRONTS)})")
    start = time.perf_counter()
    front, extra = FRONTS[method](problem, points)
    return {"kind": problem.size_kind, "method": method, "seconds": round(time.perf_counter() - start, 4),
            "options": [str(o) for o in problem.options], "units": [u[0] for u in problem.units],
            "points": front, **extra}


def solve_pareto(problem: Problem, eps: float = 0.0) -> tuple[np.ndarray, dict]:
    """The best plan on the exact front at the problem's size budget (no branching)."""
    problem.check_limits()
    start = time.perf_counter()
    front = ExactFront(problem, eps)
    choice = front.choice(problem.limits[problem.size_kind])
    return choice, {"solver": "pareto", "method": "exact", "plans_on_front": len(front), "eps": eps,
                    "seconds": round(time.perf_counter() - start, 4)}
