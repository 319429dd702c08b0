"""The allocation problem every solver reads: units, options, loss and cost matrices.

A unit is one layer, or a tie group whose layers must share one option (q/k/v
and gate/up for fused kernels).  Loss and costs of a unit are the sums over its
layers, so every solver sees the same additive model.

`loss` is the table's error summed as measured (what reports call the predicted
loss); `objective` is what solvers minimise: the same errors after a weighting
(see WEIGHTINGS), equal to `loss` by default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..cost import LayerShape, layer_bytes
from ..errors import BitallocError
from ..quant.option import Option
from ..table import SensitivityTable

# name -> (errors [layers, options], weights per layer [layers]) -> per-layer objective
WEIGHTINGS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    # the errors as measured: the sum is the predicted loss of the whole model
    "sum": lambda errors, numel: errors,
    # error per weight times the layer's share of weights: large layers count more
    "params": lambda errors, numel: errors * (numel / numel.mean())[:, None],
    # relative RMS instead of relative MSE: small errors count more, the allocation is flatter
    "sqrt": lambda errors, numel: np.sqrt(np.maximum(errors, 0.0)),
}


@dataclass
class Problem:
    units: list[list[str]]
    options: list[Option]
    loss: np.ndarray  # [units, options]
    costs: dict[str, np.ndarray]  # budget kind -> [units, options]
    limits: dict[str, float] = field(default_factory=dict)
    objective: np.ndarray | None = None  # [units, options]; None: the loss itself

    def __post_init__(self):
        if self.objective is None:
            self.objective = self.loss

    @property
    def size_kind(self) -> str:
        """The cost a front trades against: the one limited kind, else bytes when present."""
        if len(self.limits) == 1:
            return next(iter(self.limits))
        return "bytes" if "bytes" in self.costs else next(iter(self.limits or self.costs))

    def assignment(self, choice) -> dict[str, Option]:
        return {layer: self.options[o] for unit, o in zip(self.units, choice) for layer in unit}

    def total(self, kind: str, choice) -> float:
        matrix = {"loss": self.loss, "objective": self.objective}.get(kind)
        matrix = self.costs[kind] if matrix is None else matrix
        return float(matrix[np.arange(len(self.units)), np.asarray(choice)].sum())

    def totals(self, choice) -> dict[str, float]:
        return {kind: self.total(kind, choice) for kind in ("loss", "objective", *self.costs)}

    def feasible(self, choice) -> bool:
        return all(self.total(kind, choice) <= limit for kind, limit in self.limits.items())

    def minimum(self, kind: str) -> float:
        return float(self.costs[kind].min(axis=1).sum())

    def check_limits(self) -> None:
        """Refuse budgets no plan can meet, naming the kind; solvers call this first."""
        if not self.limits:
            raise BitallocError("no budget given: set at least one limit (bytes, average bits, ...)")
        for kind, limit in self.limits.items():
            if kind not in self.costs:
                raise BitallocError(f"budget kind '{kind}' has no cost matrix (known: {', '.join(self.costs)})")
            if self.minimum(kind) > limit:
                raise BitallocError(
                    f"budget {kind} <= {limit:.6g} is below the smallest possible plan ({self.minimum(kind):.6g})"
                )

    def with_limits(self, limits: dict[str, float]) -> "Problem":
        return Problem(self.units, self.options, self.loss, self.costs, dict(limits), self.objective)


CostFn = Callable[[LayerShape, Option], float]


def build_problem(table: SensitivityTable, shapes: list[LayerShape], options: list[Option] | None = None,
                  tie_groups: list[list[str]] | None = None, cost_fns: dict[str, CostFn] | None = None,
                  weighting: str = "sum") -> Problem:
    """Problem over the table's layers; `tie_groups` (full layer names) become shared units.

    `cost_fns` maps each budget kind to the cost of one layer under one option
    (default: bytes only); every kind gets its own [units, options] matrix.
    `weighting` names how errors enter the objective (WEIGHTINGS).
    """
    if weighting not in WEIGHTINGS:
        raise BitallocError(f"unknown weighting '{weighting}' (known: {', '.join(WEIGHTINGS)})")
    cost_fns = cost_fns or {"bytes": layer_bytes}
    options = options or table.options
    lookup = table.lookup()
    by_name = {s.name: s for s in shapes}
    layers = table.layers
    missing = [l for l in layers if l not in by_name]
    if missing:
        raise BitallocError(f"sensitivity table names layer {missing[0]}, which the model does not have")
    errors = np.zeros((len(layers), len(options)))
    for i, layer in enumerate(layers):
        for o, option in enumerate(options):
            row = lookup.get((layer, str(option)))
            if row is None:
                raise BitallocError(f"sensitivity table has no row for {layer} at {option}: profile that option")
            errors[i, o] = row["error"]
    numel = np.array([by_name[layer].numel for layer in layers], dtype=float)
    weighted = WEIGHTINGS[weighting](errors, numel)

    layer_set = set(layers)
    # a group only partly in the table ties the members it has; every layer is in exactly one unit
    units = [present for group in (tie_groups or []) if (present := [layer for layer in group if layer in layer_set])]
    grouped = {layer for unit in units for layer in unit}
    units += [[layer] for layer in layers if layer not in grouped]
    order = {layer: i for i, layer in enumerate(layers)}
    units.sort(key=lambda unit: order[unit[0]])
    members = [[order[layer] for layer in unit] for unit in units]
    loss = np.stack([errors[m].sum(axis=0) for m in members])
    objective = np.stack([weighted[m].sum(axis=0) for m in members])
    costs = {
        kind: np.array([[sum(fn(by_name[layer], option) for layer in unit) for option in options] for unit in units],
                       dtype=float)
        for kind, fn in cost_fns.items()
    }
    return Problem(units, list(options), loss, costs, objective=objective if weighting != "sum" else None)
