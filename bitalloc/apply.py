"""python -m bitalloc.apply --plan plan.json: quantize a model as a plan says, pack it, evaluate it, save it.

The plan is validated before the model is loaded; layers, tie groups, budget and
model fingerprint are checked against the model before any work.  Evaluation
defaults to the protocol the plan's search used, so the PPL printed here
reproduces the one search printed.  `--backend` picks the kernels (`auto`: the
fastest exact one per layer for the device); `--save DIR` writes the packed
model (`bitalloc.load(DIR)` reloads it).  The report gives the model's real
bytes and the peak memory of the run.

examples:
  python -m bitalloc.apply --plan runs/mine/plan.json                    # the search's protocol again
  python -m bitalloc.apply --plan plan.json --backend auto --save packed/ --eval wikitext2,ptb --eval-windows 0
"""
from __future__ import annotations

import argparse
import collections
import logging
import resource
import sys

import torch

from . import atomic
from .cli_args import (add_data_args, add_model_args, calibration, check_positive, data_dir_for_plan, evaluator,
                       resolve_device)
from .cost import average_bits, layer_shapes
from .errors import cli_entry
from .help_format import HelpFormatter, from_docstring, program
from .kernels.backends import AUTO, BACKENDS, check_backend_name
from .kernels.quant_linear import QuantLinear
from .models import load_model
from .plan import Plan, budget_kinds
from .preflight import check_fits
from .quantize_model import needs_calibration, quantize_model, stored_bytes
from .summary import extra_kinds, header, protocol_text, render, result_row

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program("python -m bitalloc.apply"), formatter_class=HelpFormatter, **from_docstring(__doc__),
    )
    parser.add_argument("--plan", required=True, help="plan.json written by search")
    parser.add_argument("--backend", default="reference",
                        help=f"GEMM backend: {AUTO} (fastest exact kernel per layer) or one of "
                             f"{', '.join(sorted(BACKENDS))}; layers a backend cannot compute run on reference")
    parser.add_argument("--save", default=None, metavar="DIR",
                        help="save the packed model here (safetensors + config; reload with bitalloc.load(DIR))")
    parser.add_argument("--no-eval", action="store_true", help="quantize and report sizes only")
    parser.add_argument("--json", default=None, help="write the measured results to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_args(parser, default_model=None)
    add_data_args(parser, seqlen=None, windows=None, from_plan=True)
    return parser


def protocol_defaults(args, plan: Plan) -> None:
    """Fill unset evaluation/calibration options from what the plan's search used."""
    ev, cal = plan.evaluation or {}, plan.calibration or {}
    if args.seqlen is None:
        args.seqlen = int(ev.get("seqlen", 2048))
    if args.eval_windows is None:
        args.eval_windows = int(ev["windows"]) if ev.get("subset") else 0
    if args.eval == "wikitext2" and ev.get("corpus"):
        args.eval = ev["corpus"]
    for key, attr in (("source", "calib"), ("nsamples", "nsamples"), ("seqlen", "calib_seqlen"), ("seed", "seed")):
        if key in cal and getattr(args, attr) == build_parser().get_default(attr):
            setattr(args, attr, type(getattr(args, attr))(cal[key]))
    args.data_dir = data_dir_for_plan(args.data_dir, cal)


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    plan = Plan.load(args.plan)
    check_backend_name(args.backend)
    if args.save:  # before any work: the save replaces the directory whole
        from .saving import check_target

        check_target(args.save)
    protocol_defaults(args, plan)
    check_positive(args)
    device = resolve_device(args.device)
    check_fits(args.model or plan.model, device)
    loaded = load_model(args.model or plan.model)
    shapes = layer_shapes(loaded.model)
    assignment = plan.check_against(shapes, loaded.fingerprint)
    progress = not args.quiet
    evaluation = None if args.no_eval else evaluator(args, loaded, device, progress)
    calib = calibration(args, loaded) if needs_calibration(assignment) else None
    loaded.model.to(device)
    base = evaluation.unquantized() if evaluation else None
    quantize_model(loaded, assignment, calib, args.backend, device, args.batch_size, progress)
    measured = evaluation("eval quantized") if evaluation else None
    real_bytes = stored_bytes(loaded.model)
    bits = average_bits(shapes, assignment)
    rows = []
    weighting = plan.predicted.get("weighting", "sum")
    extras = extra_kinds(budget_kinds(plan.budget), weighting)
    if base:  # as search shows it
        rows.append(result_row("unquantized", None, 16.0, 0.0, base, base["ppl"], extras, {"objective": 0.0}))
    rows.append(result_row(f"plan {args.plan}", real_bytes, bits, plan.predicted.get("loss"), measured,
                           base["ppl"] if base else None, extras, plan.predicted))
    if evaluation:
        print(f"{loaded.spec}: {protocol_text(evaluation.protocol)}")
    print(render(rows, header(measured, extras, weighting)))
    print(f"stored bytes of the quantized linears: {real_bytes} (plan predicted {plan.predicted.get('bytes', '-')})")
    memory = memory_report(loaded.model, device)
    print("model tensors: {model_bytes} bytes; peak process memory {peak_rss_bytes} bytes".format(**memory)
          + (f"; peak CUDA memory {memory['peak_cuda_bytes']} bytes" if "peak_cuda_bytes" in memory else ""))
    kernels = kernel_counts(loaded.model)
    print("kernels: " + ", ".join(f"{count} x {name}" for name, count in kernels.items()))
    saved = None
    if args.save:
        from .saving import save

        saved = save(loaded, args.save, plan=args.plan)["bytes"]
        print(f"saved to {args.save}: {saved['total']} tensor bytes ({saved['linears']} in the packed layers)")
    if args.json:
        atomic.write_json(args.json, {
            "plan": args.plan, "model": loaded.spec, "fingerprint": loaded.fingerprint, "backend": args.backend,
            "bytes": real_bytes, "avg_bits": bits, "unquantized": base, "quantized": measured,
            "evaluation": evaluation.protocol if evaluation else None, "memory": memory, "kernels": kernels,
            "saved": saved,
        })
    return 0


def memory_report(model, device) -> dict:
    """Real bytes of the model's tensors (parameters and stored buffers) and the run's peak memory."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    report = {"model_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        report["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return report


def kernel_counts(model) -> dict[str, int]:
    """How many layers each kernel computes (a backend's fallbacks to reference are listed apart)."""
    counts = collections.Counter(m.kernel or m.backend for m in model.modules() if isinstance(m, QuantLinear))
    return dict(sorted(counts.items()))


if __name__ == "__main__":
    sys.exit(main())
