"""Every solver on the same tables: budgets held in the cost model's bytes, the ILP never beaten."""
import itertools

import numpy as np
import pytest

from bitalloc.budget import parse_budget
from bitalloc.cost import LayerShape, assignment_bytes, layer_bytes
from bitalloc.errors import BitallocError
from bitalloc.quant import parse
from bitalloc.solve import SOLVERS, TABLE_SOLVERS, build_problem, pareto_front, solve_ilp
from bitalloc.solve.baselines import more_bits_block, rule_levels
from bitalloc.solve.pareto import ExactFront
from bitalloc.table import SensitivityTable

OPTIONS = [parse(t) for t in ("rtn:int2:g64:asym", "rtn:int3:g64:asym", "rtn:int3:g128:asym", "rtn:int4:g64:asym",
                              "rtn:int4:g128:sym", "rtn:int8:g64:asym")]
ROLES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64), "gate_proj": (96, 64),
         "up_proj": (96, 64), "down_proj": (64, 96)}


def random_model(rng, blocks=4):
    shapes = [LayerShape(f"model.layers.{b}.{name}", *ROLES[name], bool(rng.integers(2)) and name == "o_proj")
              for b in range(blocks) for name in ROLES]
    ties = [[f"model.layers.{b}.{n}" for n in group] for b in range(blocks)
            for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))]
    rows = []
    for s in shapes:
        scale = rng.lognormal(0, 1.5)
        for o in OPTIONS:
            noise = 1 + 0.3 * rng.random() + (0.2 if o.group_size == 128 else 0)
            rows.append({"layer": s.name, "option": str(o), "error": scale * 4.0 ** -o.bits * noise,
                         "bytes": layer_bytes(s, o), "numel": s.numel})
    return shapes, ties, SensitivityTable({}, rows)


def bops(shape, option):
    return shape.numel * option.bits * 16


@pytest.mark.parametrize("seed", range(5))
def test_every_solver_fits_the_budget_and_the_ilp_is_never_beaten(seed):
    rng = np.random.default_rng(seed)
    shapes, ties, table = random_model(rng)
    problem = build_problem(table, shapes, OPTIONS, ties if seed % 2 else None)
    for bits in rng.uniform(3.0, 6.0, 3):
        budget = parse_budget(f"{bits:.3f}", shapes)
        problem.limits = {"bytes": budget.limit}
        results = {name: SOLVERS[name](problem)[0] for name in TABLE_SOLVERS}
        results["milp"] = solve_ilp(problem, method="milp")[0]
        for name, choice in results.items():
            assignment = problem.assignment(choice)
            assert assignment_bytes(shapes, assignment) <= budget.limit, name
            for group in (ties if seed % 2 else []):
                assert len({str(assignment[layer]) for layer in group}) == 1, name
        best = problem.total("objective", results["ilp"])
        for name, choice in results.items():
            assert best <= problem.total("objective", choice) * (1 + 1e-9), name
        assert problem.total("objective", results["milp"]) == pytest.approx(best, rel=1e-6)
        assert problem.total("objective", results["pareto"]) == pytest.approx(best, rel=1e-6)


def test_several_budgets_at_once_match_brute_force():
    rng = np.random.default_rng(7)
    shapes, _, table = random_model(rng, blocks=1)
    shapes = shapes[:5]
    table.rows = [r for r in table.rows if r["layer"] in {s.name for s in shapes}]
    problem = build_problem(table, shapes, OPTIONS[:4],
                            cost_fns={"bytes": layer_bytes, "bops": bops})
    problem.limits = {"bytes": problem.minimum("bytes") * 1.6, "bops": problem.minimum("bops") * 1.3}
    everything = [c for c in itertools.product(range(4), repeat=5) if problem.feasible(c)]
    best = min(problem.total("loss", c) for c in everything)
    for name in ("ilp", "greedy", "annealing", "rules", "uniform"):
        try:
            choice, _ = SOLVERS[name](problem)
        except BitallocError:  # uniform may find no single option that fits both
            assert name == "uniform"
            continue
        assert problem.feasible(choice), name
        assert problem.total("loss", choice) >= best - 1e-12
    assert problem.total("loss", solve_ilp(problem)[0]) == pytest.approx(best)
    with pytest.raises(BitallocError, match="several budgets"):
        SOLVERS["pareto"](problem)


def test_exact_front_is_the_optimum_at_every_budget():
    rng = np.random.default_rng(3)
    shapes, ties, table = random_model(rng)
    problem = build_problem(table, shapes, OPTIONS, ties)
    exact = pareto_front(problem, "exact", points=12)
    sweep = pareto_front(problem, "ilp", points=12)
    assert exact["plans_on_front"] >= len(exact["points"]) > 5
    sizes = [p["size"] for p in exact["points"]]
    losses = [p["objective"] for p in exact["points"]]
    assert sizes == sorted(sizes) and losses == sorted(losses, reverse=True)
    by_size = {round(p["size"]): p["objective"] for p in sweep["points"]}
    for point in exact["points"]:
        problem.limits = {"bytes": point["size"]}
        assert point["objective"] == pytest.approx(problem.total("objective", solve_ilp(problem)[0]), rel=1e-6)
        assert problem.total("bytes", point["choice"]) == point["size"]
    assert len(by_size) >= 5
    front = ExactFront(problem.with_limits({}))
    with pytest.raises(BitallocError, match="below the smallest"):
        front.choice(problem.minimum("bytes") - 1)


