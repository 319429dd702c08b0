"""bash search.sh: profile -> solve -> plan.json -> apply -> evaluate, in one run directory.

Prints one table: the unquantized model, the chosen solver's plan and every
plan it is compared with (uniform, the llama.cpp-style rule mix, greedy,
annealing, the ILP...), each with predicted loss and measured PPL / KL / top-1.
The run directory holds plan.json, the sensitivity table (JSON + CSV), the
predicted Pareto front (pareto.json + PNG), results.json, summary.txt, a short
report.md (predicted vs measured), PNG figures and TensorBoard events; with
--solver optuna also the Optuna study (optuna.db unless --storage says otherwise).

examples:
  bash search.sh                                  # SmolLM2-135M at the bytes of uniform RTN int4 g64
  bash search.sh --budget 3.5 --compare all       # 3.5 bits per weight, every baseline beside the ILP
  bash search.sh --budget 40MB --space gptq-g64   # GPTQ options (search/spaces/), 40 MB of linears
  bash search.sh --solver optuna --n-trials 60    # the ILP plan refined by measured KL
  bash search.sh --model path/to/hf_dir --out runs/mine --eval-windows 0   # another model, full test set
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
from .budget import (add_budget_args, budgets_from_args, combined_cost_fns, combined_json, combined_limits,
                     latency_from_args)
from .cli_args import (add_data_args, add_model_args, calibration, calibration_record, check_above_zero,
                       check_non_negative, check_positive, corpora_location, evaluator, resolve_device)
from .cost import bits_of_bytes, bits_per_weight, layer_shapes
from .data import calibration_ids
from .errors import BitallocError, cli_entry
from .help_format import HelpFormatter, from_docstring, program
from .models import find_blocks, load_model, tie_groups
from .paths import PRESET_SPACES, cache_root
from .metrics import DEFAULT_METRIC, METRICS
from .plan import Plan
from .preflight import check_fits
from .profile import profile
from .quant import check_option, parse
from .quant.option import Option
from .quantize_model import quantize_model, restore
from .solve import SOLVERS, TABLE_SOLVERS, WEIGHTINGS, build_problem, get_solver, pareto_front
from .solve.optuna_search import SAMPLERS, open_storage, search_space, storage_url, warm_starts
from .solve.pareto import FRONTS
from .summary import extra_kinds, header, protocol_text, render, result_row

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program("bash search.sh"), formatter_class=HelpFormatter, **from_docstring(__doc__),
    )
    add_budget_args(parser)
    parser.add_argument("--space", default="rtn-g64",
                        help="option space: a preset name in --space-dir, a file (one option per line) "
                             "or a comma-separated list of options")
    parser.add_argument("--space-dir", default=str(PRESET_SPACES), help="where preset option spaces live")
    parser.add_argument("--method", default=None,
                        help="replace the quantization method of every option in the space (e.g. gptq)")
    parser.add_argument("--solver", default="ilp", help=f"allocation solver ({', '.join(sorted(SOLVERS))})")
    parser.add_argument("--compare", default="uniform",
                        help="other solvers whose plans are evaluated beside it, comma-separated, 'all' "
                             f"({', '.join(TABLE_SOLVERS)}) or 'none'")
    parser.add_argument("--weighting", default="sum", choices=sorted(WEIGHTINGS),
                        help="how table errors enter the objective: sum (as measured), params (times the "
                             "layer's share of weights), sqrt (relative RMS)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="ILP time limit in seconds")
    parser.add_argument("--front", default="exact", choices=sorted(FRONTS),
                        help="Pareto front method: exact (Pareto DP, one budget kind) or ilp (sweep)")
    parser.add_argument("--front-points", type=int, default=50, help="budgets sampled on the Pareto front")
    parser.add_argument("--tie", choices=("none", "fused"), default="none",
                        help="fused: layers reading the same input (q/k/v, gate/up) share one option")
    parser.add_argument("--out", default=None, help="run directory (default runs/<model>-<budget>)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, choices=sorted(METRICS),
                        help="sensitivity metric the solver minimises (see python -m bitalloc.profile --help)")
    parser.add_argument("--force", action="store_true", help="re-measure sensitivities even if cached")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    group = parser.add_argument_group("optuna (--solver optuna): refine the ILP plan by measured KL")
    group.add_argument("--sampler", default="tpe", choices=SAMPLERS,
                       help="tpe (single objective, pruning) or nsga2 (loss and size, a measured front)")
    group.add_argument("--n-trials", type=int, default=60, help="trials this worker runs")
    group.add_argument("--timeout", type=float, default=None, help="stop this worker's trials after N seconds")
    group.add_argument("--storage", default=None,
                       help="Optuna storage: an RDB URL (postgresql://..., sqlite:///...) or a file path "
                            "(SQLite); default <run dir>/optuna.db. Workers given the same storage share the study")
    group.add_argument("--study", default=None, help="study name (default: derived from table, budget and space)")
    group.add_argument("--span", type=float, default=0.1,
                       help="search options used by predicted-front plans within this fraction of the budget")
    group.add_argument("--held-windows", type=int, default=8,
                       help="held calibration windows (another seed than profiling) each trial is measured on")
    group.add_argument("--held-seqlen", type=int, default=512, help="tokens per held window")
    group.add_argument("--no-refit", action="store_true",
                       help="do not enqueue plans of the ILP re-fitted to the measurements so far")
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
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(args.model).stem}-{'+'.join(args.budget)}").strip("_")
    return Path("runs") / slug


def compared_solvers(args) -> list[str]:
    spec = args.compare.strip()
    names = [] if spec == "none" else list(TABLE_SOLVERS) if spec == "all" else [s.strip() for s in spec.split(",")]
    for name in names:
        get_solver(name)
    if args.solver == "optuna" and "ilp" not in names:
        names.append("ilp")  # its warm start, measured beside it
    return [n for n in dict.fromkeys(names) if n not in (args.solver, "optuna")]


def variant_name(solver: str, problem, choice) -> str:
    if solver == "uniform":
        return f"uniform {problem.options[int(choice[0])]}"
    return f"mixed ({solver})"


def run_optuna(args, loaded, problem, device, progress: bool, run_dir: Path):
    """The Optuna refinement: a bank of pre-quantized layers, held windows, the study."""
    from .solve.measure import HeldKL, LayerBank, bank_measure

    starts = warm_starts(problem, args.span)
    space = search_space(problem, starts)
    wanted = {layer: [problem.options[o] for o in options] for unit, options in zip(problem.units, space)
              for layer in unit}
    held_ids = calibration_ids(loaded.tokenizer, args.calib, args.held_windows, args.held_seqlen, args.seed + 1,
                               args.data_dir)
    loaded.model.to(device)
    held = HeldKL(loaded, held_ids, cache_root(args.cache_dir), chunk=args.batch_size, batch_size=args.batch_size,
                  device=device)
    bank = LayerBank(loaded, wanted, calibration(args, loaded), args.batch_size, device, progress)
    try:
        return get_solver("optuna")(
            problem, bank_measure(problem, bank, held), starts, args.sampler, args.n_trials, args.timeout,
            args.storage or str(run_dir / "optuna.db"), args.study, args.seed, refit=not args.no_refit,
            progress=progress,
        )
    finally:
        bank.restore()


def write_report(path: Path, text: str, results: dict, reports: dict, front: dict) -> None:
    """report.md: the table, predicted vs measured, and what each solver reported."""
    from scipy.stats import spearmanr

    lines = ["# bitalloc search report", "", "```", text, "```", "", "## Predicted vs measured", "",
             "| variant | predicted loss | measured KL mean | measured PPL | dPPL / dPPL(uniform) |",
             "|---|---|---|---|---|"]
    quantized = {k: v for k, v in results.items() if "predicted_loss" in v}
    base = results["unquantized"]["measured"]["ppl"]
    uniform = next((v["measured"]["ppl"] - base for k, v in quantized.items() if k.startswith("uniform ")), None)
    for name, entry in quantized.items():
        ratio = "-" if not uniform else f"{(entry['measured']['ppl'] - base) / uniform:.3f}"
        lines.append(f"| {name} | {entry['predicted_loss']:.4g} | {entry['measured']['kl']['mean']:.4f} "
                     f"| {entry['measured']['ppl']:.3f} | {ratio} |")
    if len(quantized) >= 3:
        rho = spearmanr([v["predicted_loss"] for v in quantized.values()],
                        [v["measured"]["kl"]["mean"] for v in quantized.values()]).statistic
        lines += ["", f"Spearman rank correlation of predicted loss and measured KL over these plans: {rho:.3f}"]
    lines += ["", "## Solvers", ""]
    for name, report in reports.items():
        shown = {k: v for k, v in report.items() if k not in ("measured_trials", "status")}
        lines.append(f"- **{name}**: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in shown.items()))
    optuna = reports.get("optuna")
    if optuna:
        lines += ["", "## Optuna", "",
                  f"Held-window KL of the ILP plan (the first warm start): {optuna['start_measured']:.4f}; "
                  f"best trial #{optuna['best_trial']}: {optuna['best_measured']:.4f} "
                  f"(predicted {optuna['start_predicted']:.4g} -> {optuna['best_predicted']:.4g}); "
                  f"rank correlation of predicted and measured over {len(optuna['measured_trials'])} trials: "
                  f"{optuna['spearman_predicted_measured'] if optuna['spearman_predicted_measured'] is None else round(optuna['spearman_predicted_measured'], 3)}."]
    lines += ["", f"Pareto front: {len(front['points'])} plans by the {front['method']} method in "
                  f"{front['seconds']} s (pareto.json, pareto.png)."]
    atomic.write_text(path, "\n".join(lines) + "\n")


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.budget = args.budget or ["rtn:int4:g64:asym"]
    check_positive(args, "front_points", "latency_batch", "held_windows", "held_seqlen")
    check_non_negative(args, "eval_windows", "span", "n_trials")  # 0 trials: read a shared study's best
    check_above_zero(args, "time_limit", "timeout")
    started = time.time()
    device = resolve_device(args.device)
    options = load_space(args.space, args.space_dir, args.method)
    get_solver(args.solver)
    others = compared_solvers(args)
    latency = latency_from_args(args)
    kinds = {budget.kind for budget in budgets_from_args(args, [], latency)}  # the grammar, before any loading
    if len(kinds) > 1 and "pareto" in [args.solver, *others]:
        raise BitallocError(f"the pareto solver takes one budget, and this run has {len(kinds)} kinds "
                            f"({', '.join(sorted(kinds))}): leave it out of --solver/--compare, or give one budget")
    if args.solver == "optuna" and args.storage:  # a server that is down is found now, not after profiling
        open_storage(storage_url(args.storage)).engine.dispose()
    check_fits(args.model, device)
    loaded = load_model(args.model)
    shapes = layer_shapes(loaded.model)
    by_name = {s.name: s for s in shapes}
    budgets = budgets_from_args(args, shapes, latency)
    for budget in budgets:
        budget.check_reachable(shapes, options)
    limits = combined_limits(budgets)
    run_dir = Path(args.out) if args.out else default_out(args)
    progress = not args.quiet
    evaluation = evaluator(args, loaded, device, progress)
    calib = calibration(args, loaded)
    ties = detect_ties(loaded, calib) if args.tie == "fused" else []

    table = profile(loaded, calib, options, cache_root(args.cache_dir) / "profile", args.batch_size, device,
                    args.force, progress, metrics=[args.metric])
    table.save(run_dir / "sensitivity.json")
    problem = build_problem(table, shapes, options, ties, combined_cost_fns(budgets), args.weighting)
    problem.limits = limits
    front = pareto_front(problem, args.front if set(limits) == {"bytes"} else "ilp", args.front_points)

    choices, reports = {}, {}
    for name in others + [args.solver]:
        if name == "optuna":
            choices[name], reports[name] = run_optuna(args, loaded, problem, device, progress, run_dir)
        elif name == "ilp":
            choices[name], reports[name] = SOLVERS["ilp"](problem, args.time_limit)
        else:
            choices[name], reports[name] = SOLVERS[name](problem)
    choice = choices[args.solver]
    mixed = problem.assignment(choice)
    totals = problem.totals(choice)
    plan = Plan(
        model=loaded.spec, fingerprint=loaded.fingerprint, layers={k: str(v) for k, v in mixed.items()},
        tie_groups=ties, budget=combined_json(budgets),
        # wall time would make plans of identical runs differ
        solver={k: v for k, v in reports[args.solver].items() if k not in ("measured_trials", "seconds")},
        calibration={**calibration_record(args), **corpora_location(args)}, evaluation=evaluation.protocol,
        predicted={"bytes": int(totals["bytes"]) if "bytes" in totals else None, "loss": totals["loss"],
                   "objective": totals["objective"], "weighting": args.weighting,
                   "avg_bits": bits_of_bytes(problem.total("bytes", choice), shapes) if "bytes" in problem.costs
                   else None,
                   **{k: v for k, v in totals.items() if k not in ("bytes", "loss", "objective")}},
    )
    plan.save(run_dir / "plan.json")

    variants = {variant_name(name, problem, choices[name]): (name, choices[name]) for name in others + [args.solver]}
    loaded.model.to(device)
    base = evaluation.unquantized()
    results = {"unquantized": {"measured": base}}
    extras = extra_kinds(limits, args.weighting)
    rows = [result_row("unquantized", None, 16.0, 0.0, base, base["ppl"], extras, {"objective": 0.0})]
    seen: dict[tuple, dict] = {}  # the same plan from two solvers is evaluated once
    for name, (_, picked) in variants.items():
        key = tuple(int(o) for o in picked)
        if key not in seen:
            originals = quantize_model(loaded, problem.assignment(picked), calib, "reference", device,
                                       args.batch_size, progress)
            seen[key] = evaluation(f"eval {name}")
            restore(loaded.model, originals)
        measured = seen[key]
        size = problem.costs["bytes"][np.arange(len(picked)), picked].sum() if "bytes" in problem.costs else None
        entry = {"bytes": int(size) if size is not None else None, "predicted_loss": problem.total("loss", picked),
                 "avg_bits": bits_of_bytes(size, shapes) if size is not None else None, "measured": measured,
                 "solver": variants[name][0], **{k: problem.total(k, picked) for k in limits if k != "bytes"},
                 **({"objective": problem.total("objective", picked)} if "objective" in extras else {}),
                 "layers": {layer: str(option) for layer, option in problem.assignment(picked).items()}}
        results[name] = entry
        rows.append(result_row(name, entry["bytes"], entry["avg_bits"], entry["predicted_loss"], measured,
                               base["ppl"], extras, entry))

    main_name = variant_name(args.solver, problem, choice)
    plan.measured = results[main_name]["measured"]
    plan.save(run_dir / "plan.json")
    front["variants"] = {name: {"size": problem.total(problem.size_kind, c), "loss": problem.total("loss", c)}
                         for name, (_, c) in variants.items()}
    front["budget"] = limits.get(problem.size_kind)
    atomic.write_json(run_dir / "pareto.json", front)
    text = render(rows, header(base, extras, args.weighting))
    elapsed = time.time() - started
    atomic.write_json(run_dir / "results.json", {
        "model": loaded.spec, "fingerprint": loaded.fingerprint, "budget": plan.budget,
        "options": [str(o) for o in options], "solver": reports[args.solver], "solvers": reports,
        "evaluation": evaluation.protocol, "variants": results, "seconds": round(elapsed, 1),
    })
    atomic.write_text(run_dir / "summary.txt", text + "\n")
    write_report(run_dir / "report.md", text, results, reports, front)
    assignments = {name: problem.assignment(c) for name, (_, c) in variants.items()}
    tb.write_run(run_dir, table, assignments, lambda layer, o: bits_per_weight(by_name[layer], o),
                 {f"ppl/{k}": v["measured"]["ppl"] for k, v in results.items()}, front,
                 reports.get("optuna", {}).get("measured_trials"))
    print(f"\n{loaded.spec}: budget {'+'.join(args.budget)} = " + "; ".join(b.describe() for b in budgets) + "; "
          f"{protocol_text(evaluation.protocol)}\n")
    print(text)
    print(f"\nrun directory: {run_dir}  (plan.json, pareto.json, report.md, sensitivity.json/.csv, results.json, "
          f"figures; tensorboard --logdir {run_dir})  [{elapsed / 60:.1f} min]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
