"""The profiler's bookkeeping: which cached values still hold, which (unit, option) pairs are missing,
and how a unit's new values are shared among its layers and merged into a block's rows.

A value is reused only when its quantizer version and metric settings (`metric_settings`) match the
run's; anything else is reported and measured again.  A unit's value is split among its layers in
proportion to their sizes, so the sums solvers take over a unit are exact.
"""
from __future__ import annotations

import hashlib
import json
import logging

from .block_cache import BlockCache
from .cost import layer_shapes
from .data import ids_hash
from .errors import BitallocError
from .guards import check_value
from .metrics import METRICS
from .models import find_blocks
from .quant import Option, get_quantizer

log = logging.getLogger(__name__)


def version_of(option: Option) -> str:
    return get_quantizer(option.method).version if option.quantized else "fp16"


def metric_settings(metric: str, kl_windows: int, fisher_samples: int, seed: int, kl_stride: int = 1) -> str:
    """What a metric's value depends on besides model, data and option (stored with the value)."""
    if metric == "kl":
        return f"windows={kl_windows},stride={kl_stride}"
    if METRICS[metric].gradients:
        return f"samples={fisher_samples},seed={seed}"
    return ""


def share(values: dict[str, float], unit: tuple[str, ...], sizes: dict[str, int]) -> dict[str, dict[str, float]]:
    """A unit's values split among its layers in proportion to their sizes."""
    total = sum(sizes[n] for n in unit)
    return {n: {m: v * sizes[n] / total for m, v in values.items()} for n in unit}


class ProfileSetup:
    """Everything one profile call decided: names, units, cache, settings."""

    def __init__(self, loaded, calib_ids, options, metrics, granularity, plan, kl_windows, kl_stride,
                 fisher_samples, seed, cache_dir, batch_size, measured, lean_memory):
        self.model = loaded.model
        self.prefix, self.blocks = find_blocks(self.model)
        self.measured = block_range(measured, len(self.blocks))
        self.options, self.metrics, self.granularity, self.plan = options, metrics, granularity, plan
        self.settings = {m: metric_settings(m, kl_windows, fisher_samples, seed, kl_stride) for m in METRICS}
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self.calib_key = ids_hash(calib_ids)
        self.shapes = {s.name: s for s in layer_shapes(self.model)}
        key = f"{loaded.fingerprint}-{self.calib_key}-{self.dtype}"
        if granularity != "linear":
            key += f"-{granularity}"
        if plan:
            plan_text = json.dumps({k: str(v) for k, v in sorted(plan.items())}).encode()
            self.plan_hash = hashlib.sha256(plan_text).hexdigest()[:12]
            key += f"-interaction{self.plan_hash}"
        else:
            self.plan_hash = None
        whole = self.measured == range(len(self.blocks))
        self.cache = BlockCache(cache_dir, key, "" if whole else f"-{self.measured.start}-{self.measured.stop - 1}")
        self.batch_size, self.lean_memory = batch_size, lean_memory

    def full(self, index: int, name: str) -> str:
        return f"{self.prefix}.{index}.{name}"


def block_range(blocks: range | None, count: int) -> range:
    if blocks is None:
        return range(count)
    if not isinstance(blocks, range) or blocks.step != 1 or not 0 <= blocks.start < blocks.stop <= count:
        raise BitallocError(f"blocks must be a non-empty contiguous range within 0..{count - 1}, got {blocks}")
    return blocks


def pending(setup: ProfileSetup, index: int, units, cached: list[dict], force: bool):
    """(valid cached values by (layer, option), (unit, option) pairs missing a block / linear metric).

    Valid values are {"values": {metric: v}, "settings": {metric: s}}; a requested metric whose
    stored settings or quantizer version differ is dropped (and reported), never reused.
    """
    layers = {setup.full(index, n) for unit in units for n in unit}
    valid: dict[tuple[str, str], dict] = {}
    stale = 0
    for row in [] if force else cached:
        option = next((o for o in setup.options if str(o) == row["option"]), None)
        if option is None or row["layer"] not in layers:
            continue
        values, settings = dict(row["values"]), dict(row.get("settings", {}))
        for metric in list(values):
            wrong_version = row.get("version") != version_of(option)
            if wrong_version or settings.get(metric) != setup.settings[metric]:
                stale += metric in setup.metrics
                values.pop(metric)
                settings.pop(metric, None)
        valid[(row["layer"], row["option"])] = {"values": values, "settings": settings}
    if stale:
        log.warning("block %d: %d cached values were made by another quantizer version or metric setting; "
                    "measuring them again", index, stale)
    missing = {"block": [], "linear": []}
    for unit in units:
        for option in setup.options:
            have = [valid.get((setup.full(index, n), str(option)), {}).get("values", {}) for n in unit]
            for kind in missing:
                if any(METRICS[m].kind == kind and any(m not in h for h in have) for m in setup.metrics):
                    missing[kind].append((unit, option))
    return valid, missing


def merge(setup: ProfileSetup, index: int, valid: dict, new_values: dict, units_of: dict) -> list[dict]:
    """Cached rows updated with newly measured unit values (shared among the unit's layers)."""
    for (unit, option), values in new_values.items():
        sizes = {n: setup.shapes[setup.full(index, n)].numel for n in unit}
        for metric, value in values.items():
            check_value(value, f"{metric} of {'+'.join(setup.full(index, n) for n in unit)} at {option}")
        for name, shared in share(values, unit, sizes).items():
            entry = valid.setdefault((setup.full(index, name), str(option)), {"values": {}, "settings": {}})
            entry["values"].update(shared)
            entry["settings"].update({m: setup.settings[m] for m in shared})
    rows = []
    for (layer, option), entry in sorted(valid.items()):
        opt = next(o for o in setup.options if str(o) == option)
        row = {"layer": layer, "option": option, "version": version_of(opt), **entry}
        unit = units_of.get(layer.removeprefix(f"{setup.prefix}.{index}."))
        if unit is not None and len(unit) > 1:
            row["unit"] = [setup.full(index, n) for n in unit]
        rows.append(row)
    return rows
