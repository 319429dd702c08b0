"""Batch evaluation over models x plans: perplexity/KL/top-1 and lm-eval tasks into results/*.txt.

Each model is loaded once; its unquantized reference is computed once; each
plan is applied (the same quantizers and packed layers as `bitalloc.apply`),
measured, and undone before the next.  A plan is `fp16` (the unquantized
model), an option applied to every layer (`rtn:int4:g64:asym`), or a plan.json
file (with several --models, skipped with one line on models it was not made for; one made for
none of them stops the run).
Every plan is read and checked before any model is loaded, and against each
model before anything is evaluated on it.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import sys
from pathlib import Path

from . import results as res
from .cli_args import (add_data_args, add_model_args, calibration, check_above_zero, check_non_negative, check_positive,
                       evaluator, resolve_device)
from .cost import assignment_bytes, average_bits, layer_shapes
from .errors import BitallocError, cli_entry
from .harness import run_tasks
from .help_format import HelpFormatter, from_docstring, program
from .models import fingerprint_path, load_model, locate
from .plan import Plan
from .quant import check_option, parse
from .quant.option import Option
from .quantize_model import needs_calibration, quantize_model, restore

log = logging.getLogger(__name__)

FP = "fp16"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program("python scripts/batch_eval.py"), formatter_class=HelpFormatter,
                                     **from_docstring(__doc__))
    parser.add_argument("--models", nargs="+", default=None, help="several model specs (default: --model)")
    parser.add_argument("--plans", nargs="+", default=[FP, "rtn:int4:g64:asym"],
                        help="fp16, an option applied uniformly, or plan.json files")
    parser.add_argument("--results", default="results", help="directory of ppl_results.txt and lm_eval_results.txt")
    parser.add_argument("--no-ppl", action="store_true", help="skip perplexity / KL (lm-eval tasks only)")
    parser.add_argument("--tasks", default="", help="lm-eval task names, comma-separated (e.g. arc_easy,piqa)")
    parser.add_argument("--task-file", action="append", default=[],
                        help="a local task: multiple-choice JSONL or an lm-eval YAML config (repeatable)")
    parser.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per lm-eval question")
    parser.add_argument("--limit", type=float, default=None, help="lm-eval: at most N questions per task (or a fraction)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_args(parser)
    add_data_args(parser, seqlen=None, windows=0)
    return parser


def read_plan(spec: str) -> Plan | Option | None:
    """A --plans entry checked as far as it can be without a model: None for fp16."""
    if spec == FP:
        return None
    if spec.endswith(".json") or Path(spec).is_file():
        return Plan.load(spec)  # its errors name the file
    if ":" not in spec:
        raise BitallocError(f"plan '{spec}' is not fp16, an option (e.g. rtn:int4:g64:asym) or a plan file")
    option = parse(spec)
    check_option(option)
    return option


def made_for(plan: Plan, spec: str, fingerprint: str) -> bool:
    """The weights a plan records, or without a fingerprint the model it names."""
    if plan.fingerprint:
        return plan.fingerprint == fingerprint
    return plan.model == spec


def check_each_plan_fits_a_model(plans: dict, models: list[str]) -> None:
    """With several models, a plan made for none of them stops the run before any model is loaded.
    Local weights are fingerprinted from their files; a hub model is known only once loaded, so then
    each plan is checked model by model instead."""
    sources = [locate(spec) for spec in models]
    if any(source.path is None for source in sources):
        return
    known = [(source.spec, fingerprint_path(source.path)) for source in sources]
    for spec, plan in plans.items():
        if isinstance(plan, Plan) and not any(made_for(plan, *model) for model in known):
            raise BitallocError(f"plan {spec} was made for {plan.model}, which is none of --models")


def resolve_plans(plans: dict, loaded, shapes, several: bool) -> dict[str, tuple[dict | None, Plan | None]]:
    """spec -> (assignment, plan), None assignment for fp16; a plan that does not fit stops the run before
    evaluation, unless it was made for another of `several` models."""
    resolved = {}
    for spec, plan in plans.items():
        if isinstance(plan, Plan):
            if several and not made_for(plan, loaded.spec, loaded.fingerprint):
                log.warning("skipping plan %s on %s: it was made for %s", spec, loaded.spec, plan.model)
                continue
            try:
                resolved[spec] = plan.check_against(shapes, loaded.fingerprint), plan
            except BitallocError as err:
                raise BitallocError(f"plan {spec} on {loaded.spec}: {err}") from None
        else:
            resolved[spec] = (None if plan is None else {s.name: plan for s in shapes}), None
    return resolved


def evaluate_model(args, model_spec: str, plans: dict, several: bool, date: str) -> tuple[list[dict], list[dict]]:
    device = resolve_device(args.device)
    progress = not args.quiet
    loaded = load_model(model_spec)
    shapes = layer_shapes(loaded.model)
    resolved = resolve_plans(plans, loaded, shapes, several)
    quantized = any(assignment is not None for assignment, _ in resolved.values())
    evaluation = None if args.no_ppl else evaluator(args, loaded, device, progress, keep_reference=quantized)
    loaded.model.to(device)
    base = evaluation.unquantized() if evaluation else None
    ppl, lm = [], []
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for spec, (assignment, plan) in resolved.items():
        bits = 16.0 if assignment is None else average_bits(shapes, assignment)
        size = sum(s.numel for s in shapes) * 2 if assignment is None else assignment_bytes(shapes, assignment)
        originals = {}
        if assignment is not None:
            calib = calibration(_calibration_args(args, plan), loaded) if needs_calibration(assignment) else None
            originals = quantize_model(loaded, assignment, calib, "reference", device, args.batch_size, progress)
        try:
            if evaluation:
                measured = base if assignment is None else evaluation(f"eval {spec}")
                ppl += res.ppl_rows(model_spec, spec, bits, size, evaluation.protocol, measured, date)
                log.info("%s %s: PPL %.3f", model_spec, spec, measured["ppl"])
            if tasks or args.task_file:
                harness = run_tasks(loaded, tasks, args.task_file, args.num_fewshot, _limit(args.limit),
                                    args.batch_size, device, args.seed, progress=not args.quiet)
                lm += res.lm_eval_rows(model_spec, spec, bits, harness, args.num_fewshot, _limit(args.limit), date)
        finally:
            restore(loaded.model, originals)
    return ppl, lm


def _calibration_args(args, plan: Plan | None) -> argparse.Namespace:
    """The plan's own calibration settings where it records them, else the command line's."""
    cal = plan.calibration if plan is not None else {}
    return argparse.Namespace(**{**vars(args), "calib": cal.get("source", args.calib),
                                 "nsamples": cal.get("nsamples", args.nsamples),
                                 "calib_seqlen": cal.get("seqlen", args.calib_seqlen), "seed": cal.get("seed", args.seed)})


def _limit(value: float | None):
    return int(value) if value is not None and value >= 1 else value


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_positive(args)
    check_non_negative(args, "eval_windows", "num_fewshot")
    check_above_zero(args, "limit")
    if args.no_ppl and not (args.tasks or args.task_file):
        raise BitallocError("--no-ppl leaves nothing to do: name lm-eval --tasks or a --task-file")
    plans = {spec: read_plan(spec) for spec in args.plans}
    models = args.models or [args.model]
    if len(models) > 1:
        check_each_plan_fits_a_model(plans, models)
    out = Path(args.results)
    date = datetime.date.today().isoformat()
    seqlen = args.seqlen
    for model_spec in models:
        args.seqlen = seqlen  # None: each model's own context, at most 2048
        ppl, lm = evaluate_model(args, model_spec, plans, len(models) > 1, date)
        if ppl:
            res.merge_rows(out / res.PPL_FILE, res.PPL_FIELDS, res.PPL_KEY, ppl)
        if lm:
            res.merge_rows(out / res.LM_EVAL_FILE, res.LM_FIELDS, res.LM_KEY, lm)
    print(res.summarize(out))
    print("\nresults: " + ", ".join(str(out / f) for f in (res.PPL_FILE, res.LM_EVAL_FILE) if (out / f).is_file()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
