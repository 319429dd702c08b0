"""Streaming sensitivity profiler: how much each (layer, option) hurts, measured block by block.

    python -m bitalloc.profile --space rtn-g64 --metrics fisher,rel --out runs/profile

The model is streamed one decoder block at a time (weights from host memory, or
read lazily from safetensors shards with --lazy); only that block, its
candidates' layers and its activations are on the accelerator.  Two passes
produce the metrics of `bitalloc.metrics`:

* the block pass captures block 0's inputs, then for each block computes its
  unquantized outputs, measures every candidate against them (recomputing only
  what the candidate changes, see `partial`), and hands the unquantized outputs
  on; with --interaction PLAN the hand-on is the block quantized by PLAN, so
  each block is measured on the inputs the quantized model will give it;
* the linear pass (`linear_pass`) sweeps forward, then backward from a loss on
  model-sampled labels, and weighs each layer's output error by the gradient.

Granularity: a candidate is one linear, one tie group (q/k/v, gate/up) or a
whole block at one option; a unit's value is shared among its layers in
proportion to their sizes, so sums over the unit (what solvers add) are exact.

Every block's values are cached in one JSON file (written atomically) under a
directory keyed by model fingerprint, calibration hash, dtype, granularity and
interaction plan; each value also records its quantizer version and metric
settings, and a mismatch is reported and measured again, never reused.  Resume
frontiers (the hidden states entering the next block, the gradient leaving the
last finished one) let a killed run continue where it stopped; --force
recomputes everything.  Which values hold and how new ones merge in: `profile_rows`.

`blocks=range(a, b)` measures only those blocks and returns their rows: the
passes still run the unquantized forward through the blocks before `a` (and,
for gradient metrics, the backward from the last block down to `a`), so the
values equal a whole-model run's.  This is how `bitalloc.distributed` shards a
profile across ranks; each range keeps its own resume frontiers, so ranks may
share one cache directory.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .blocks import (BlockBatch, advance, capture_inputs, collect_calibration, move_outside_blocks, returns_tuple,
                     run_block, to_host)
from .candidates import Candidates
from .cost import layer_bytes, layer_shapes
from .errors import BitallocError, cli_entry
from .guards import check_activations, check_weights
from .help_format import HelpFormatter, from_docstring, program
from .linear_pass import forward_sweep, label_gradients, measure_block_linears, weight_values
from .logit_kl import LogitKL
from .metrics import DEFAULT_METRIC, METRICS, BlockErrors, combine, parse_metrics
from .models import LoadedModel, block_linears, tie_groups
from .partial import BlockTrace, Shortcuts, record, replaying
from .profile_rows import ProfileSetup, merge, pending
from .quant import Option, get_quantizer
from .quant.registry import needs_calibration
from .table import SensitivityTable
from .weights import InMemory

log = logging.getLogger(__name__)
GRANULARITIES = ("linear", "group", "block")


def _units(block, granularity: str, batch: BlockBatch) -> list[tuple[str, ...]]:
    names = list(block_linears(block))
    if granularity == "linear":
        return [(n,) for n in names]
    if granularity == "block":
        return [tuple(names)]
    return [tuple(g) for g in tie_groups(block, lambda: run_block(block, batch.head(1)))]


@torch.no_grad()
def measure_block(block, index: int, batches: list[BlockBatch], wanted: list[tuple[tuple[str, ...], Option]],
                  candidates: Candidates, kl: LogitKL | None, kl_windows: int, progress_bar=None,
                  shortcut: bool = True, narrow: bool = False):
    """Block-pass values for each wanted (unit, option); returns (values, unquantized outputs per batch).

    `shortcut=False` recomputes the whole block for every candidate (the benchmark's baseline); `narrow`
    keeps only the shortcuts that record hidden-sized tensors (`BlockTrace.shortcuts`).
    Each batch is copied to the block's device once, for all candidates; the outputs are handed back
    in host memory (see `blocks.to_host`).
    """
    trace = BlockTrace(block, lambda: run_block(block, batches[0].head(1)))
    shortcuts = {unit: trace.shortcuts(list(unit), narrow) if shortcut else Shortcuts()
                 for unit in dict.fromkeys(u for u, _ in wanted)}
    errors = {key: BlockErrors() for key in wanted}
    kl_outputs = {key: [] for key in wanted}
    energy, outputs = 0.0, []
    device = candidates.device
    for b, held in enumerate(batches):
        if progress_bar is not None:
            progress_bar.set_postfix_str(f"block {index} batch {b + 1}/{len(batches)}")
        batch = BlockBatch(held.hidden.to(device, non_blocking=True), held.kwargs)
        reference, recording = record(block, lambda: run_block(block, batch), list(shortcuts.values()))
        token_energy = reference.float().pow(2).sum(-1).double()
        energy += float(token_energy.sum())
        inverse = 1.0 / token_energy.clamp_min(1e-30)
        for unit, option in wanted:
            with candidates.installed(block, unit, option), replaying(block, shortcuts[unit], recording):
                out = run_block(block, batch)
            errors[(unit, option)].add(out, reference, inverse)
            if kl is not None and b == 0:
                kl_outputs[(unit, option)] = out[:kl_windows]
        outputs.append(to_host(reference))
        del recording, reference
    values = {key: acc.values(energy) for key, acc in errors.items()}
    if kl is not None:
        for key, value in zip(wanted, kl.measure(index, [kl_outputs[key] for key in wanted])):
            values[key]["kl"] = value
    return values, outputs


def _block_pass(setup, blocks_needed, units, valid, weights, calib_ids, device, progress, kl_windows, kl_stride):
    """Measure the block-kind metrics of every block in `blocks_needed` (a dict index -> wanted pairs)."""
    model, blocks, cache = setup.model, setup.blocks, setup.cache
    batches = capture_inputs(model, calib_ids, setup.batch_size, device, host=True)
    kl_windows = min(kl_windows, batches[0].hidden.shape[0])
    as_tuple = returns_tuple(weights.load(0, blocks[0], device), batches[0])
    weights.release(0, blocks[0])
    needs_calib = any(needs_calibration(o) for o in setup.options)
    kl = None
    if "kl" in setup.metrics:
        kl = LogitKL(model, calib_ids[:kl_windows], batches[0].head(kl_windows), blocks, weights, device, as_tuple,
                     kl_stride)
    if device.type != "cpu" and kl is None:
        move_outside_blocks(model, "cpu")  # embeddings and head need no device memory while blocks are measured
    first, last = min(blocks_needed), max(blocks_needed)
    resumed = setup.cache.load_tensors("frontier", lambda k: 0 < k <= first)
    start = 0
    if resumed is not None and len(resumed[1]) == len(batches):
        start, hidden = resumed
        batches = [BlockBatch(h, b.kwargs) for h, b in zip(hidden, batches)]
        log.info("block pass resumes at block %d of %d", start, len(blocks))
    bar = tqdm(range(start, last + 1), desc="profile (block pass)", unit="block", disable=not progress)
    for index in bar:
        block = weights.load(index, blocks[index], device)
        wanted = blocks_needed.get(index, [])
        if wanted:
            linears = list(dict.fromkeys(n for unit, _ in wanted for n in unit))
            calibs = collect_calibration(block, batches, linears) if needs_calib else {}
            pairs = {(n, o) for unit, o in wanted for n in unit}
            candidates = Candidates(block, sorted(pairs, key=str), lambda n: setup.full(index, n), calibs, device)
            values, outputs = measure_block(block, index, batches, wanted, candidates, kl, kl_windows, bar,
                                            narrow=setup.lean_memory)
            del candidates, calibs  # freed before the next block's are made
        else:
            outputs = [to_host(run_block(block, b)) for b in batches]
        # the unquantized block first: its overflow is named here, not blamed on a candidate's value
        check_activations(block, outputs, f"block {index}", lambda: [run_block(block, b) for b in batches],
                          f"{setup.prefix}.{index}")
        if wanted:
            units_of = {n: u for u in units[index] for n in u}
            cache.save_rows(index, merge(setup, index, valid[index], values, units_of))
        if setup.plan:
            outputs = _quantized_outputs(setup, index, block, batches, device)
        batches = advance(batches, outputs)
        weights.release(index, blocks[index])
        if index < last:
            cache.save_tensors("frontier", index + 1, [b.hidden for b in batches])
    cache.drop("frontier")


@torch.no_grad()
def _quantized_outputs(setup, index, block, batches, device):
    """Interaction mode: this block's outputs with its linears quantized as the plan says."""
    linears = list(block_linears(block))
    assignment = {n: setup.plan[setup.full(index, n)] for n in linears}
    needs = any(needs_calibration(o) for o in assignment.values())
    calibs = collect_calibration(block, batches, linears) if needs else {}
    chosen = Candidates(block, list(assignment.items()), lambda n: setup.full(index, n), calibs, device)
    outputs = []
    with _all_installed(block, chosen, assignment):
        outputs = [to_host(run_block(block, b)) for b in batches]
    return outputs


class _all_installed:
    """Install several (layer, option) candidates at once (each layer at its own option)."""

    def __init__(self, block, candidates: Candidates, assignment: dict):
        self.stack = [candidates.installed(block, (name,), option) for name, option in assignment.items()]

    def __enter__(self):
        for context in self.stack:
            context.__enter__()

    def __exit__(self, *exc):
        for context in reversed(self.stack):
            context.__exit__(*exc)


def _linear_pass(setup, blocks_needed, units, valid, weights, calib_ids, device, progress, fisher_samples, seed):
    """Measure the linear-kind metrics of every block in `blocks_needed` (index -> wanted (unit, option) pairs)."""
    model, blocks, cache = setup.model, setup.blocks, setup.cache
    gradients = any(METRICS[m].gradients for m in setup.metrics)
    fisher_diag = any(m in setup.metrics for m in ("wfisher", "hawq"))
    batches = capture_inputs(model, calib_ids, setup.batch_size, device, host=True)
    predicted = calib_ids.shape[0] * (calib_ids.shape[1] - 1)
    needs_calib = any(needs_calibration(o) for o in setup.options)
    top, bottom = max(blocks_needed), min(blocks_needed)
    upstream = None
    if gradients:
        saved = cache.load_tensors("gradient_frontier", lambda k: top <= k < len(blocks) - 1)
        if saved is not None and len(saved[1]) == fisher_samples * len(batches):
            top, grads = saved
            upstream = [grads[k * len(batches):(k + 1) * len(batches)] for k in range(fisher_samples)]
            log.info("linear pass resumes below block %d", top + 1)
        else:
            top = len(blocks) - 1
    upto = len(blocks) if gradients and upstream is None else top
    boundaries = forward_sweep(blocks, weights, batches, device, upto, progress, setup.prefix)
    if gradients and upstream is None:
        as_tuple = returns_tuple(weights.load(0, blocks[0], device), batches[0])
        weights.release(0, blocks[0])
        upstream = label_gradients(model, calib_ids.split(setup.batch_size), boundaries[-1], device, as_tuple,
                                   fisher_samples, seed)
    if device.type != "cpu":
        move_outside_blocks(model, "cpu")
    order = range(top, bottom - 1, -1) if gradients else range(bottom, top + 1)
    for index in tqdm(order, desc="profile (linear pass)", unit="block", disable=not progress):
        block = weights.load(index, blocks[index], device)
        wanted = blocks_needed.get(index, [])
        pairs = sorted({(n, o) for unit, o in wanted for n in unit}, key=str)
        calibs = collect_calibration(block, boundaries[index], [n for n, _ in pairs]) if needs_calib and pairs else {}
        candidates = Candidates(block, pairs, lambda n: setup.full(index, n), calibs, device)
        terms, weight_terms, upstream = measure_block_linears(
            block, candidates, boundaries[index], upstream if gradients else None, device, fisher_diag)
        del candidates, calibs  # freed before the next block's are made
        weights.release(index, blocks[index])
        if wanted:
            per_weight = weight_values(weight_terms, predicted)
            values = {}
            for unit, option in wanted:
                values[(unit, option)] = combine([terms[(n, option)] for n in unit], predicted)
                if fisher_diag:
                    for metric in ("wfisher", "hawq"):
                        values[(unit, option)][metric] = sum(per_weight[(n, option)][metric] for n in unit)
            units_of = {n: u for u in units[index] for n in u}
            cache.save_rows(index, merge(setup, index, valid[index], values, units_of))
        if gradients and index > bottom:
            cache.save_tensors("gradient_frontier", index - 1, [g for sample in upstream for g in sample])
        boundaries[index] = None  # free host memory as the sweep descends
    cache.drop("gradient_frontier")


def profile(loaded: LoadedModel, calib_ids: torch.Tensor, options: list[Option], cache_dir=None,
            batch_size: int = 4, device="cpu", force: bool = False, progress: bool = True,
            metrics=(DEFAULT_METRIC,), granularity: str = "linear", plan: dict[str, Option] | None = None,
            weights=None, kl_windows: int = 2, fisher_samples: int = 1, seed: int = 0,
            kl_stride: int = 1, blocks: range | None = None, lean_memory: bool = False) -> SensitivityTable:
    """Measure every (linear layer, option) pair; the first of `metrics` becomes each row's `error`.

    `plan` (layer -> Option) turns on interaction mode; `weights` is a block weight source
    (default: the blocks in host memory); `blocks` (a range of block indices) limits the
    measurement and the table to those blocks; `lean_memory` records only hidden-sized tensors for the
    partial recompute (`BlockTrace.shortcuts`: less accelerator memory, a little more compute, same
    values).  See the module docstring.
    """
    metrics = parse_metrics(list(metrics))
    if granularity not in GRANULARITIES:
        raise BitallocError(f"granularity must be one of {', '.join(GRANULARITIES)}, got '{granularity}'")
    if plan and any(METRICS[m].kind != "block" or m == "kl" for m in metrics):
        raise BitallocError("interaction mode (a plan's quantized inputs) measures the rel and mse metrics only")
    device = torch.device(device)
    weights = weights or InMemory()
    check_weights(loaded.model)
    setup = ProfileSetup(loaded, calib_ids, options, metrics, granularity, plan, kl_windows, kl_stride, fisher_samples,
                   seed, cache_dir, batch_size, blocks, lean_memory)
    if plan:
        missing = [n for n in setup.shapes if n not in plan]
        if missing:
            raise BitallocError(f"interaction plan has no option for layer {missing[0]}")

    first_batch = capture_inputs(setup.model, calib_ids[:1], 1, device)[0] if granularity == "group" else None
    units, valid, needed = {}, {}, {"block": {}, "linear": {}}
    for index in setup.measured:
        block = setup.blocks[index]
        if granularity == "group":
            block_units = _units(weights.load(index, block, device), granularity, first_batch)
            weights.release(index, block)
        else:
            block_units = _units(block, granularity, first_batch)
        units[index] = block_units
        valid[index], missing = pending(setup, index, block_units, setup.cache.load_rows(index), force)
        for kind, pairs in missing.items():
            if pairs:
                needed[kind][index] = pairs
    started = time.perf_counter()
    if needed["block"]:
        _block_pass(setup, needed["block"], units, valid, weights, calib_ids, device, progress, kl_windows, kl_stride)
    if needed["linear"]:
        _linear_pass(setup, needed["linear"], units, valid, weights, calib_ids, device, progress, fisher_samples,
                     seed)
    if device.type != "cpu":
        move_outside_blocks(setup.model, "cpu")
    measured = len(set(needed["block"]) | set(needed["linear"]))
    cached = len(setup.measured) - measured
    log.info("profiled %d block(s) in %.1f s%s", measured, time.perf_counter() - started,
             f"; {cached} taken from the cache {setup.cache.dir or ''}".rstrip() if cached else "")
    return _table(setup, loaded, calib_ids, units, kl_windows, kl_stride, fisher_samples, seed)


def _table(setup, loaded, calib_ids, units, kl_windows, kl_stride, fisher_samples, seed) -> SensitivityTable:
    rows = []
    for index in setup.measured:
        stored = {(r["layer"], r["option"]): r["values"] for r in setup.cache.load_rows(index)}
        for unit in units[index]:
            for name in unit:
                layer = setup.full(index, name)
                for option in setup.options:
                    values = stored[(layer, str(option))]
                    row = {"layer": layer, "option": str(option), "error": values[setup.metrics[0]],
                           "bytes": layer_bytes(setup.shapes[layer], option), "numel": setup.shapes[layer].numel}
                    row.update({m: values[m] for m in setup.metrics})
                    if len(unit) > 1:
                        row["unit"] = "+".join(setup.full(index, n) for n in unit)
                    rows.append(row)
    meta = {
        "model": loaded.spec, "fingerprint": loaded.fingerprint, "calibration": setup.calib_key,
        "calib_samples": int(calib_ids.shape[0]), "calib_seqlen": int(calib_ids.shape[1]),
        "metric": setup.metrics[0], "metrics": setup.metrics, "granularity": setup.granularity,
        "interaction": setup.plan_hash, "dtype": setup.dtype, "options": [str(o) for o in setup.options],
        "settings": {"kl_windows": kl_windows, "kl_stride": kl_stride, "fisher_samples": fisher_samples, "seed": seed},
        "quantizers": {o.method: get_quantizer(o.method).version for o in setup.options if o.quantized},
    }
    return SensitivityTable(meta, rows)


def build_parser() -> argparse.ArgumentParser:
    from .cli_args import add_data_args, add_model_args
    from .paths import PRESET_SPACES

    width = max(map(len, METRICS))
    metrics = "\n".join(f"  {name:<{width}}  {metric.help}" for name, metric in METRICS.items())
    parser = argparse.ArgumentParser(prog=program("python -m bitalloc.profile"),
                                     description=from_docstring(__doc__)["description"],
                                     epilog=f"metrics (--metrics):\n{metrics}", formatter_class=HelpFormatter)
    parser.add_argument("--space", default="rtn-g64", help="option space: preset name, file or comma-separated list")
    parser.add_argument("--space-dir", default=str(PRESET_SPACES), help="where preset option spaces live")
    parser.add_argument("--metrics", default=DEFAULT_METRIC,
                        help="comma-separated (listed below); the first is each row's error")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="linear",
                        help="one candidate per linear, per tie group (q/k/v, gate/up) or per whole block")
    parser.add_argument("--interaction", default=None, metavar="PLAN",
                        help="plan.json: feed each block the outputs of the model quantized so far by this plan")
    parser.add_argument("--lazy", action="store_true",
                        help="read each block's weights from the safetensors shards only when needed")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="model dtype (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--kl-windows", type=int, default=2, help="calibration windows the kl metric carries")
    parser.add_argument("--kl-stride", type=int, default=1, help="the kl metric scores every N-th position")
    parser.add_argument("--fisher-samples", type=int, default=1, help="label samples of the Fisher metrics")
    parser.add_argument("--out", default="runs/profile", help="sensitivity.json/.csv and figures go here")
    parser.add_argument("--force", action="store_true", help="measure again even what is cached")
    parser.add_argument("--lean-memory", action="store_true",
                        help="keep only hidden-sized tensors for the partial recompute: about 1 GB less accelerator "
                             "memory for an 8B model at batch 4, slightly more compute, the same values")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_args(parser)
    add_data_args(parser, evaluation=False)
    return parser


