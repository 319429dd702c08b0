"""Time every launch configuration of the Triton GEMV (batch 1) per bit width and layer shape.

    python inference/gemv_configs.py --shapes 8192x8192,4096x4096 --bits 4,2,3,8
    python inference/gemv_configs.py --configs 64/128/16/4,16/1024/4/4
    python inference/gemv_configs.py --kernel gemv-pairs --bits 4,2,8

A configuration is BLOCK_N/BLOCK_K/SPLIT_K/num_warps (`triton_backend.GEMV_CONFIGS` by default); for
the float16-pair GEMV it is BLOCK_N/VEC/SPLIT_K/num_warps (`triton_backend.pair_configs`), for the
tensor-core one VEC/SPLIT_K/num_warps/X_LOAD (`triton_backend.MMA_CONFIGS`; X_LOAD 2 reads x itself),
with /1 appended to launch an X_LOAD 2 configuration as a programmatic dependent (PDL) and a sixth
element 1 for the older step that dequantizes each pair to q s (`triton_mma`'s DEQUANTIZE).  A
configuration that cannot compute a shape (its lanes' chunks straddle the groups) is skipped with the
reason.
Same timing as inference/kernel_bench.py: CUDA-graph replay over weight copies that exceed the L2
cache; options rtn:intN:g128:asym.  Prints, per shape and bit width, the fastest configurations,
the speed-up over fp16 cuBLAS and the % of the memory roofline; for gemv_units also its activation
pass (`arrange_activations`) alone; beside them the read floor (`read_floor.py`: the fastest
kernel that only reads that many bytes, timed alike).
"""
import sys

import torch

from bitalloc.benchmarks import random_layer, roofline_bandwidth, time_layer, weight_bytes
from bitalloc.errors import BitallocError, cli_entry, first_line
from bitalloc.help_format import script_parser
from bitalloc.kernels import triton_backend as tb
from bitalloc.kernels import triton_kernels as tk
from bitalloc.kernels import tuner
from bitalloc.kernels.layout import packed_words
from bitalloc.kernels.timing import time_cuda_graph
from read_floor import read_floor_seconds


def parse_args(argv):
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--shapes", default="8192x8192,4096x4096", help="out x in, comma separated")
    parser.add_argument("--bits", default="4,2,3,8", help="code widths to sweep, comma separated")
    parser.add_argument("--kernel", choices=["gemv", "gemv-pairs", "gemv-mma"], default="gemv",
                        help="the float32 GEMV, the float16-pair GEMV or the tensor-core GEMV")
    parser.add_argument("--configs", default=None, help="BLOCK_N/BLOCK_K (gemv-pairs: VEC)/SPLIT_K/num_warps, "
                        "or VEC/SPLIT_K/num_warps/X_LOAD[/PDL[/DEQUANTIZE]] (gemv-mma); comma separated")
    parser.add_argument("--top", type=int, default=6, help="how many configurations to print per case")
    return parser.parse_args(argv)


def arrangement_seconds(in_features: int, bits: int, out_features: int) -> float:
    """The per-call activation pass (`arrange_activations`, zeroing a split-K output) alone."""
    device = torch.device("cuda")
    x = torch.randn(1, in_features, device=device, dtype=torch.float16)
    codes = tb.unit_codes(bits)
    units = tb.packed_units(packed_words(in_features, bits), bits)
    xt = torch.empty(1, codes, units, device=device)
    xb = torch.empty(1, 2, units, device=device)
    out = torch.empty(1, out_features, device=device)
    grid = (tb.triton_cdiv(units, tb.ARRANGE_BLOCK), 1)

    def call():
        tk.arrange_activations[grid](x, xt, xb, out, in_features, units, out_features, in_features, out_features,
                                     BITS=bits, PER_SHIFT=max(1, 8 // bits), ZERO_OUT=True, BLOCK=tb.ARRANGE_BLOCK)

    return time_cuda_graph([call] * 20)


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise BitallocError("gemv_configs needs a CUDA GPU")
    device = torch.device("cuda")
    bandwidth, note = roofline_bandwidth(device)
    print(note, flush=True)
    chosen = None if args.configs is None else [tuple(int(v) for v in c.split("/")) for c in args.configs.split(",")]
    for shape in args.shapes.split(","):
        out_features, in_features = (int(v) for v in shape.split("x"))
        dense = random_layer(out_features, in_features, "fp16", device, "dense")
        fp16 = time_layer(dense, 1, device)
        del dense
        print(f"== {out_features}x{in_features}: fp16 {fp16 * 1e6:.1f} us", flush=True)
        for bits in (int(b) for b in args.bits.split(",")):
            layer = random_layer(out_features, in_features, f"rtn:int{bits}:g128:asym", device, "triton")
            moved = weight_bytes(layer) + 2 * (out_features + in_features)
            key = tb.tuner_key(bits, 128, "integer", layer.qweight.shape, 1, torch.float16)
            timings = []
            defaults = {tb.GEMV: tb.GEMV_CONFIGS, tb.PAIRS: tb.pair_configs(bits), tb.MMA: tb.MMA_CONFIGS}[args.kernel]
            for config in chosen or defaults:
                why = tb.unfit(args.kernel, config, bits, 128, in_features)
                if why:
                    print(f"  {'/'.join(map(str, config))} skipped: {why}", flush=True)
                    continue
                tuner.CHOSEN[key] = (args.kernel, config)
                try:
                    timings.append((time_layer(layer, 1, device), config))
                except Exception as err:  # resources the GPU lacks (shared memory, registers): skip it
                    print(f"  {'/'.join(map(str, config))} failed: {first_line(err, 120)}", flush=True)
            tuner.CHOSEN.pop(key, None)
            timings.sort()
            if not timings:
                print(f"int{bits}: no configuration ran", flush=True)
                continue
            best = timings[0][0]
            cells = "  ".join(f"{'/'.join(map(str, c))}: {t * 1e6:.1f}" for t, c in timings[:args.top])
            arrange = (f"; activation pass {arrangement_seconds(in_features, bits, out_features) * 1e6:.2f} us"
                       if args.kernel == tb.GEMV else "")
            floor = min(read_floor_seconds(moved).values())
            print(f"int{bits}: {cells} | best {best * 1e6:.1f} us, {fp16 / best:.2f}x fp16, "
                  f"{100 * moved / best / bandwidth:.0f} % roofline{arrange}; read floor {floor * 1e6:.1f} us "
                  f"({100 * moved / floor / bandwidth:.0f} %)", flush=True)
            del layer
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
