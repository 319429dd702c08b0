"""bash search.sh: profile -> solve -> plan.json -> apply -> evaluate, in one run directory.

Prints one table: the unquantized model, uniform RTN at the budget's bytes and
the searched mixed plan, with predicted loss and measured PPL / KL / top-1.
The run directory holds plan.json, the sensitivity table (JSON + CSV),
results.json, summary.txt, PNG figures and TensorBoard events.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

from . import atomic, tb
from .blocks import capture_inputs, run_block
from .budget import parse_budget
from .cli_args import (add_data_args, add_model_args, calibration, calibration_record, check_positive, evaluator,
                       resolve_device)
from .cost import bits_per_weight, layer_shapes
from .errors import BitallocError, cli_entry
from .models import find_blocks, load_model, tie_groups
from .paths import cache_root
from .plan import Plan
from .metrics import DEFAULT_METRIC, METRICS
from .profile import profile
from .quant import check_option, parse
from .quant.option import Option
from .quantize_model import quantize_model, restore
from .solve import SOLVERS, build_problem, get_solver
from .summary import render, result_row

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bash search.sh", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--budget", default="rtn:int4:g64:asym",
                        help="average bits (4.5), bytes (60MB) or an option whose uniform size is the budget")
    parser.add_argument("--space", default="rtn-g64",
                        help="option space: a preset name in --space-dir, a file (one option per line) "
                             "or a comma-separated list of options")
    parser.add_argument("--space-dir", default="search/spaces", help="where preset option spaces live")
    parser.add_argument("--method", default=None,
                        help="replace the quantization method of every option in the space (e.g. gptq)")
    parser.add_argument("--solver", default="ilp", help=f"allocation solver ({', '.join(sorted(SOLVERS))})")
    parser.add_argument("--tie", choices=("none", "fused"), default="none",
                        help="fused: layers reading the same input (q/k/v, gate/up) share one option")
    parser.add_argument("--out", default=None, help="run directory (default runs/<model>-<budget>)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, choices=sorted(METRICS),
                        help="sensitivity metric the solver minimises (see python -m bitalloc.profile --help)")
    parser.add_argument("--force", action="store_true", help="re-measure sensitivities even if cached")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_args(parser)
    add_data_args(parser, seqlen=512, windows=32)
    return parser


def load_space(spec: str, space_dir: str, method: str | None) -> list[Option]:
    path = Path(spec) if Path(spec).is_file() else Path(space_dir) / f"{spec}.txt"
    if path.is_file():
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        texts = [line for line in lines if line]
    elif ":" in spec or spec == "fp16":
        texts = [t.strip() for t in spec.split(",") if t.strip()]
    else:
        raise BitallocError(f"option space '{spec}' not found (no file {path}, and not a list of options)")
    options = []
    for text in texts:
        option = parse(text)
        if method and option.quantized:
            option = Option(method, option.fmt, option.bits, option.group_size, option.sym, option.act_bits,
                            option.params)
        check_option(option)
        if option not in options:
            options.append(option)
    if not any(o.quantized for o in options):
        raise BitallocError(f"option space '{spec}' has no quantized option")
    return options


def detect_ties(loaded, calib_ids) -> list[list[str]]:
    """Tie groups found on block 0 (one short sample), named for every block."""
    prefix, blocks = find_blocks(loaded.model)
    batch = capture_inputs(loaded.model, calib_ids[:1, :16], 1)[0]
    local = [g for g in tie_groups(blocks[0], lambda: run_block(blocks[0], batch)) if len(g) > 1]
    return [[f"{prefix}.{i}.{name}" for name in group] for i in range(len(blocks)) for group in local]


def default_out(args) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(args.model).stem}-{args.budget}").strip("_")
    return Path("runs") / slug


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_positive(args)
    started = time.time()
    device = resolve_device(args.device)
    options = load_space(args.space, args.space_dir, args.method)
    solver = get_solver(args.solver)
    loaded = load_model(args.model)
    shapes = layer_shapes(loaded.model)
    by_name = {s.name: s for s in shapes}
    budget = parse_budget(args.budget, shapes)
    smallest = sum(min(bits_per_weight(s, o) * s.numel / 8 for o in options) for s in shapes)
    if budget.limit < smallest:
        raise BitallocError(
            f"budget {args.budget} ({budget.limit:.0f} bytes) is below the smallest plan the option space allows "
            f"({smallest:.0f} bytes, {8 * smallest / sum(s.numel for s in shapes):.3f} bits per weight)"
        )
    run_dir = Path(args.out) if args.out else default_out(args)
    progress = not args.quiet
    evaluation = evaluator(args, loaded, device, progress)
    calib = calibration(args, loaded)
    ties = detect_ties(loaded, calib) if args.tie == "fused" else []

    table = profile(loaded, calib, options, cache_root(args.cache_dir) / "profile", args.batch_size, device,
                    args.force, progress, metrics=[args.metric])
    table.save(run_dir / "sensitivity.json")

    problem = build_problem(table, shapes, options, ties)
    problem.limits = {"bytes": budget.limit}
    choice, report = solver(problem)
    mixed = problem.assignment(choice)
    plan = Plan(
        model=loaded.spec, fingerprint=loaded.fingerprint, layers={k: str(v) for k, v in mixed.items()},
        tie_groups=ties, budget=budget.to_json(), solver=report, calibration=calibration_record(args),
        evaluation=evaluation.protocol,
        predicted={"bytes": int(problem.total("bytes", choice)), "loss": problem.total("loss", choice),
                   "avg_bits": 8 * problem.total("bytes", choice) / sum(s.numel for s in shapes)},
    )
    plan.save(run_dir / "plan.json")

    uniform_option = budget.uniform or max(
        (o for o in options if o.quantized and problem.total("bytes", [options.index(o)] * len(problem.units))
         <= budget.limit),
        key=lambda o: problem.total("bytes", [options.index(o)] * len(problem.units)), default=None,
    )
    variants = {}
    if uniform_option is not None and uniform_option in options:
        variants[f"uniform {uniform_option}"] = {s.name: uniform_option for s in shapes}
    variants[f"mixed ({args.solver})"] = mixed

    loaded.model.to(device)
    base = evaluation.unquantized()
    results = {"unquantized": {"measured": base}}
    rows = [result_row("unquantized", None, 16.0, 0.0, base, base["ppl"])]
    for name, assignment in variants.items():
        originals = quantize_model(loaded, assignment, calib, "reference", device, args.batch_size, progress)
        measured = evaluation(f"eval {name}")
        restore(loaded.model, originals)
        picked = problem.choice_of(assignment)
        entry = {"bytes": int(problem.total("bytes", picked)), "predicted_loss": problem.total("loss", picked),
                 "avg_bits": 8 * problem.total("bytes", picked) / sum(s.numel for s in shapes), "measured": measured}
        results[name] = entry
        rows.append(result_row(name, entry["bytes"], entry["avg_bits"], entry["predicted_loss"], measured,
                               base["ppl"]))

    plan.measured = results[f"mixed ({args.solver})"]["measured"]
    plan.save(run_dir / "plan.json")
    text = render(rows)
    elapsed = time.time() - started
    atomic.write_json(run_dir / "results.json", {
        "model": loaded.spec, "fingerprint": loaded.fingerprint, "budget": budget.to_json(),
        "options": [str(o) for o in options], "solver": report, "evaluation": evaluation.protocol,
        "variants": results, "seconds": round(elapsed, 1),
    })
    atomic.write_text(run_dir / "summary.txt", text + "\n")
    tb.write_run(run_dir, table, variants, lambda layer, o: bits_per_weight(by_name[layer], o),
                 {f"ppl/{k}": v["measured"]["ppl"] for k, v in results.items()})
    print(f"\n{loaded.spec}: budget {args.budget} = {budget.limit / 1e6:.3f} MB of quantized linears; "
          f"{evaluation.protocol['corpus']} PPL on {evaluation.protocol['windows']} windows of "
          f"{evaluation.protocol['seqlen']} tokens\n")
    print(text)
    print(f"\nrun directory: {run_dir}  (plan.json, sensitivity.json/.csv, results.json, figures; "
          f"tensorboard --logdir {run_dir})  [{elapsed / 60:.1f} min]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
