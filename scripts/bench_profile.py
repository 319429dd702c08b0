"""Profiling speed and memory, measured in one run.

    python scripts/bench_profile.py --data-dir ../shared/data
    python scripts/bench_profile.py --random llama-3-8b --device cuda --nsamples 128 --calib-seqlen 2048

Default: SmolLM2-135M on the CPU, every linear x RTN {2,3,4,8} bits g64, 16 x 512
calibration tokens.  For each metric group asked (--metrics, ';'-separated) it
times a fresh (uncached) profile; then it times the block pass on
--baseline-blocks blocks with and without the partial recompute and prints the
ratio.  With --random NAME the model is built from a config with random weights
(no download), each block's weights made on the device when the block is
needed; on CUDA the peak device memory is reported next to one block's weights
and the calibration activations.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from bitalloc import atomic
from bitalloc.blocks import capture_inputs
from bitalloc.candidates import Candidates
from bitalloc.cli_args import resolve_device
from bitalloc.data import calibration_ids
from bitalloc.errors import BitallocError, cli_entry
from bitalloc.help_format import script_parser
from bitalloc.models import LoadedModel, block_linears, find_blocks, load_model
from bitalloc.profile import measure_block, profile
from bitalloc.quant import parse
from bitalloc.weights import InMemory

RANDOM_CONFIGS = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False),
    "llama-2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                        tie_word_embeddings=False),
}


class RandomBlocks:
    """Block weights drawn on the device when the block is needed (seeded per block), dropped after."""

    def __init__(self, seed: int = 0, std: float = 0.02):
        self.seed, self.std = seed, std

    def load(self, index, block, device):
        block.to_empty(device=device)
        generator = torch.Generator(device=device).manual_seed(self.seed * 100003 + index)
        with torch.no_grad():
            for name, param in block.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, self.std, generator=generator)
                param.requires_grad_(False)
        return block

    def release(self, index, block):
        block.to("meta")


def random_model(name: str, dtype: torch.dtype, overrides: dict | None = None):
    """`overrides`: config fields changed from the named shape (fewer layers for a quick check...)."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**RANDOM_CONFIGS[name], **(overrides or {})})
    with init_empty_weights():
        model = LlamaForCausalLM(config).to(dtype)
    blocks_prefix = "model.layers."
    generator = torch.Generator().manual_seed(0)
    for param_name, param in list(model.named_parameters()):
        if not param_name.startswith(blocks_prefix):
            module_name, _, key = param_name.rpartition(".")
            value = torch.ones(param.shape, dtype=dtype) if "norm" in param_name else \
                (torch.randn(param.shape, generator=generator) * 0.02).to(dtype)
            model.get_submodule(module_name)._parameters[key] = torch.nn.Parameter(value, requires_grad=False)
    model.config.use_cache = False
    return LoadedModel(model.eval(), None, f"random:{name}", f"random-{name}")


def baseline_ratio(loaded, ids, options, blocks_to_time, batch_size, device, weights):
    """Seconds of the block pass on the given blocks with the partial recompute and without it."""
    prefix, blocks = find_blocks(loaded.model)
    batches = capture_inputs(loaded.model, ids, batch_size, device)
    seconds = {True: 0.0, False: 0.0}
    for index in blocks_to_time:
        block = weights.load(index, blocks[index], device)
        wanted = [((n,), o) for n in block_linears(block) for o in options]
        candidates = Candidates(block, sorted({(n, o) for (n,), o in wanted}, key=str),
                                lambda n: f"{prefix}.{index}.{n}", {}, device)
        for shortcut in (True, False):
            _sync(device)
            start = time.perf_counter()
            measure_block(block, index, batches, wanted, candidates, None, 0, shortcut=shortcut)
            _sync(device)
            seconds[shortcut] += time.perf_counter() - start
        weights.release(index, blocks[index])
    return seconds


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def add_profiling_args(parser, nsamples: int = 16, seqlen: int = 512, batch_size: int | None = 4,
                       space: bool = True) -> None:
    """What every profiling benchmark here takes: the calibration's shape and, with `space`, the options."""
    parser.add_argument("--nsamples", type=int, default=nsamples, help="calibration sequences")
    parser.add_argument("--calib-seqlen", type=int, default=seqlen, help="tokens per calibration sequence")
    if batch_size is not None:
        parser.add_argument("--batch-size", type=int, default=batch_size,
                            help="calibration sequences per forward pass")
    if space:
        parser.add_argument("--space", default=",".join(f"rtn:int{bits}:g64:asym" for bits in (2, 3, 4, 8)),
                            help="options profiled, comma separated")