def test_weighting_changes_what_is_minimised():
    rng = np.random.default_rng(1)
    shapes, _, table = random_model(rng)
    plain = build_problem(table, shapes, OPTIONS)
    by_params = build_problem(table, shapes, OPTIONS, weighting="params")
    assert np.array_equal(plain.loss, by_params.loss) and not np.allclose(plain.objective, by_params.objective)
    numel = np.array([s.numel for s in shapes], float)
    assert np.allclose(by_params.objective, plain.loss * (numel / numel.mean())[:, None])
    budget = {"bytes": parse_budget("3.5", shapes).limit}
    plain.limits, by_params.limits = budget, dict(budget)
    weighted, _ = solve_ilp(by_params)
    assert by_params.total("objective", weighted) <= by_params.total("objective", solve_ilp(plain)[0]) + 1e-12
    with pytest.raises(BitallocError, match="unknown weighting 'cubic'"):
        build_problem(table, shapes, OPTIONS, weighting="cubic")


def test_rule_mix_favours_value_and_down_projections_by_name_alone():
    rng = np.random.default_rng(2)
    shapes, _, table = random_model(rng, blocks=16)
    problem = build_problem(table, shapes, OPTIONS)
    _, bumps = rule_levels(problem)
    assert {u[0].rsplit(".", 1)[1] for u, b in zip(problem.units, bumps) if b} == {"v_proj", "down_proj"}
    assert [more_bits_block(i, 16) for i in range(16)] == [i in (0, 1, 4, 7, 10, 13, 14, 15) for i in range(16)]
    problem.limits = {"bytes": sum(layer_bytes(s, OPTIONS[1]) for s in shapes)}
    choice, report = SOLVERS["rules"](problem)
    assignment = problem.assignment(choice)
    assert problem.feasible(choice) and report["base"] == str(OPTIONS[1])
    bits = lambda names: np.mean([assignment[s.name].bits for s in shapes if s.name.endswith(names)])
    assert bits(("v_proj", "down_proj")) > 3 > bits(("q_proj", "gate_proj"))
    # names and positions only: a reshuffled table gives the same mix
    problem.objective = problem.loss = rng.permutation(problem.loss)
    assert np.array_equal(SOLVERS["rules"](problem)[0], choice)


def test_ilp_reports_gap_time_and_limit():
    rng = np.random.default_rng(4)
    shapes, ties, table = random_model(rng)
    problem = build_problem(table, shapes, OPTIONS, ties)
    problem.limits = {"bytes": parse_budget("3.2", shapes).limit}
    exact, report = solve_ilp(problem)
    assert report["method"] == "dp" and report["optimal"] and report["gap"] == 0 and report["fixed_to_zero"] > 0
    branched, report = solve_ilp(problem, time_limit=5.0, method="milp")
    assert report["method"] == "milp" and report["optimal"] and 0 <= report["gap"] <= 1e-6
    assert report["time_limit"] == 5.0 and report["seconds"] < 5.0
    assert problem.total("objective", exact) <= problem.total("objective", branched) * (1 + 1e-9)
    problem.limits = {"watts": 3.0}
    with pytest.raises(BitallocError, match="budget kind 'watts'"):
        solve_ilp(problem)


def test_a_latency_budget_set_by_an_option_admits_that_options_plan_in_any_summing_order():
    """Milliseconds are floats: the budget adds layers in model order, the problem tie groups first."""
    from bitalloc.budget import combined_cost_fns, combined_limits
    from bitalloc.cost import LatencyTable

    shapes = [LayerShape(f"model.layers.0.{n}", out, 8, False) for n, out in (("a", 30), ("b", 20), ("c", 10))]
    options = [parse("rtn:int2:g8:asym"), parse("rtn:int4:g8:asym")]
    ms = {0: {30: 0.3, 20: 0.2, 10: 0.1}, 1: {30: 0.6, 20: 0.4, 10: 0.2}}
    rows = [{"backend": "cpu", "batch": 1, "out_features": out, "in_features": 8, "option": str(options[i]),
             "latency_ms": ms[i][out]} for i in ms for out in ms[i]]
    budget = parse_budget(f"{options[0]}@latency", shapes, LatencyTable.from_records(rows, "table").lookup())
    table = SensitivityTable({}, [{"layer": s.name, "option": str(o), "error": 2.0 - i, "bytes": 0, "numel": 1}
                                  for s in shapes for i, o in enumerate(options)])
    problem = build_problem(table, shapes, options, [["model.layers.0.b", "model.layers.0.c"]],
                            combined_cost_fns([budget]))
    problem.limits = combined_limits([budget])
    assert problem.total("latency", [0, 0]) > 0.6  # 0.6000000000000001: one rounding over the plain sum
    for name in ("uniform", "greedy", "ilp", "pareto"):
        assert list(SOLVERS[name](problem)[0]) == [0, 0], name


def test_the_exact_front_says_when_no_plan_fits_the_limit():
    problem = build_problem(SensitivityTable({}, [{"layer": f"l{u}", "option": str(o), "error": 2.0 - i, "bytes": 10 * (i + 1),
                                                   "numel": 1} for u in range(3) for i, o in enumerate(OPTIONS[:2])]),
                            [LayerShape(f"l{u}", 8, 8, False) for u in range(3)], OPTIONS[:2],
                            cost_fns={"bytes": lambda s, o: 10 * o.bits})
    with pytest.raises(BitallocError, match="below the smallest possible plan"):
        ExactFront(problem, limit=25.0)
