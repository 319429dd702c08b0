"""Streaming sensitivity profiler.

For each decoder block in turn: compute its unquantized outputs on the
calibration batches, then for every linear layer and every option quantize only
that layer (through the same quantizer and QuantLinear that apply uses) and
record the relative error of the block's output, token by token,

    error = mean over tokens t of ||Y_q[t] - Y[t]||^2 / ||Y[t]||^2 .

Per token, because a few tokens (the attention sink at the start of each
window) carry hidden states hundreds of times larger than the rest in the
middle blocks of most LLMs; one global ratio would be dominated by them and
rank those blocks as nearly insensitive.  The next block normalises each token
anyway, so the per-token relative error is what it sees.

then pass the unquantized outputs on to the next block.  One block's weights
and activations are on the device at a time.

Results are cached per block (one JSON file each, written atomically) together
with the hidden states at the first unfinished block, so a killed run resumes
without redoing finished blocks, and a larger option space reuses the rows
already measured.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import atomic
from .blocks import (BlockBatch, advance, block_outputs, capture_inputs, collect_calibration, replace_module,
                     run_block)
from .cost import layer_bytes, layer_shapes
from .data import ids_hash
from .guards import check_activations, check_value, check_weights
from .kernels.quant_linear import QuantLinear
from .models import LoadedModel, block_linears, find_blocks, weight_matrix
from .quant import Option, get_quantizer, quantize
from .table import SensitivityTable

log = logging.getLogger(__name__)
METRIC = "block_output_token_rel_mse"


def _row_key(option: Option) -> dict:
    version = get_quantizer(option.method).version if option.quantized else "fp16"
    return {"option": str(option), "version": version, "metric": METRIC}


class BlockCache:
    """Per-block result files and the resume frontier for one (model, calibration) pair."""

    def __init__(self, root: Path | None, fingerprint: str, calib: str, dtype: str):
        self.dir = None if root is None else Path(root) / f"{fingerprint}-{calib}-{dtype}"

    def _block_path(self, index: int) -> Path:
        return self.dir / f"block_{index:04d}.json"

    def load_rows(self, index: int) -> list[dict]:
        if self.dir is None or not self._block_path(index).is_file():
            return []
        try:
            return json.loads(self._block_path(index).read_text())["rows"]
        except (ValueError, KeyError, OSError):
            log.warning("cache file %s is unreadable; block %d will be measured again", self._block_path(index), index)
            return []

    def save_rows(self, index: int, rows: list[dict]) -> None:
        if self.dir is not None:
            atomic.write_json(self._block_path(index), {"block": index, "rows": rows})

    def save_frontier(self, index: int, batches: list[BlockBatch]) -> None:
        if self.dir is None:
            return
        tensors = {f"hidden_{i}": b.hidden.detach().cpu().contiguous() for i, b in enumerate(batches)}
        with atomic.atomic_path(self.dir / "frontier.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"block": str(index)})

    def drop_frontier(self) -> None:
        if self.dir is not None:
            (self.dir / "frontier.safetensors").unlink(missing_ok=True)

    def load_frontier(self, index: int, batches: list[BlockBatch]) -> list[BlockBatch] | None:
        path = None if self.dir is None else self.dir / "frontier.safetensors"
        if path is None or not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                if handle.metadata().get("block") != str(index):
                    return None
            tensors = load_file(str(path))
            device = batches[0].hidden.device
            hidden = [tensors[f"hidden_{i}"].to(device) for i in range(len(batches))]
        except Exception:  # corrupt or mismatched frontier: recompute the forward passes instead
            log.warning("resume frontier %s is unusable; recomputing earlier blocks' outputs", path)
            return None
        return [BlockBatch(h, b.kwargs) for h, b in zip(hidden, batches)]


@torch.no_grad()
def measure_block(block, index: int, prefix: str, batches, outputs, options: list[Option],
                  wanted: set[tuple[str, str]], calibs: dict) -> list[dict]:
    """Relative block-output error for each wanted (layer, option) of one block."""
    inverse_energy = [1.0 / o.double().pow(2).sum(-1).clamp_min(1e-30) for o in outputs]
    tokens = sum(e.numel() for e in inverse_energy)
    device = batches[0].hidden.device
    rows = []
    for name, module in block_linears(block).items():
        full = f"{prefix}.{index}.{name}"
        weight = weight_matrix(module).detach().float()
        bias = getattr(module, "bias", None)
        for option in options:
            if (full, str(option)) not in wanted:
                continue
            qw = quantize(weight.cpu(), option, calibs.get(name), layer=full) if option.quantized else None
            layer = QuantLinear.from_weight(qw, bias, dense=weight.cpu()).to(device)
            original = replace_module(block, name, layer)
            try:
                error = sum(
                    float(((run_block(block, b) - o).double().pow(2).sum(-1) * inv).sum())
                    for b, o, inv in zip(batches, outputs, inverse_energy)
                ) / tokens
            finally:
                replace_module(block, name, original)
            rows.append({"layer": full, **_row_key(option), "error": check_value(error, f"error of {full} at {option}")})
    return rows


def profile(loaded: LoadedModel, calib_ids: torch.Tensor, options: list[Option], cache_dir=None,
            batch_size: int = 4, device="cpu", force: bool = False, progress: bool = True) -> SensitivityTable:
    """Measure every (linear layer, option) pair; see the module docstring."""
    model = loaded.model
    check_weights(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    prefix, blocks = find_blocks(model)
    shapes = {s.name: s for s in layer_shapes(model)}
    calib_key = ids_hash(calib_ids)
    cache = BlockCache(cache_dir, loaded.fingerprint, calib_key, dtype)
    needs_calib = {o.method for o in options if o.quantized and get_quantizer(o.method).needs_calibration}

    # which rows each block still needs
    pending, done = [], []
    for index, block in enumerate(blocks):
        names = [f"{prefix}.{index}.{n}" for n in block_linears(block)]
        keys = {(n, str(o)): _row_key(o) for n in names for o in options}
        cached = [] if force else cache.load_rows(index)
        valid = [r for r in cached if keys.get((r["layer"], r["option"])) == {k: r[k] for k in ("option", "version", "metric")}]
        stale = [r for r in cached if (r["layer"], r["option"]) in keys and r not in valid]
        if stale:
            log.info("block %d: %d cached rows were made by another quantizer version or metric; measuring again",
                     index, len(stale))
        have = {(r["layer"], r["option"]) for r in valid}
        pending.append(set(keys) - have)
        done.append(valid + [r for r in cached if (r["layer"], r["option"]) not in keys])

    batches = capture_inputs(model, calib_ids, batch_size, device)
    start = next((i for i, p in enumerate(pending) if p), len(blocks))
    resumed = cache.load_frontier(start, batches) if 0 < start < len(blocks) else None
    first = start if resumed is not None else 0
    if resumed is not None:
        batches = resumed
        log.info("resuming at block %d of %d", start, len(blocks))

    bar = tqdm(range(first, len(blocks)), desc="profile", unit="block", disable=not progress)
    for index in bar:
        block = blocks[index].to(device)
        outputs = block_outputs(block, batches)
        check_activations(block, outputs, f"block {index}", lambda: block_outputs(block, batches), f"{prefix}.{index}")
        if pending[index]:
            calibs = collect_calibration(block, batches, list(block_linears(block))) if needs_calib else {}
            rows = measure_block(block, index, prefix, batches, outputs, options, pending[index], calibs)
            done[index] = done[index] + rows
            cache.save_rows(index, done[index])
        batches = advance(batches, outputs)
        blocks[index].to("cpu")
        if pending[index] and index + 1 < len(blocks):
            cache.save_frontier(index + 1, batches)
    cache.drop_frontier()

    wanted = [(f"{prefix}.{i}.{n}", o) for i, b in enumerate(blocks) for n in block_linears(b) for o in options]
    lookup = {(r["layer"], r["option"]): r for d in done for r in d}
    rows = [
        {"layer": name, "option": str(o), "error": lookup[(name, str(o))]["error"],
         "bytes": layer_bytes(shapes[name], o), "numel": shapes[name].numel}
        for name, o in wanted
    ]
    meta = {
        "model": loaded.spec, "fingerprint": loaded.fingerprint, "calibration": calib_key,
        "calib_samples": int(calib_ids.shape[0]), "calib_seqlen": int(calib_ids.shape[1]),
        "metric": METRIC, "dtype": dtype, "options": [str(o) for o in options],
        "quantizers": {o.method: get_quantizer(o.method).version for o in options if o.quantized},
    }
    return SensitivityTable(meta, rows)

