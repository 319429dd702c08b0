"""The allocation problem every solver reads: units, options, loss and cost matrices.

A unit is one layer, or a tie group whose layers must share one option (q/k/v
and gate/up for fused kernels).  Loss and costs of a unit are the sums over its
layers, so every solver sees the same additive model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..cost import LayerShape, layer_bytes
from ..errors import BitallocError
from ..quant.option import Option
from ..table import SensitivityTable


@dataclass
class Problem:
    units: list[list[str]]
    options: list[Option]
    loss: np.ndarray  # [units, options]
    costs: dict[str, np.ndarray]  # budget kind -> [units, options]
    limits: dict[str, float] = field(default_factory=dict)

    def assignment(self, choice) -> dict[str, Option]:
        return {layer: self.options[o] for unit, o in zip(self.units, choice) for layer in unit}

    def choice_of(self, assignment: dict[str, Option]) -> np.ndarray:
        index = {str(o): i for i, o in enumerate(self.options)}
        return np.array([index[str(assignment[unit[0]])] for unit in self.units])

    def total(self, kind: str, choice) -> float:
        matrix = self.loss if kind == "loss" else self.costs[kind]
        return float(matrix[np.arange(len(self.units)), np.asarray(choice)].sum())

    def feasible(self, choice) -> bool:
        return all(self.total(kind, choice) <= limit for kind, limit in self.limits.items())

    def minimum(self, kind: str) -> float:
        return float(self.costs[kind].min(axis=1).sum())


CostFn = Callable[[LayerShape, Option], float]


def build_problem(table: SensitivityTable, shapes: list[LayerShape], options: list[Option] | None = None,
                  tie_groups: list[list[str]] | None = None, cost_fns: dict[str, CostFn] | None = None) -> Problem:
    """Problem over the table's layers; `tie_groups` (full layer names) become shared units.

    `cost_fns` maps each budget kind to the cost of one layer under one option
    (default: bytes only); every kind gets its own [units, options] matrix.
    """
    cost_fns = cost_fns or {"bytes": layer_bytes}
    options = options or table.options
    lookup = table.lookup()
    by_name = {s.name: s for s in shapes}
    layers = table.layers
    missing = [l for l in layers if l not in by_name]
    if missing:
        raise BitallocError(f"sensitivity table names layer {missing[0]}, which the model does not have")
    grouped = {layer for group in (tie_groups or []) for layer in group}
    layer_set = set(layers)
    units = [list(g) for g in (tie_groups or []) if all(layer in layer_set for layer in g)]
    units += [[layer] for layer in layers if layer not in grouped]
    order = {layer: i for i, layer in enumerate(layers)}
    units.sort(key=lambda unit: order[unit[0]])
    loss = np.zeros((len(units), len(options)))
    costs = {kind: np.zeros((len(units), len(options))) for kind in cost_fns}
    for u, unit in enumerate(units):
        for o, option in enumerate(options):
            for layer in unit:
                row = lookup.get((layer, str(option)))
                if row is None:
                    raise BitallocError(f"sensitivity table has no row for {layer} at {option}: profile that option")
                loss[u, o] += row["error"]
                for kind, fn in cost_fns.items():
                    costs[kind][u, o] += fn(by_name[layer], option)
    return Problem(units, list(options), loss, costs)
