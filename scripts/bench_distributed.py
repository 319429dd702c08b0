"""Sharded profiling speed-up: one GPU against N, measured in one run.

    python scripts/bench_distributed.py --gpus 2                     # Llama-2-13B shape, random weights
    python scripts/bench_distributed.py --gpus 2 --device cpu --override num_hidden_layers=4 hidden_size=128 \\
        intermediate_size=256 num_attention_heads=4 num_key_value_heads=4 vocab_size=1000 --nsamples 4 --calib-seqlen 64

Runs the same profile twice, each in fresh processes launched with
torch.distributed.run: on 1 rank, then on --gpus ranks (NCCL on CUDA, gloo on
CPU), and prints both wall times and their ratio.  The model is built from a
config with random weights (no download); every rank draws each block's weights
on its device from a per-block seed (scripts/bench_profile.py: RandomBlocks), so
all ranks see the same model and no weights are read from disk.  Each rank
first profiles one block on one window (warm-up: kernels, lazy imports); the
time runs from a barrier after that to rank 0 holding the merged table.  Every
process of both runs gets cores / --gpus CPU threads (the same per process).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_profile import RANDOM_CONFIGS, RandomBlocks, add_profiling_args, random_model  # noqa: E402
from bitalloc.errors import BitallocError, cli_entry
from bitalloc.help_format import script_parser


def _value(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_overrides(items: list[str]) -> dict:
    """FIELD=VALUE pairs as config fields with numbers, refused before any process is launched."""
    overrides = {}
    for item in items:
        field, sep, value = item.partition("=")
        try:
            overrides[field] = _value(value) if sep and field else None
        except ValueError:
            raise BitallocError(f"--override {item}: the value is not a number") from None
        if overrides[field] is None:
            raise BitallocError(f"--override {item}: expected FIELD=VALUE")
    return overrides


def check_ranks(args) -> None:
    """Before the one-rank run (minutes): a sharded run needs 2+ ranks, and on CUDA a GPU per rank."""
    from bitalloc.cli_args import resolve_device

    if args.gpus < 2:
        raise BitallocError(f"--gpus must be at least 2 (the run compared with one rank), got {args.gpus}")
    if resolve_device(args.device).type == "cuda" and torch.cuda.device_count() < args.gpus:
        raise BitallocError(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} GPU(s); "
                            "give fewer ranks or --device cpu")


def worker(args) -> None:
    import torch.distributed as dist

    from bitalloc.cli_args import resolve_device
    from bitalloc.distributed import block_range, process_group, profile_sharded, rank_device, shard_from_env
    from bitalloc.profile import profile
    from bitalloc.quant import parse

    shard = shard_from_env()
    device = resolve_device(args.device)
    device = rank_device(shard, device) if shard else device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    overrides = parse_overrides(args.override)
    loaded = random_model(args.random, dtype, overrides)
    vocab = loaded.model.config.vocab_size
    ids = torch.randint(0, vocab, (args.nsamples, args.calib_seqlen), generator=torch.Generator().manual_seed(0))
    settings = dict(batch_size=args.batch_size, device=device, progress=False, metrics=args.metrics.split(","),
                    weights=RandomBlocks())
    options = [parse(t) for t in args.space.split(",")]
    first = block_range(loaded.model.config.num_hidden_layers, shard.rank, shard.world).start if shard else 0
    profile(loaded, ids[:1], options, blocks=range(first, first + 1), **settings)  # warm-up
    if shard is None:
        start = time.perf_counter()
        table = profile(loaded, ids, options, **settings)
    else:
        with process_group(shard, device):
            dist.barrier()
            start = time.perf_counter()
            table = profile_sharded(loaded, ids, options, shard, **settings)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if table is not None:
        print(json.dumps({"ranks": shard.world if shard else 1, "seconds": round(time.perf_counter() - start, 2),
                          "rows": len(table.rows)}), flush=True)


def launch(ranks: int, argv: list[str], threads: int) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               __file__, "--worker", *argv]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        sys.exit(f"{ranks}-rank run failed:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


@cli_entry
def main(argv=None) -> int:
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--gpus", type=int, default=2, help="ranks of the sharded run (one GPU each on CUDA)")
    parser.add_argument("--random", choices=sorted(RANDOM_CONFIGS), default="llama-2-13b",
                        help="shape of the random-weight model profiled")
    parser.add_argument("--override", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="config fields changed from the --random shape")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    add_profiling_args(parser)
    parser.add_argument("--metrics", default="rel", help="comma-separated profile metrics")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args, argv = parser.parse_args(argv), [a for a in argv if a != "--worker"]
    if args.worker:
        worker(args)
        return 0
    parse_overrides(args.override)
    check_ranks(args)
    threads = max(1, (os.cpu_count() or 1) // args.gpus)
    single, sharded = launch(1, argv, threads), launch(args.gpus, argv, threads)
    assert single["rows"] == sharded["rows"], (single, sharded)
    print(json.dumps({"shape": args.random, "override": args.override, "device": args.device,
                      "tokens": args.nsamples * args.calib_seqlen, "metrics": args.metrics,
                      "seconds_1": single["seconds"], f"seconds_{args.gpus}": sharded["seconds"],
                      "speedup": round(single["seconds"] / sharded["seconds"], 2)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
