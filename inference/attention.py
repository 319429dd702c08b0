"""Decode attention benchmark: every launch of the one-token kernel against torch's SDPA, per cache length.

    python inference/attention.py --lengths 167,512,2048 --heads 32 --dim 128

One query token per head attends over a static KV cache whose last 40 positions
are not yet written (masked, as Hugging Face's static-cache mask has them), the
shape of a Llama-2-7B layer's decode step.  Each launch of
`bitalloc.kernels.decode_attention.LAUNCHES` and SDPA (torch's own pick: cuDNN or
flash on Hopper) is replayed from one CUDA graph over copies of the cache that
together exceed the L2 cache, so keys and values come from device memory as they
do in a model whose every layer has its own cache; the launch overhead stays out
as in a graph-replayed decode.  Prints microseconds per call and the bandwidth of
the cache bytes each call reads.
"""
import sys

import torch

from bitalloc.benchmarks import MAX_COPIES
from bitalloc.errors import BitallocError, cli_entry
from bitalloc.help_format import script_parser
from bitalloc.kernels import decode_attention as da
from bitalloc.kernels.timing import time_cuda_graph

UNWRITTEN = 40  # cache positions past the current token, masked
L2_MULTIPLE = 3  # the copies hold this many times the L2 cache


def attention_seconds(length: int, heads: int, dim: int, dtype: torch.dtype) -> dict[tuple, float]:
    """Seconds per call of each launch (kind, config) at this cache length."""
    device = torch.device("cuda")
    cache_bytes = 2 * heads * length * dim * dtype.itemsize
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    copies = max(2, min(MAX_COPIES, -(-L2_MULTIPLE * l2 // cache_bytes)))
    query = torch.randn(1, 1, heads, dim, device=device, dtype=dtype).transpose(1, 2)
    caches = [tuple(torch.randn(1, heads, length, dim, device=device, dtype=dtype) for _ in range(2))
              for _ in range(copies)]
    mask = (torch.arange(length, device=device) < max(1, length - UNWRITTEN)).view(1, 1, 1, length)
    scale = dim ** -0.5
    seconds = {}
    for kind, config in [*da.LAUNCHES, da.SDPA]:
        calls = [lambda k=k, v=v: da._launch(kind, config, query, k, v, mask, scale) for k, v in caches]
        seconds[(kind, config)] = time_cuda_graph(calls)
    return seconds


@cli_entry
def main(argv=None):
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--lengths", default="167,512,2048", help="cache lengths, comma separated")
    parser.add_argument("--heads", type=int, default=32, help="attention heads (as many key/value heads)")
    parser.add_argument("--dim", type=int, default=128, help="head size (a power of two)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"), help="cache dtype")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise BitallocError("attention.py needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.heads} heads of {args.dim}, "
          f"{args.dtype}; microseconds per call (cache GB/s)", flush=True)
    for length in (int(v) for v in args.lengths.split(",")):
        moved = 2 * args.heads * length * args.dim * dtype.itemsize
        timings = sorted((t, launch) for launch, t in attention_seconds(length, args.heads, args.dim, dtype).items())
        cells = "  ".join(f"{' '.join([kind, '/'.join(map(str, config))]).strip()}: {t * 1e6:.1f} "
                          f"({moved / t / 1e9:.0f})" for t, (kind, config) in timings)
        print(f"length {length} ({moved / 1e6:.2f} MB): {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
