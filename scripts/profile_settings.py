"""Profiling time per block and peak GPU memory of several settings, on a few blocks of a random model.

    PYTHONPATH=$PWD python scripts/profile_settings.py --layers 3 \\
        --settings 4:lean:triton,4:lean:torch,4:full:triton,2:full:triton,8:lean:triton [--trace]

A setting is BATCH:lean|full:triton|torch: the calibration batch size, whether
`--lean-memory` is on, and how candidates get their dense weights on the GPU
(`triton`: `triton_backend.dense_weight`, as the profiler does; `torch`:
`QuantLinear.dequantize_codes`, as it did before 2026-12-02).  Each setting
times a fresh `profile()` of a Llama-3-8B-shaped random model cut to --layers
blocks (128 x 2048 tokens, RTN int2/3/4/8 g64 asym, metric `rel`); per-block
time is the total over the blocks, so model set-up and the first compilations
are spread over them.  --trace also prints torch.profiler's kernel table for
one block measured on 4 batches.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch

import bitalloc.candidates as candidates_module
from bitalloc.blocks import capture_inputs
from bitalloc.candidates import Candidates
from bitalloc.errors import BitallocError, cli_entry
from bitalloc.help_format import script_parser
from bitalloc.models import block_linears, find_blocks
from bitalloc.profile import measure_block, profile
from bitalloc.quant import parse

sys.path.insert(0, str(Path(__file__).parent))
from bench_profile import RandomBlocks, add_profiling_args, random_model  # noqa: E402

OPTIONS = [parse(f"rtn:int{b}:g64:asym") for b in (2, 3, 4, 8)]


@contextlib.contextmanager
def dense_weights(how: str):
    """Candidates' dense weights made by `how` ("triton" is what the profiler does)."""
    original = candidates_module.dense_weight
    if how == "torch":
        candidates_module.dense_weight = lambda layer, dtype: layer.dequantize_codes(dtype)
    try:
        yield
    finally:
        candidates_module.dense_weight = original


def time_setting(setting: str, layers: int, nsamples: int, seqlen: int) -> dict:
    batch, memory, how = setting.split(":")
    loaded = random_model("llama-3-8b", torch.bfloat16, {"num_hidden_layers": layers})
    vocab = loaded.model.config.vocab_size
    ids = torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with dense_weights(how):
        profile(loaded, ids, OPTIONS, None, int(batch), torch.device("cuda"), progress=False, metrics=["rel"],
                weights=RandomBlocks(), lean_memory=memory == "lean")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return dict(setting=setting, layers=layers, seconds=round(seconds, 2), per_block=round(seconds / layers, 2),
                peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 3))


def trace_one_block(seqlen: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    loaded = random_model("llama-3-8b", torch.bfloat16, {"num_hidden_layers": 1})
    ids = torch.randint(0, loaded.model.config.vocab_size, (16, seqlen), generator=torch.Generator().manual_seed(0))
    device = torch.device("cuda")
    batches = capture_inputs(loaded.model, ids, 4, device, host=True)
    block = RandomBlocks().load(0, find_blocks(loaded.model)[1][0], device)
    wanted = [((name,), option) for name in block_linears(block) for option in OPTIONS]
    made = Candidates(block, sorted({(n, o) for (n,), o in wanted}, key=str), lambda n: n, {}, device)
    measure_block(block, 0, batches[:1], wanted, made, None, 0, narrow=True)  # compile and warm up first
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        measure_block(block, 0, batches, wanted, made, None, 0, narrow=True)
        torch.cuda.synchronize()
    return trace.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60)


@cli_entry
def main(argv=None) -> int:
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--layers", type=int, default=3, help="blocks of the random model timed")
    parser.add_argument("--settings", default="4:lean:triton,4:lean:torch,4:full:triton,2:full:triton,8:lean:triton",
                        help="BATCH:lean|full:triton|torch settings (see above), comma separated")
    add_profiling_args(parser, nsamples=128, seqlen=2048, batch_size=None, space=False)
    parser.add_argument("--trace", action="store_true", help="also print the kernel table of one lean block")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise BitallocError("profile_settings needs a CUDA GPU")
    for setting in args.settings.split(","):
        print(json.dumps(time_setting(setting, args.layers, args.nsamples, args.calib_seqlen)), flush=True)
    if args.trace:
        print(trace_one_block(args.calib_seqlen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
