"""Solver benchmark on a synthetic 7B-scale table: 32 Llama-7B blocks x 7 linears = 224 layers x 8 options.

Errors follow the shape real tables have (a per-layer scale times 4^-bits, a
group-size penalty, 30 % noise); bytes are the cost model's exact bytes of the
Llama-7B shapes.  With --tie fused, q/k/v and gate/up are tie groups (128 units).
Prints, per solver, the predicted loss relative to the ILP's and the time (the ILP
by its default method, and forced to branch with HiGHS: "ilp (milp)"), over
budgets from 2.5 to 6 average bits, then the 50-budget Pareto front by both
methods, all measured in this one run.

    python scripts/bench_solvers.py
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from bitalloc.budget import parse_budget
from bitalloc.cost import LayerShape, layer_bytes
from bitalloc.errors import BitallocError, cli_entry
from bitalloc.help_format import script_parser
from bitalloc.quant import parse
from bitalloc.solve import SOLVERS, TABLE_SOLVERS, build_problem, pareto_front, solve_ilp
from bitalloc.table import SensitivityTable

SPACE = ["rtn:int2:g64:asym", "rtn:int3:g64:asym", "rtn:int3:g128:asym", "rtn:int4:g64:asym", "rtn:int4:g128:asym",
         "rtn:int5:g64:asym", "rtn:int6:g64:asym", "rtn:int8:g64:asym"]
LLAMA_7B = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
            "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
            "mlp.down_proj": (4096, 11008)}


def synthetic_table(seed: int, blocks: int = 32):
    rng = np.random.default_rng(seed)
    options = [parse(t) for t in SPACE]
    shapes = [LayerShape(f"model.layers.{b}.{name}", *shape, False) for b in range(blocks)
              for name, shape in LLAMA_7B.items()]
    rows = []
    for s in shapes:
        scale = rng.lognormal(0, 1)
        for o in options:
            error = scale * 4.0 ** -o.bits * (1 + 0.3 * rng.random()) * (1.3 if o.group_size == 128 else 1.0)
            rows.append({"layer": s.name, "option": str(o), "error": error, "bytes": layer_bytes(s, o),
                         "numel": s.numel})
    ties = [[f"model.layers.{b}.{n}" for n in group] for b in range(blocks)
            for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                          ("mlp.gate_proj", "mlp.up_proj"))]
    return shapes, ties, SensitivityTable({}, rows), options


def timed(fn, repeats: int = 3):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def budget_limits(spec: str, shapes) -> dict[float, int]:
    """Average bits -> byte limit for each of --budgets, all read (by parse_budget) before the first solver runs."""
    limits = {}
    for text in spec.split(","):
        try:
            limits[float(text)] = parse_budget(text, shapes).limit
        except (ValueError, BitallocError):  # not a number, or not average bits parse_budget takes
            raise BitallocError(f"--budgets: '{text.strip()}' is not average bits in (0, 32]") from None
    return limits


@cli_entry
def main(argv=None) -> int:
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--tie", choices=("none", "fused"), default="fused",
                        help="fused: q/k/v and gate/up each take one option; none: every layer its own")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic table")
    parser.add_argument("--budgets", default="2.5,3,3.5,4,4.5,5,6", help="average bits per weight")
    args = parser.parse_args(argv)
    shapes, ties, table, options = synthetic_table(args.seed)
    limits = budget_limits(args.budgets, shapes)
    problem = build_problem(table, shapes, options, ties if args.tie == "fused" else None)
    print(f"table: {len(shapes)} layers x {len(options)} options, {len(problem.units)} units (tie: {args.tie})")
    solvers = {**{name: SOLVERS[name] for name in TABLE_SOLVERS},
               "ilp (milp)": lambda p: solve_ilp(p, method="milp")}
    header = f"{'bits':>5} " + " ".join(f"{name:>18}" for name in solvers)
    print("loss / ILP loss and median seconds of 3 runs per solver\n" + header)
    worst_ilp = worst_milp = 0.0
    for bits, limit in limits.items():
        problem.limits = {"bytes": limit}
        results = {name: timed(lambda fn=fn: fn(problem)) for name, fn in solvers.items()}
        best = problem.total("objective", results["ilp"][0][0])
        worst_ilp = max(worst_ilp, results["ilp"][1])
        worst_milp = max(worst_milp, results["ilp (milp)"][1])
        cells = []
        for name in solvers:
            (choice, _), seconds = results[name]
            assert problem.feasible(choice), name
            cells.append(f"{problem.total('objective', choice) / best:8.4f} {seconds:7.3f}s")
        print(f"{bits:5.2f} " + " ".join(f"{c:>18}" for c in cells))
    print(f"ILP: slowest budget {worst_ilp:.3f} s (reduced-cost fixing + exact DP); "
          f"branching with HiGHS instead: {worst_milp:.3f} s (median of 3 runs each)")
    problem.limits = {}
    for method in ("exact", "ilp"):
        front, seconds = timed(lambda method=method: pareto_front(problem, method, 50), repeats=1)
        extra = f", {front['plans_on_front']} plans on the whole front" if "plans_on_front" in front else ""
        print(f"Pareto front, 50 budgets, {method}: {seconds:.2f} s, {len(front['points'])} distinct plans{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
