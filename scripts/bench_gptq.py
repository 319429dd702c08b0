"""Time GPTQ W4 of every decoder linear of a model with 128 x 512 calibration tokens (true sequential).

    python scripts/bench_gptq.py --data-dir ../shared/data

Prints the wall time of bitalloc.quantize_model split into its parts: capturing
block 0's inputs, collecting each layer group's inputs, GPTQ itself, and the
block forward passes that feed the next block; and checks it against --target-minutes.
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict

import torch

from bitalloc import quantize_model as qm
from bitalloc.cli_args import add_data_args, add_model_args, calibration, check_positive
from bitalloc.errors import cli_entry
from bitalloc.help_format import script_parser
from bitalloc.models import linear_layers, load_model
from bitalloc.quant import parse


# the stages of quantize_model timed apart (functions it calls by these names)
TIMED = ("capture_inputs", "collect_group", "quantize", "advance_through", "execution_groups")


def timed(name: str, fn, totals: dict):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start
    return wrapper


@cli_entry
def main(argv=None) -> int:
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--option", default="gptq:int4:g64:asym", help="the option every linear gets")
    parser.add_argument("--target-minutes", type=float, default=10.0, help="the time the run must stay within")
    add_model_args(parser)
    add_data_args(parser, evaluation=False)
    parser.set_defaults(nsamples=128, calib_seqlen=512)
    args = parser.parse_args(argv)
    check_positive(args)
    loaded = load_model(args.model)
    calib_ids = calibration(args, loaded)
    option = parse(args.option)
    assignment = {name: option for name in linear_layers(loaded.model)}
    totals: dict[str, float] = defaultdict(float)
    for name in TIMED:
        setattr(qm, name, timed(name, getattr(qm, name), totals))
    start = time.perf_counter()
    qm.quantize_model(loaded, assignment, calib_ids, batch_size=args.batch_size, progress=True)
    total = time.perf_counter() - start
    tokens = calib_ids.numel()
    print(f"{args.option} on {len(assignment)} linears of {args.model}, {calib_ids.shape[0]} x {calib_ids.shape[1]} "
          f"= {tokens} calibration tokens, {torch.get_num_threads()} threads")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<18} {seconds:8.1f} s")
    verdict = "within" if total <= 60 * args.target_minutes else "OVER"
    print(f"total {total:.1f} s = {total / 60:.2f} min ({verdict} the {args.target_minutes:g}-minute target)")
    return 0 if verdict == "within" else 1


if __name__ == "__main__":
    sys.exit(main())
