"""python flops/cal_flops.py: parameters, MACs/FLOPs (fvcore) and bytes, per block and in total.

MACs are multiply-accumulates as fvcore counts them (attention matmuls
included); FLOPs = 2 x MACs.  With --plan, the plan's bytes and average bits
are shown next to the unquantized (float16) model's.
"""
from __future__ import annotations

import argparse
import sys
import time

from . import atomic
from .cost import average_bits, assignment_bytes, block_macs, layer_shapes, other_bytes, parameter_count
from .errors import BitallocError, cli_entry
from .models import find_blocks, load_model
from .plan import Plan
from .summary import render


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python flops/cal_flops.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model spec (see bitalloc.models)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per forward pass")
    parser.add_argument("--plan", default=None, help="plan.json whose bytes and bits to report")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    return parser


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.seqlen < 1 or args.batch < 1:
        raise BitallocError("--seqlen and --batch must be at least 1")
    plan = Plan.load(args.plan) if args.plan else None
    started = time.time()
    loaded = load_model(args.model)
    model = loaded.model
    prefix, blocks = find_blocks(model)
    per_block, total = block_macs(model, args.batch, args.seqlen)
    params = [sum(p.numel() for p in block.parameters()) for block in blocks]
    rows = [[f"{prefix}.{i}", f"{params[i] / 1e6:.3f}", f"{per_block[i] / 1e9:.3f}", f"{2 * per_block[i] / 1e9:.3f}"]
            for i in range(len(blocks))]
    rows.append(["total (whole forward)", f"{parameter_count(model) / 1e6:.3f}", f"{total / 1e9:.3f}",
                 f"{2 * total / 1e9:.3f}"])
    print(f"{loaded.spec}: batch {args.batch} x seqlen {args.seqlen} tokens (prefill)\n")
    print(render(rows, header=("module", "params (M)", "GMACs", "GFLOPs (2xMACs)")))
    shapes = layer_shapes(model)
    fp16 = {s.name: Plan(loaded.spec, {}).option(s.name) for s in shapes}
    report = {"model": loaded.spec, "batch": args.batch, "seqlen": args.seqlen, "params": parameter_count(model),
              "macs": total, "flops": 2 * total, "block_macs": per_block, "block_params": params,
              "linear_bytes_fp16": assignment_bytes(shapes, fp16), "other_bytes_fp16": other_bytes(model)}
    print(f"\ndecoder linears in float16: {report['linear_bytes_fp16'] / 1e6:.3f} MB; "
          f"embeddings, norms and head: {report['other_bytes_fp16'] / 1e6:.3f} MB")
    if plan is not None:
        assignment = plan.check_against(shapes, loaded.fingerprint)
        report["plan_bytes"] = assignment_bytes(shapes, assignment)
        report["plan_avg_bits"] = average_bits(shapes, assignment)
        print(f"plan {args.plan}: decoder linears {report['plan_bytes'] / 1e6:.3f} MB, "
              f"{report['plan_avg_bits']:.3f} bits per weight")
    if args.json:
        atomic.write_json(args.json, report)
    print(f"[{time.time() - started:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
