"""Budgets of every kind (bits, bytes, BOPs, latency from a table): grammar, tables, and plans that obey them."""
import csv
import itertools
import json

import numpy as np
import pytest

from bitalloc import pipeline
from bitalloc.budget import parse_budget
from bitalloc.cost import LATENCY_COLUMNS, LatencyTable, LayerShape, assignment_bops, assignment_bytes, layer_bops, \
    layer_bytes
from bitalloc.errors import BitallocError
from bitalloc.quant import parse
from bitalloc.solve import build_problem, solve_ilp
from bitalloc.table import SensitivityTable
from conftest import run_cli

SPACE = [parse(o) for o in ("rtn:int2:g64:asym", "rtn:int3:g64:asym", "rtn:int4:g128:sym", "rtn:int4:g64:asym:a8",
                            "rtn:int8:pc:sym:a8", "fp16")]


def write_latency_table(path, shapes, options, rng, backends=("cpu",), batches=(1,), extra=True):
    """A table as the kernel benchmarks write it: one row per (backend, batch, shape, option)."""
    keys = sorted({(s.out_features, s.in_features) for s in shapes})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LATENCY_COLUMNS + (("device",) if extra else ()))
        for backend, batch, (out, inp), option in itertools.product(backends, batches, keys, options):
            ms = out * inp * (option.bits if option.quantized else 16) * 1e-7 * rng.uniform(0.5, 1.5)
            writer.writerow([backend, batch, out, inp, str(option), f"{ms:.6g}"] + (["test"] if extra else []))
    return path


def random_shapes(rng, n=10):
    return [LayerShape(f"model.layers.{i // 2}.l{i % 2}", int(rng.integers(1, 6)) * 32, int(rng.integers(1, 9)) * 40,
                       bool(rng.integers(2))) for i in range(n)]


def random_table(rng, shapes):
    rows = []
    for s in shapes:
        scale = rng.uniform(0.1, 10)
        for o in SPACE:
            bits = o.bits if o.quantized else 16
            rows.append({"layer": s.name, "option": str(o), "error": scale * 2.0 ** -bits * rng.uniform(0.5, 2),
                         "bytes": layer_bytes(s, o), "numel": s.numel})
    return SensitivityTable({}, rows)


def test_budget_grammar(tmp_path):
    shapes = [LayerShape("a", 64, 128, False), LayerShape("b", 32, 128, True)]
    int4 = parse("rtn:int4:g64:asym")
    assert parse_budget("12GBOPs", shapes).kind == "bops" and parse_budget("12GBOPs", shapes).limit == 12e9
    assert parse_budget("3.5e9 bops", shapes).limit == 3.5e9
    assert parse_budget("800MBOPs", shapes).limit == 8e8
    assert parse_budget("2TB", shapes).limit == 2e12 and parse_budget("1GiB", shapes).limit == 2**30
    assert parse_budget(f"{int4}@bops", shapes).limit == sum(layer_bops(s, int4) for s in shapes)
    assert parse_budget(f"{int4}@bytes", shapes).limit == parse_budget(str(int4), shapes).limit
    latency = LatencyTable.load(write_latency_table(tmp_path / "t.csv", shapes, [int4], np.random.default_rng(0)))
    lookup = latency.lookup()
    for text, ms in (("3ms", 3.0), ("250us", 0.25), ("0.004s", 4.0)):
        budget = parse_budget(text, shapes, lookup)
        assert (budget.kind, budget.limit) == ("latency", pytest.approx(ms))
    uniform = parse_budget(f"{int4}@latency", shapes, lookup)
    assert uniform.limit == pytest.approx(sum(lookup(s, int4) for s in shapes), rel=1e-11) and uniform.uniform == int4
    assert uniform.to_json()["latency"] == {"table": str(tmp_path / "t.csv"), "backend": "cpu", "batch": 1}
    with pytest.raises(BitallocError, match="needs a latency table"):
        parse_budget("3ms", shapes)
    with pytest.raises(BitallocError, match="FLOPs and MACs are the same under every option"):
        parse_budget("5GFLOPs", shapes)
    with pytest.raises(BitallocError, match="unknown budget kind 'speed'"):
        parse_budget(f"{int4}@speed", shapes)
    for huge in ("1e999MB", "1e305TB", "1e999bops", "1e999ms"):
        with pytest.raises(BitallocError, match="too large"):
            parse_budget(huge, shapes, lookup)