@cli_entry
def main(argv=None) -> int:
    from .cli_args import calibration, check_non_negative, check_positive, resolve_device
    from .distributed import process_group, profile_sharded, rank_device, shard_from_env
    from .models import load_model
    from .paths import cache_root
    from .pipeline import load_space
    from .plan import Plan
    from .profile_report import write_report
    from .weights import load_lazy

    args = build_parser().parse_args(argv)
    check_positive(args, "kl_windows", "kl_stride", "fisher_samples")
    check_non_negative(args)
    device = resolve_device(args.device)
    shard = shard_from_env()  # launched by torchrun with several ranks: profile one range of blocks each
    if shard is not None:
        device = rank_device(shard, device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    metrics = parse_metrics(args.metrics)
    options = load_space(args.space, args.space_dir, None)
    interaction = Plan.load(args.interaction) if args.interaction else None  # a malformed plan stops before loading
    loaded, weights = load_lazy(args.model, dtype) if args.lazy else (load_model(args.model, dtype), None)
    plan = None if interaction is None else interaction.check_against(layer_shapes(loaded.model), loaded.fingerprint)
    calib = calibration(args, loaded)
    progress = not args.quiet and (shard is None or shard.rank == 0)  # one set of bars, not one per rank
    settings = dict(cache_dir=cache_root(args.cache_dir) / "profile", batch_size=args.batch_size, device=device,
                    force=args.force, progress=progress, metrics=metrics, granularity=args.granularity, plan=plan,
                    weights=weights, kl_windows=args.kl_windows, fisher_samples=args.fisher_samples, seed=args.seed,
                    kl_stride=args.kl_stride, lean_memory=args.lean_memory)
    if shard is None:
        table = profile(loaded, calib, options, **settings)
    else:
        with process_group(shard, device):
            table = profile_sharded(loaded, calib, options, shard, **settings)
        if table is None:  # not rank 0: its blocks went to rank 0, which writes the outputs
            return 0
    out = Path(args.out)
    table.save(out / "sensitivity.json")
    figures = write_report(out, table)
    print(f"{len(table.rows)} rows ({len(table.layers)} layers x {len(options)} options), metrics "
          f"{', '.join(metrics)}: {out / 'sensitivity.json'}, .csv, {len(figures)} figures "
          f"(tensorboard --logdir {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
