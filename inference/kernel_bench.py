"""Kernel benchmark: every backend and bit width against the dense layer, Llama-2-7B/70B layer shapes.

    python inference/kernel_bench.py --device cuda --out results/kernels_h100
    python inference/kernel_bench.py --device cpu --models llama-2-7b --layers q/k/v/o_proj --batches 1,4,16

Writes <out>.csv (every timing, GB/s, % of the memory roofline, speed-up),
<out>.txt (the same as a table), <out>_latency.csv (the cost model's latency
table, bitalloc.cost), <out>.png (speed-up against batch per shape) and, on a
GPU, <out>_tuner.json (the launch choice the tuner made per kernel, shape and
batch bucket, e.g. the fused W8A8 matmul or `_int_mm`).
"""
import json
import logging
import sys
from pathlib import Path

import torch

from bitalloc import atomic
from bitalloc.benchmarks import (BATCHES, LAYER_SHAPES, kernel_rows, plot_speedups, roofline_bandwidth, summary,
                                 write_csv, write_latency_table)
from bitalloc.cost import layer_shapes
from bitalloc.errors import BitallocError, cli_entry
from bitalloc.help_format import script_parser
from bitalloc.kernels import tuner
from bitalloc.models import load_model

GPU_BACKENDS = {
    "triton": [f"rtn:int{b}:g128:asym" for b in (2, 3, 4, 8)],
    "int8": ["rtn:int8:pc:sym:a8"],
    "mixed-outlier": ["rtn:int8:pc:sym:a8:outliers=128", "rtn:int4:pc:sym:a4:outliers=128"],
}
CPU_BACKENDS = {"cpu": ["rtn:int8:pc:sym", "rtn:int4:g128:asym", "rtn:int4:g32:asym"]}


def parse_args(argv):
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when there is a GPU)")
    parser.add_argument("--out", default=None, help="output path prefix (default results/kernels_<device>)")
    parser.add_argument("--models", default=",".join(LAYER_SHAPES), help="which shape sets")
    parser.add_argument("--model", default=None,
                        help="time this model's decoder-linear shapes instead (a model spec, as search.sh --model "
                             "takes it): <out>_latency.csv then serves its latency budgets")
    parser.add_argument("--layers", default=None, help="only these layer groups of the shape sets, comma separated, "
                             "as the table names them (e.g. q/k/v/o_proj,gate/up_proj)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="rows of activations, comma separated")
    parser.add_argument("--backends", default=None,
                        help='JSON {"backend": [options]} (default: every GPU or CPU backend and bit width)')
    return parser.parse_args(argv)


def shape_sets(names: str) -> dict[str, dict[str, tuple[int, int]]]:
    unknown = [m for m in names.split(",") if m not in LAYER_SHAPES]
    if unknown:
        raise BitallocError(f"unknown shape set(s) {', '.join(unknown)} (known: {', '.join(LAYER_SHAPES)})")
    return {m: dict(LAYER_SHAPES[m]) for m in names.split(",")}


def model_shapes(spec: str) -> dict[str, dict[str, tuple[int, int]]]:
    """The distinct (out, in) of the model's decoder linears (what plans quantize), named OUTxIN."""
    loaded = load_model(spec)
    distinct = sorted({(s.out_features, s.in_features) for s in layer_shapes(loaded.model)})
    return {spec: {f"{o}x{i}": (o, i) for o, i in distinct}}


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out or f"results/kernels_{device.type}")
    shapes = model_shapes(args.model) if args.model else shape_sets(args.models)
    if args.layers:
        keep = set(args.layers.split(","))
        known = {n for layers in shapes.values() for n in layers}
        if keep - known:
            raise BitallocError(f"no layer named {', '.join(sorted(keep - known))} in {args.models} "
                                f"(layers: {', '.join(sorted(known))})")
        shapes = {m: {n: s for n, s in layers.items() if n in keep} for m, layers in shapes.items()}
    backends = json.loads(args.backends) if args.backends else GPU_BACKENDS if device.type == "cuda" else CPU_BACKENDS
    bandwidth, note = None, "no roofline on the CPU"
    if device.type == "cuda":
        bandwidth, note = roofline_bandwidth(device)
    logging.info(note)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for model, layers in shapes.items():  # outputs rewritten after every shape: a cut-off run keeps its rows
        for name, shape in layers.items():
            rows += kernel_rows(device, backends, {model: {name: shape}}, [int(b) for b in args.batches.split(",")],
                                bandwidth, progress=False)
            write_csv(rows, out.with_suffix(".csv"))
            write_latency_table(rows, out.parent / f"{out.name}_latency.csv")
            text = f"{rows[0]['device']}, torch {torch.__version__}; {note}\n" + summary(rows)
            atomic.write_text(out.with_suffix(".txt"), text)
            plot_speedups(rows, out.with_suffix(".png"), f"{rows[0]['device']}: speed-up over the dense layer")
            if tuner.CHOSEN:  # which launch choice each tuned (kernel, shape, batch bucket) got
                atomic.write_json(out.parent / f"{out.name}_tuner.json", tuner.choices_made())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