def test_latency_tables_are_checked_row_by_row(tmp_path):
    shapes = [LayerShape("model.layers.0.q", 64, 128, False)]
    int4, int3 = parse("rtn:int4:g64:asym"), parse("rtn:int3:g64:asym")
    rng = np.random.default_rng(0)
    table = LatencyTable.load(write_latency_table(tmp_path / "two.csv", shapes, [int4], rng, ("cpu", "triton"), (1, 8)))
    assert table.backends == ["cpu", "triton"]
    assert table.lookup("triton", 8)(shapes[0], int4) > 0
    with pytest.raises(BitallocError, match="several backends"):
        table.lookup()
    with pytest.raises(BitallocError, match="no rows for backend cpu at batch 4"):
        table.lookup("cpu", 4)
    with pytest.raises(BitallocError, match=r"no row for 64x128 rtn:int3:g64:asym on backend cpu at batch 1 "
                                            r"\(layer model.layers.0.q\)"):
        table.lookup("cpu", 1)(shapes[0], int3)
    good = "cpu,1,64,128,rtn:int4:g64:asym,0.5\n"
    for body, message in (("cpu,1,64,128,rtn:int4:g64:asym\n", "row 2: cannot read"),
                          (good + good, "row 3: rtn:int4:g64:asym at 64x128, cpu batch 1 is given twice"),
                          ("cpu,1,64,128,rtn:int9:g64:asym,0.5\n", "row 2: .*unsupported format 'int9'"),
                          ("cpu,1,64,128,rtn:int4:g64:asym,nan\n", "row 2: latency must be finite"),
                          ("", "has no rows")):
        (tmp_path / "bad.csv").write_text(",".join(LATENCY_COLUMNS) + "\n" + body)
        with pytest.raises(BitallocError, match=message):
            LatencyTable.load(tmp_path / "bad.csv")
    (tmp_path / "bad.csv").write_text("backend,batch,option\ncpu,1,fp16\n")
    with pytest.raises(BitallocError, match="lacks column 'out_features'"):
        LatencyTable.load(tmp_path / "bad.csv")
    with pytest.raises(BitallocError, match="latency table not found"):
        LatencyTable.load(tmp_path / "none.csv")


def recount(kind, shapes, assignment, lookup):
    """The cost of a plan recomputed from the cost model, apart from the solver's matrices."""
    if kind == "bytes":
        return assignment_bytes(shapes, assignment)
    if kind == "bops":
        return assignment_bops(shapes, assignment)
    return sum(lookup(s, assignment[s.name]) for s in shapes)


@pytest.mark.parametrize("seed", range(4))
def test_plans_never_exceed_budgets_of_any_kind(seed, tmp_path):
    rng = np.random.default_rng(seed)
    shapes = random_shapes(rng)
    lookup = LatencyTable.load(write_latency_table(tmp_path / "lat.csv", shapes, SPACE, rng)).lookup()
    table = random_table(rng, shapes)
    numel = sum(s.numel for s in shapes)
    for kind in ("bits", "bytes", "bops", "latency"):
        probe = parse_budget({"bits": "4", "bytes": "1kB", "bops": "1GBOPs", "latency": "1ms"}[kind], shapes, lookup)
        lowest = sum(min(probe.cost(s, o) for o in SPACE) for s in shapes)
        highest = sum(max(probe.cost(s, o) for o in SPACE) for s in shapes)
        for fraction in rng.uniform(0, 1, 3):
            value = lowest + fraction * (highest - lowest)
            text = {"bits": f"{8 * value / numel:.4f}", "bytes": f"{value:.0f}B",
                    "bops": f"{value / 1e6:.6f}MBOPs", "latency": f"{value:.6f}ms"}[kind]
            budget = parse_budget(text, shapes, lookup)
            if budget.limit < lowest:  # rounding the text put it just below the cheapest plan
                with pytest.raises(BitallocError, match="below the smallest"):
                    budget.check_reachable(shapes, SPACE)
                continue
            problem = build_problem(table, shapes, SPACE, cost_fns=budget.cost_fns())
            problem.limits = {budget.kind: budget.limit}
            choice, _ = solve_ilp(problem)
            reported = problem.total(budget.kind, choice)
            assert reported <= budget.limit
            assignment = problem.assignment(choice)
            assert recount(budget.kind, shapes, assignment, lookup) == pytest.approx(reported, rel=1e-12)
            assert recount(budget.kind, shapes, assignment, lookup) <= budget.limit * (1 + 1e-12)
            assert problem.total("bytes", choice) == assignment_bytes(shapes, assignment)


