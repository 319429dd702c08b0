import itertools

import numpy as np
import pytest

from bitalloc.budget import parse_budget
from bitalloc.cost import LayerShape, layer_bytes
from bitalloc.errors import BitallocError
from bitalloc.quant import parse
from bitalloc.solve import Problem, build_problem, solve_ilp
from bitalloc.table import SensitivityTable

OPTIONS = [parse(f"rtn:int{b}:g64:asym") for b in (2, 3, 4, 8)]


def random_problem(rng, units=5):
    loss = np.sort(rng.random((units, len(OPTIONS))), axis=1)[:, ::-1] * rng.random((units, 1)) * 10
    size = np.array([[b * rng.integers(1, 5) for b in (2, 3, 4, 8)] for _ in range(units)], dtype=float)
    return Problem([[f"l{i}"] for i in range(units)], OPTIONS, loss, {"bytes": size})


@pytest.mark.parametrize("seed", range(6))
def test_ilp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    problem = random_problem(rng)
    limit = (problem.minimum("bytes") + problem.costs["bytes"].max(axis=1).sum()) / 2
    problem.limits = {"bytes": limit}
    choice, report = solve_ilp(problem)
    best = min(
        (c for c in itertools.product(range(4), repeat=5) if problem.feasible(c)), key=lambda c: problem.total("loss", c)
    )
    assert problem.feasible(choice)
    assert problem.total("loss", choice) == pytest.approx(problem.total("loss", best))
    assert report["optimal"] and report["seconds"] >= 0


def test_budget_below_the_smallest_plan_is_refused():
    problem = random_problem(np.random.default_rng(0))
    problem.limits = {"bytes": problem.minimum("bytes") - 1}
    with pytest.raises(BitallocError, match="below the smallest possible plan"):
        solve_ilp(problem)


def _table(layers, shapes):
    rows = []
    for i, layer in enumerate(layers):
        for option in OPTIONS:
            rows.append({"layer": layer, "option": str(option), "error": (i + 1) * 2.0 ** -option.bits,
                         "bytes": layer_bytes(shapes[i], option), "numel": shapes[i].numel})
    return SensitivityTable({}, rows)


def test_tie_groups_share_one_option():
    shapes = [LayerShape(n, 64, 128, False) for n in ("b.0.q", "b.0.k", "b.0.v", "b.0.o")]
    table = _table([s.name for s in shapes], shapes)
    problem = build_problem(table, shapes, OPTIONS, tie_groups=[["b.0.q", "b.0.k", "b.0.v"]])
    assert problem.units == [["b.0.q", "b.0.k", "b.0.v"], ["b.0.o"]]
    problem.limits = {"bytes": sum(layer_bytes(s, OPTIONS[1]) for s in shapes)}
    choice, _ = solve_ilp(problem)
    assignment = problem.assignment(choice)
    assert assignment["b.0.q"] == assignment["b.0.k"] == assignment["b.0.v"]


def test_a_tie_group_only_partly_in_the_table_ties_the_members_it_has():
    shapes = [LayerShape(n, 64, 128, False) for n in ("b.0.q", "b.0.k", "b.0.o")]
    table = _table([s.name for s in shapes], shapes)
    problem = build_problem(table, shapes, OPTIONS, tie_groups=[["b.0.q", "b.0.k", "b.0.v"]])
    assert problem.units == [["b.0.q", "b.0.k"], ["b.0.o"]]


@pytest.mark.parametrize("seed", range(4))
def test_plans_never_exceed_the_budget_as_the_cost_model_counts(seed):
    rng = np.random.default_rng(seed)
    shapes = [LayerShape(f"b.{i}.x", int(rng.integers(1, 9)) * 32, int(rng.integers(1, 20)) * 48, bool(i % 2))
              for i in range(12)]
    table = _table([s.name for s in shapes], shapes)
    problem = build_problem(table, shapes, OPTIONS)
    for bits in rng.uniform(2.6, 8.4, 5):
        budget = parse_budget(f"{bits:.3f}", shapes)
        problem.limits = {"bytes": budget.limit}
        choice, _ = solve_ilp(problem)
        used = sum(layer_bytes(s, problem.assignment(choice)[s.name]) for s in shapes)
        assert used <= budget.limit


def test_budget_forms():
    shapes = [LayerShape("a", 64, 128, False)]
    assert parse_budget("4.5", shapes).limit == 64 * 128 * 4.5 / 8
    assert parse_budget("4bits", shapes).limit == 64 * 128 / 2
    assert parse_budget("1MB", shapes).limit == 1_000_000
    assert parse_budget("1MiB", shapes).limit == 2**20
    uniform = parse_budget("rtn:int4:g64:asym", shapes)
    assert uniform.limit == layer_bytes(shapes[0], parse("rtn:int4:g64:asym"))
    assert uniform.uniform == parse("rtn:int4:g64:asym")
    for bad in ("lots", "-3", "0", "40"):
        with pytest.raises(BitallocError):
            parse_budget(bad, shapes)
