"""Re-weight the table from measured plans, so the exact solver can propose the next plan to measure.

A table's errors are right in kind but often wrong in scale for whole groups
of layers (a metric blind to how one layer type's error reaches the logits).
Given measured losses y_t of plans t, fit one factor a_g per group
g = (layer role, third of the depth):

    y_t  ~  sum_g a_g * X[t, g],   X[t, g] = sum of the objective of group g's units under plan t

by non-negative least squares, pulled towards the single best scale while
there are few measurements; then solve the ILP on the re-weighted objective,
restricted to the search space.  The Optuna search measures that plan next.
Once that plan is measured, fits on bootstrap resamples of the measurements
propose the plans the data cannot yet rule out.
"""
from __future__ import annotations

import re

import numpy as np
from scipy.optimize import nnls

from .ilp import solve_ilp
from .problem import Problem


def unit_groups(problem: Problem) -> np.ndarray:
    """Group index per unit: its role (name without the block index) and the third of the depth it sits in."""
    indices = [re.search(r"\.(\d+)\.", unit[0]) for unit in problem.units]
    blocks = max((int(m.group(1)) for m in indices if m), default=0) + 1
    keys = [(re.sub(r"\.\d+\.", ".", unit[0]), 3 * int(m.group(1)) // blocks if m else 0)
            for unit, m in zip(problem.units, indices)]
    names = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    return np.array([names[key] for key in keys])


def fit_weights(problem: Problem, groups: np.ndarray, plans: list[np.ndarray], measured: list[float],
                prior: float = 0.1) -> np.ndarray:
    """Non-negative factor per group; `prior` sets how strongly they are pulled to one common scale."""
    rows = np.arange(len(problem.units))
    count = int(groups.max()) + 1
    features = np.array([np.bincount(groups, problem.objective[rows, plan], count) for plan in plans])
    target = np.asarray(measured, dtype=float)
    total = features.sum(axis=1)
    scale = float(total @ target / max(total @ total, 1e-300))
    strength = np.sqrt(prior * max(float((features ** 2).sum()) / count, 1e-300))
    system = np.vstack([features, strength * np.eye(count)])
    weights, _ = nnls(system, np.concatenate([target, np.full(count, strength * scale)]))
    return weights


def refit_plan(problem: Problem, space: list[list[int]], plans: list[np.ndarray], measured: list[float],
               rng: np.random.Generator | None = None) -> np.ndarray:
    """The ILP's plan under the re-weighted objective, using only each unit's options in `space`;
    with `rng`, fitted on a bootstrap resample of the measurements."""
    groups = unit_groups(problem)
    if rng is not None:
        picks = rng.integers(0, len(plans), len(plans))
        plans, measured = [plans[i] for i in picks], [measured[i] for i in picks]
    weights = fit_weights(problem, groups, plans, measured)
    objective = problem.objective * weights[groups][:, None]
    outside = np.ones_like(objective, dtype=bool)
    for u, options in enumerate(space):
        outside[u, options] = False
    objective[outside] = objective.max() * 1e3 + 1.0
    reweighted = Problem(problem.units, problem.options, problem.loss, problem.costs, problem.limits, objective)
    return solve_ilp(reweighted)[0]