def test_budgets_of_two_kinds_hold_together():
    rng = np.random.default_rng(7)
    shapes = random_shapes(rng, 12)
    problem = build_problem(random_table(rng, shapes), shapes, SPACE,
                            cost_fns={"bytes": layer_bytes, "bops": layer_bops})
    problem.limits = {"bytes": parse_budget("5", shapes).limit, "bops": assignment_bops(
        shapes, {s.name: parse("rtn:int4:g64:asym:a8") for s in shapes})}
    choice, _ = solve_ilp(problem)
    assert problem.feasible(choice)
    assert all(problem.total(kind, choice) <= limit for kind, limit in problem.limits.items())


def test_search_takes_a_latency_budget_from_a_table(cli_env, tiny_dir, capsys):
    from transformers import AutoModelForCausalLM

    from bitalloc.cost import layer_shapes

    shapes = layer_shapes(AutoModelForCausalLM.from_pretrained(tiny_dir))
    space = [parse(o) for o in ("rtn:int2:g32:asym", "rtn:int4:g32:asym", "rtn:int8:g32:asym")]
    path = write_latency_table(cli_env / "latency.csv", shapes, space, np.random.default_rng(1), ("cpu", "triton"))
    argv = ["--model", str(tiny_dir), "--space", ",".join(map(str, space)), "--budget", "rtn:int4:g32:asym@latency",
            "--latency-table", str(path), "--latency-backend", "triton", "--out", "run", "--nsamples", "4",
            "--calib-seqlen", "32", "--seqlen", "32", "--eval-windows", "4", "--quiet"]
    code, out, err = run_cli(pipeline.main, argv, capsys)
    assert code == 0, err
    plan = json.loads((cli_env / "run" / "plan.json").read_text())
    limit = plan["budget"]["limit"]
    assert plan["budget"]["kind"] == "latency" and plan["budget"]["latency"]["backend"] == "triton"
    assert plan["predicted"]["latency"] <= limit
    lookup = LatencyTable.load(path).lookup("triton", 1)
    assert sum(lookup(s, parse(plan["layers"][s.name])) for s in shapes) == pytest.approx(plan["predicted"]["latency"])
    assert "ms in the decoder linears (triton, batch 1)" in out
    variants = json.loads((cli_env / "run" / "results.json").read_text())["variants"]
    assert variants["mixed (ilp)"]["latency"] == plan["predicted"]["latency"]
    assert variants["uniform rtn:int4:g32:asym"]["latency"] == pytest.approx(limit)
    code, _, err = run_cli(pipeline.main, argv[:4] + ["--budget", "0.000001ms"] + argv[6:], capsys)
    assert code == 2 and "below the smallest plan" in err


def test_biases_are_bytes_but_not_bits_per_weight():
    """A bias is stored in float16 under every option: fp16 everywhere is 16.0 bits and fits a 16-bit budget."""
    from bitalloc.cost import average_bits, bits_per_weight

    shapes = [LayerShape(f"model.layers.{i}.x", 64, 100, i == 0) for i in range(3)]
    fp16 = {s.name: parse("fp16") for s in shapes}
    assert average_bits(shapes, fp16) == 16.0 and bits_per_weight(shapes[0], parse("fp16")) == 16.0
    assert parse_budget("16", shapes).limit == assignment_bytes(shapes, fp16)
    int4 = parse("rtn:int4:g64:asym")
    assert parse_budget(str(average_bits(shapes, {s.name: int4 for s in shapes})), shapes).limit == \
        assignment_bytes(shapes, {s.name: int4 for s in shapes})
