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

import torch

from . import atomic
from .arch import architecture
from .cost import (Workload, analytic_macs, assignment_bops, average_bits, count_macs, kv_cache_bytes,
                   layer_shapes, model_bytes, parameter_count)
from .errors import BitallocError, cli_entry
from .models import find_blocks, load_model
from .plan import Plan
from .quant.option import FP16, parse
from .quant.registry import check_option
from .summary import render

UNQUANTIZED_BITS = 16 * 16  # bits_w x bits_a of a float16 product


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python flops/cal_flops.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model spec (see bitalloc.models)")
    parser.add_argument("--seqlen", type=int, default=512,
                        help="tokens per sequence (with --decode: tokens already in the KV cache)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per forward pass")
    parser.add_argument("--decode", action="store_true", help="count one decoding step instead of a prefill")
    parser.add_argument("--plan", default=None, help="plan.json whose bytes, bits and BOPs to report")
    parser.add_argument("--embeddings", default="fp16", help="option the token embeddings are stored under")
    parser.add_argument("--head", default="fp16", help="option an untied head is stored under")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    return parser


def _option(text: str, what: str):
    try:
        option = parse(text)
        check_option(option)
    except BitallocError as err:
        raise BitallocError(f"--{what}: {err}") from None
    return option


def mac_rows(count, params: list[int], total_params: int) -> list[list[str]]:
    giga = lambda v: f"{v / 1e9:.4f}"
    rows = [[name, f"{params[i] / 1e6:.3f}", giga(count.block_linears[i]), giga(count.block_attention[i]),
             giga(count.blocks[i]), giga(2 * count.blocks[i])] for i, name in enumerate(count.block_names)]
    rows.append(["outside the blocks (head...)", "", giga(count.outside_blocks), "", giga(count.outside_blocks),
                 giga(2 * count.outside_blocks)])
    rows.append(["total", f"{total_params / 1e6:.3f}", giga(sum(count.block_linears) + count.outside_blocks),
                 giga(sum(count.block_attention)), giga(count.total), giga(2 * count.total)])
    return rows


def variant_figures(model, shapes, assignment, embeddings, head, count, kv_bytes: int | None) -> dict:
    """Bytes, bits and BOPs of one way of storing the model, for this workload."""
    sizes = model_bytes(model, assignment, embeddings, head)
    linear_macs = sum(count.block_linears)
    linear_bops = assignment_bops(shapes, assignment, count.workload.tokens)
    return {"bytes": sizes.to_json(), "avg_bits": average_bits(shapes, assignment), "bops_linears": linear_bops,
            "bops_total": linear_bops + (count.total - linear_macs) * UNQUANTIZED_BITS, "kv_cache_bytes": kv_bytes}


def cost_rows(variants: dict[str, dict]) -> list[list[str]]:
    rows = [
        ("decoder linears (MB)", lambda v: v["bytes"]["linears"] / 1e6, ".3f"),
        ("token embeddings (MB)", lambda v: v["bytes"]["embeddings"] / 1e6, ".3f"),
        ("head, untied (MB)", lambda v: v["bytes"]["head"] / 1e6, ".3f"),
        ("norms and the rest, fp16 (MB)", lambda v: v["bytes"]["other"] / 1e6, ".3f"),
        ("model total (MB)", lambda v: v["bytes"]["total"] / 1e6, ".3f"),
        ("avg bits, decoder linears", lambda v: v["avg_bits"], ".3f"),
        ("GBOPs, decoder linears", lambda v: v["bops_linears"] / 1e9, ".2f"),
        ("GBOPs, whole forward", lambda v: v["bops_total"] / 1e9, ".2f"),
        ("KV cache, fp16 (MB)", lambda v: v["kv_cache_bytes"] / 1e6, ".3f"),
    ]
    kv_known = next(iter(variants.values()))["kv_cache_bytes"] is not None
    rows = rows if kv_known else rows[:-1]
    return [[label, *(format(get(v), spec) for v in variants.values())] for label, get, spec in rows]


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    workload = Workload(args.batch, args.seqlen, args.decode)
    embeddings, head = _option(args.embeddings, "embeddings"), _option(args.head, "head")
    plan = Plan.load(args.plan) if args.plan else None
    started = time.time()
    loaded = load_model(args.model)
    model = loaded.model
    shapes = layer_shapes(model)
    assignment = plan.check_against(shapes, loaded.fingerprint) if plan else None
    _, blocks = find_blocks(model)
    params = [sum(p.numel() for p in block.parameters()) for block in blocks]
    count = count_macs(model, workload)
    print(f"{loaded.spec}, {workload}.  MACs = multiply-accumulates (fvcore); FLOPs = 2 x MACs\n")
    print(render(mac_rows(count, params, parameter_count(model)),
                 header=("block", "params (M)", "linear GMACs", "attention GMACs", "GMACs", "GFLOPs")))
    report = {"model": loaded.spec, "workload": {"batch": args.batch, "seqlen": args.seqlen, "decode": args.decode,
                                                 "tokens": workload.tokens},
              "params": parameter_count(model), "block_params": params, "macs": count.total, "flops": 2 * count.total,
              "macs_by_operator": count.by_operator,
              "blocks": [{"name": name, "macs": count.blocks[i], "linear_macs": count.block_linears[i],
                          "attention_macs": count.block_attention[i], "by_operator": count.block_operators[i]}
                         for i, name in enumerate(count.block_names)],
              "macs_outside_blocks": count.outside_blocks}
    print("\nby operator: " + ", ".join(f"{op} {v / 1e9:.4f} GMACs" for op, v in sorted(count.by_operator.items())))
    kv_bytes = None  # unknown without the architecture's dimensions
    try:
        arch = architecture(model.config)
    except BitallocError as err:
        print(f"analytic formula: none ({err})")
    else:
        formula = analytic_macs(arch, workload)
        report["analytic_macs"] = formula["total"]
        print(f"analytic formula ({arch.model_type}): {formula['total'] / 1e9:.4f} GMACs; fvcore - formula = "
              f"{100 * (count.total - formula['total']) / formula['total']:+.3f} %")
        kv_bytes = kv_cache_bytes(arch, workload.keys, workload.batch, torch.float16)
    variants = {"unquantized (fp16)": variant_figures(model, shapes, {s.name: FP16 for s in shapes}, FP16, FP16,
                                                      count, kv_bytes)}
    if plan is not None:
        variants[f"plan {args.plan}"] = variant_figures(model, shapes, assignment, embeddings, head, count, kv_bytes)
    elif (embeddings, head) != (FP16, FP16):
        variants[f"embeddings {embeddings}, head {head}"] = variant_figures(
            model, shapes, {s.name: FP16 for s in shapes}, embeddings, head, count, kv_bytes)
    report["variants"] = variants
    print(f"\nbytes and bit operations ({workload}; KV cache holding {workload.keys} tokens per sequence)\n")
    print(render(cost_rows(variants), header=("", *variants)))
    if args.json:
        atomic.write_json(args.json, report)
    print(f"\n[{time.time() - started:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
