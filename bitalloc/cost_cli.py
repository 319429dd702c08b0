"""python flops/cal_flops.py: parameters, MACs/FLOPs, bytes and bit operations, per block and in total.

MACs (multiply-accumulates) are counted by fvcore on the traced model: every
linear layer and attention's Q K^T and A V products; FLOPs = 2 x MACs.  The
analytic formula for the architecture is printed beside the count as a check.
--decode counts one new token per sequence attending to a KV cache of --seqlen
tokens.  Bytes are the exact storage of the packed model; with --plan, the
plan's bytes, average bits and BOPs (bits_w x bits_a x MACs) are shown next to
the unquantized (float16) model's.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import atomic
from .arch import architecture
from .cost import (Workload, analytic_macs, assignment_bops, average_bits, count_macs, kv_cache_bytes,
                   layer_shapes, model_bytes, parameter_count)
from .errors import BitallocError, cli_entry
from .help_format import HelpFormatter, from_docstring, program
from .models import find_blocks, load_model
from .plan import Plan
from .quant.option import FP16, parse
from .quant.registry import check_option
from .summary import render

UNQUANTIZED_BITS = 16 * 16  # bits_w x bits_a of a float16 product


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program("python flops/cal_flops.py"), formatter_class=HelpFormatter,
                                     **from_docstring(__doc__))
    parser.add_argument("--model", default="smollm2-135m", help="model spec (see bitalloc.models)")
    parser.add_argument("--seqlen", type=int, default=512,
                        help="tokens per sequence (with --decode: tokens already in the KV cache)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per forward pass")
    parser.add_argument("--decode", action="store_true", help="count one decoding step instead of a prefill")
    parser.add_argument("--plan", default=None, help="plan.json whose bytes, bits and BOPs to report")
    parser.add_argument("--embeddings", default="fp16", help="option the token embeddings are stored under")
    parser.add_argument("--head", default=None,
                        help="option the head is stored under (default: fp16, or the embeddings' option when tied)")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    return parser


def _option(text: str, what: str):
    try:
        option = parse(text)
        check_option(option)
    except BitallocError as err:
        raise BitallocError(f"--{what}: {err}") from None
    return option


def prefix_for(value: float) -> tuple[float, str]:
    """The SI prefix that shows `value` with one to three digits before the point."""
    return next(((factor, p) for factor, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")) if value >= factor),
                (1.0, ""))


def mac_table(count, params: list[int], total_params: int) -> str:
    factor, p = prefix_for(count.total)
    fmt = lambda v: f"{v / factor:.4f}"
    rows = [[name, f"{params[i] / 1e6:.3f}", fmt(count.block_linears[i]), fmt(count.block_attention[i]),
             fmt(count.blocks[i]), fmt(2 * count.blocks[i])] for i, name in enumerate(count.block_names)]
    rows.append(["outside the blocks (head)", "", fmt(count.outside_blocks), "", fmt(count.outside_blocks),
                 fmt(2 * count.outside_blocks)])
    rows.append(["total", f"{total_params / 1e6:.3f}", fmt(sum(count.block_linears) + count.outside_blocks),
                 fmt(sum(count.block_attention)), fmt(count.total), fmt(2 * count.total)])
    header = ("block", "params (M)", f"linear {p}MACs", f"attention {p}MACs", f"{p}MACs", f"{p}FLOPs")
    return render(rows, header=header)


def variant_figures(model, shapes, assignment, embeddings, head, count, kv_bytes: int | None) -> dict:
    """Bytes, bits and BOPs of one way of storing the model, for this workload."""
    sizes = model_bytes(model, assignment, embeddings, head)
    linear_macs = sum(count.block_linears)
    linear_bops = assignment_bops(shapes, assignment, count.workload.tokens)
    return {"bytes": sizes.to_json(), "avg_bits": average_bits(shapes, assignment), "bops_linears": linear_bops,
            "bops_total": linear_bops + (count.total - linear_macs) * UNQUANTIZED_BITS, "kv_cache_bytes": kv_bytes}


def cost_table(variants: dict[str, dict]) -> str:
    megabytes = lambda key: lambda v: f"{v['bytes'][key] / 1e6:.3f}"
    rows = [["decoder linears (MB)", megabytes("linears")], ["token embeddings (MB)", megabytes("embeddings")],
            ["head (MB)", lambda v: "tied" if v["bytes"]["head_tied"] else f"{v['bytes']['head'] / 1e6:.3f}"],
            ["norms and the rest, fp16 (MB)", megabytes("other")], ["model total (MB)", megabytes("total")],
            ["avg bits, decoder linears", lambda v: f"{v['avg_bits']:.3f}"]]
    for key, label in (("bops_linears", "decoder linears"), ("bops_total", "whole forward")):
        factor, p = prefix_for(max(v[key] for v in variants.values()))
        rows.append([f"{p}BOPs, {label}", lambda v, key=key, factor=factor: f"{v[key] / factor:.3f}"])
    if next(iter(variants.values()))["kv_cache_bytes"] is not None:
        rows.append(["KV cache, fp16 (MB)", lambda v: f"{v['kv_cache_bytes'] / 1e6:.3f}"])
    return render([[label, *(show(v) for v in variants.values())] for label, show in rows], header=("", *variants))


def macs_json(count, params: list[int], total_params: int) -> dict:
    return {"params": total_params, "block_params": params, "macs": count.total, "flops": 2 * count.total,
            "macs_by_operator": count.by_operator, "macs_outside_blocks": count.outside_blocks,
            "blocks": [{"name": name, "macs": count.blocks[i], "linear_macs": count.block_linears[i],
                        "attention_macs": count.block_attention[i], "by_operator": count.block_operators[i]}
                       for i, name in enumerate(count.block_names)]}


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    workload = Workload(args.batch, args.seqlen, args.decode)
    embeddings = _option(args.embeddings, "embeddings")
    head = _option(args.head, "head") if args.head else None
    plan = Plan.load(args.plan) if args.plan else None
    started = time.time()
    loaded = load_model(args.model)
    model = loaded.model
    shapes = layer_shapes(model)
    assignment = plan.check_against(shapes, loaded.fingerprint) if plan else None
    params = [sum(p.numel() for p in block.parameters()) for block in find_blocks(model)[1]]
    print("counting MACs: fvcore traces the model's forward (about a minute for SmolLM2 on 2 CPU cores)",
          file=sys.stderr, flush=True)
    count = count_macs(model, workload)
    report = {"model": loaded.spec, "workload": {"batch": args.batch, "seqlen": args.seqlen, "decode": args.decode,
                                                 "tokens": workload.tokens},
              **macs_json(count, params, parameter_count(model))}
    print(f"{loaded.spec}, {workload}.  MACs = multiply-accumulates (fvcore); FLOPs = 2 x MACs\n")
    print(mac_table(count, params, parameter_count(model)))
    factor, p = prefix_for(count.total)
    print("\nby operator: " + ", ".join(f"{op} {v / factor:.4f} {p}MACs" for op, v in sorted(count.by_operator.items())))
    kv_bytes = None  # unknown without the architecture's dimensions
    try:
        arch = architecture(model.config)
    except BitallocError as err:
        print(f"analytic formula: none ({err})")
    else:
        formula = analytic_macs(arch, workload)
        report["analytic_macs"] = formula["total"]
        print(f"analytic formula ({arch.model_type}): {formula['total'] / factor:.4f} {p}MACs; fvcore - formula = "
              f"{100 * (count.total - formula['total']) / formula['total']:+.3f} %")
        kv_bytes = kv_cache_bytes(arch, workload.keys, workload.batch, torch.float16)
    fp16 = {s.name: FP16 for s in shapes}
    variants = {"unquantized": variant_figures(model, shapes, fp16, FP16, None, count, kv_bytes)}
    labels = {"unquantized": "unquantized (fp16)"}
    if plan is not None or embeddings != FP16 or head not in (None, FP16):
        variants["plan"] = variant_figures(model, shapes, assignment or fp16, embeddings, head, count, kv_bytes)
        labels["plan"] = f"plan {Path(args.plan).name}" if plan else "fp16 linears + --embeddings/--head"
        report["plan"] = {"path": args.plan, "embeddings": str(embeddings),
                          "head": str(head) if head else None}
    report["variants"] = variants
    print(f"\nbytes and bit operations ({workload}; KV cache holding {workload.keys} tokens per sequence)\n")
    print(cost_table({labels[k]: v for k, v in variants.items()}))
    if args.json:
        atomic.write_json(args.json, report)
    print(f"\n[{time.time() - started:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
