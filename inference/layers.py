"""Layer benchmark: one whole decoder block (attention + MLP) with packed linears against float16.

    python inference/layers.py --config llama-2-7b --out results/layers_h100

Times the block's forward for decode-like batches (B sequences of one token) and
a prefill (one sequence of 512 tokens), for each mix of options
(bitalloc.benchmarks.MIXES), replayed from a CUDA graph (the block's weights
exceed the L2 cache).  Writes <out>.csv and <out>.txt.
"""
import sys
from pathlib import Path

import torch

from bitalloc import atomic
from bitalloc.benchmarks import LLAMA_CONFIGS, MIXES, mix_assignment, pack_in_place, random_llama, write_csv
from bitalloc.cost import average_bits, layer_shapes
from bitalloc.errors import BitallocError, cli_entry
from bitalloc.help_format import script_parser
from bitalloc.kernels.timing import time_cuda_graph

SETTINGS = [(1, 1), (4, 1), (32, 1), (1, 512)]  # (sequences, tokens each)
COLUMNS = ("device", "model", "mix", "avg_bits", "sequences", "tokens", "seconds", "latency_ms", "speedup")


def parse_args(argv):
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--config", default="llama-2-7b", choices=sorted(LLAMA_CONFIGS), help="the block's shape")
    parser.add_argument("--mixes", default=",".join(MIXES), help="mixes of options to time, comma separated")
    parser.add_argument("--out", default="results/layers", help="output path prefix: <out>.csv and <out>.txt")
    return parser.parse_args(argv)


@torch.no_grad()
def time_block(model, sequences: int, tokens: int) -> float:
    """Seconds per block forward, replayed from a CUDA graph (launch overhead out, as in served decoding)."""
    hidden = torch.randn(sequences, tokens, model.config.hidden_size, device="cuda", dtype=torch.float16)
    return time_cuda_graph([lambda: model(inputs_embeds=hidden, use_cache=False)])


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise BitallocError("the layer benchmark needs a CUDA GPU")
    device_name = torch.cuda.get_device_name()
    rows, baseline = [], {}
    for mix in ["fp16"] + args.mixes.split(","):
        torch.manual_seed(0)
        model = random_llama(args.config, "cuda", layers=1, head=False)
        bits = 16.0
        if mix != "fp16":
            assignment = mix_assignment(model, mix)
            bits = average_bits(layer_shapes(model), assignment)
            pack_in_place(model, assignment, "auto", progress=False)
        for sequences, tokens in SETTINGS:
            seconds = time_block(model, sequences, tokens)
            baseline.setdefault((sequences, tokens), seconds)
            rows.append({"device": device_name, "model": args.config, "mix": mix, "avg_bits": round(bits, 3),
                         "sequences": sequences, "tokens": tokens, "seconds": seconds, "latency_ms": seconds * 1e3,
                         "speedup": baseline[(sequences, tokens)] / seconds})
        del model
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out.with_suffix(".csv"), COLUMNS)
    lines = [f"{device_name}: one {args.config} decoder block, cold L2",
             f"{'mix':<8} {'bits':>5} {'seqs x tokens':>13} {'us':>9} {'speedup':>7}"]
    lines += [f"{r['mix']:<8} {r['avg_bits']:5.2f} {r['sequences']:>6} x {r['tokens']:<4} {r['seconds'] * 1e6:9.1f} "
              f"{r['speedup']:7.2f}" for r in rows]
    atomic.write_text(out.with_suffix(".txt"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