@cli_entry
def main(argv=None) -> int:
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--model", default="smollm2-135m", help="model spec (see bitalloc.models)")
    parser.add_argument("--random", choices=sorted(RANDOM_CONFIGS), help="a random-weight model of this shape")
    parser.add_argument("--layers", type=int, default=None,
                        help="with --random: only this many blocks (peak memory per block is the same; time scales)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16/float16 (CUDA default bf16)")
    parser.add_argument("--data-dir", default=None, help="local data directory (default: $BITALLOC_DATA, else the hub)")
    add_profiling_args(parser)
    parser.add_argument("--metrics", default="fisher;rel", help="metric groups, each profiled fresh and timed")
    parser.add_argument("--baseline-blocks", default="0,15", help="blocks on which the full recompute is timed")
    parser.add_argument("--lean-memory", action="store_true", help="profile(lean_memory=True): see bitalloc.profile")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    options = [parse(t) for t in args.space.split(",")]
    started = time.perf_counter()
    if args.random:
        overrides = {"num_hidden_layers": args.layers} if args.layers else None
        loaded, weights = random_model(args.random, dtype, overrides), RandomBlocks()
        vocab = loaded.model.config.vocab_size
        ids = torch.randint(0, vocab, (args.nsamples, args.calib_seqlen), generator=torch.Generator().manual_seed(0))
    else:
        loaded, weights = load_model(args.model, dtype), InMemory()
        ids = calibration_ids(loaded.tokenizer, "wiki", args.nsamples, args.calib_seqlen, 0, args.data_dir)
    figures = {"model": loaded.spec, "device": str(device), "dtype": str(dtype), "tokens": int(ids.numel()),
               "batch_size": args.batch_size, "lean_memory": args.lean_memory,
               "options": [str(o) for o in options], "load_s": round(time.perf_counter() - started, 1)}
    model = loaded.model
    count = len(find_blocks(model)[1])
    blocks_to_time = [int(b) for b in args.baseline_blocks.split(",") if b]
    beyond = [b for b in blocks_to_time if not 0 <= b < count]
    if beyond:  # before the profiles, which take minutes
        raise BitallocError(f"--baseline-blocks {beyond[0]}: the model has blocks 0-{count - 1}")
    block_param_bytes = sum(p.numel() * p.element_size() for p in find_blocks(model)[1][0].parameters())
    hidden = model.config.hidden_size
    figures["block_weight_bytes"] = block_param_bytes
    figures["calib_hidden_bytes"] = ids.numel() * hidden * torch.empty((), dtype=dtype).element_size()
    for group in args.metrics.split(";"):
        metrics = group.split(",")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        start = time.perf_counter()
        profile(loaded, ids, options, None, args.batch_size, device, progress=False, metrics=metrics, weights=weights,
                lean_memory=args.lean_memory)
        _sync(device)
        figures[f"profile_s[{group}]"] = round(time.perf_counter() - start, 1)
        if device.type == "cuda":
            figures[f"peak_gpu_bytes[{group}]"] = torch.cuda.max_memory_allocated()
        print(json.dumps(figures), flush=True)
    if blocks_to_time:
        seconds = baseline_ratio(loaded, ids, options, blocks_to_time, args.batch_size, device, weights)
        figures["block_pass_partial_s"] = round(seconds[True], 2)
        figures["block_pass_full_recompute_s"] = round(seconds[False], 2)
        figures["partial_speedup"] = round(seconds[False] / seconds[True], 2)
    print(json.dumps(figures, indent=1))
    if args.json:
        atomic.write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
