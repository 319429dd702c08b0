"""Peak accelerator memory of each profiling stage, on a random-weight model (no download).

    PYTHONPATH=$PWD python scripts/profile_memory_stages.py --batch-size 4 [--lean-memory]

Wraps the stages of `bitalloc.profile` (making a block's candidates, collecting
calibration statistics, the reference pass that records what the partial
recompute replays, measuring a block) and prints, for each call: memory
allocated before it, its peak, and memory allocated after it (GB).  Peak
memory per block does not depend on the number of blocks, so two are enough.
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import torch

import bitalloc.profile as profile_module
from bitalloc.errors import BitallocError, cli_entry
from bitalloc.help_format import script_parser
from bitalloc.quant import parse

sys.path.insert(0, str(Path(__file__).parent))
from bench_profile import RANDOM_CONFIGS, RandomBlocks, add_profiling_args, random_model  # noqa: E402

GB = 1e9
STAGES = ("Candidates", "collect_calibration", "record", "measure_block")


def watched(name, fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn(*args, **kwargs)
        torch.cuda.synchronize()
        print(f"{name:20s} before {before / GB:6.3f}  peak {torch.cuda.max_memory_allocated() / GB:6.3f}  "
              f"after {torch.cuda.memory_allocated() / GB:6.3f}", flush=True)
        return result
    return wrapped


@cli_entry
def main(argv=None) -> int:
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--random", choices=sorted(RANDOM_CONFIGS), default="llama-3-8b",
                        help="shape of the random-weight model profiled")
    parser.add_argument("--layers", type=int, default=2,
                        help="blocks kept (peak memory per block does not depend on it)")
    add_profiling_args(parser, nsamples=128, seqlen=2048, space=False)
    parser.add_argument("--lean-memory", action="store_true", help="profile(lean_memory=True): see bitalloc.profile")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise BitallocError("profile_memory_stages needs a CUDA GPU")
    for stage in STAGES:
        setattr(profile_module, stage, watched(stage, getattr(profile_module, stage)))
    loaded = random_model(args.random, torch.bfloat16, {"num_hidden_layers": args.layers})
    ids = torch.randint(0, loaded.model.config.vocab_size, (args.nsamples, args.calib_seqlen),
                        generator=torch.Generator().manual_seed(0))
    options = [parse(f"rtn:int{bits}:g64:asym") for bits in (2, 3, 4, 8)]
    start = time.perf_counter()
    profile_module.profile(loaded, ids, options, None, args.batch_size, torch.device("cuda"), progress=False,
                           metrics=["rel"], weights=RandomBlocks(), lean_memory=args.lean_memory)
    print(f"profiled {args.layers} blocks in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
