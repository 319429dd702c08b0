"""A plan as a GPTQModel/vLLM quantize config (quantize_config.json) with per-module `dynamic` overrides.

GPTQModel's QuantizeConfig holds one base setting (bits, group_size, sym, desc_act) and a
`dynamic` dict: each key is a regex matched from the start of a module's full name, "+:" (or no
prefix) overriding the base with the value's keys, "-:" leaving the module unquantized.  vLLM
reads the same keys for GPTQ checkpoints, but matches them against its fused modules
(`qkv_proj` for q/k/v, `gate_up_proj` for gate/up), which must therefore share one setting.

The base is the setting that covers the most weights; every other unit (a fused set, or a single
layer) gets one anchored override naming its blocks and modules, its fused name included.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict

from .. import __version__
from ..errors import BitallocError
from ..quant.option import Option
from ..quant.registry import get_quantizer
from . import ExportInput, register_exporter

BITS = (2, 3, 4, 8)  # what GPTQ checkpoints and vLLM's GPTQ kernels store
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # -1: one group per row
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # vLLM's packing


def settings(layer: str, option: Option, in_features: int) -> dict | None:
    """The GPTQ keys for one layer's option (None: keep it unquantized), or a BitallocError why not."""
    if not option.quantized:
        return None
    where = f"layer {layer} ({option})"
    if option.fmt != "int":
        raise BitallocError(f"{where}: GPTQ checkpoints store integers, not {option.format_name}")
    if option.bits not in BITS:
        raise BitallocError(f"{where}: GPTQModel/vLLM GPTQ kernels support {', '.join(map(str, BITS))} bits, "
                            f"not {option.bits}")
    group = option.group_size or -1
    if group not in GROUP_SIZES:
        raise BitallocError(f"{where}: group size {group} is not one GPTQModel accepts ({GROUP_SIZES})")
    if group != -1 and in_features % group:
        raise BitallocError(f"{where}: its {in_features} input columns are not a multiple of the group size {group}, "
                            f"which vLLM's GPTQ layers require")
    if option.act_bits != 16:
        raise BitallocError(f"{where}: GPTQ is weight-only; {option.act_bits}-bit activations cannot be expressed")
    if option.param("outliers", 0, int) or get_quantizer(option.method).transforms_input:
        raise BitallocError(f"{where}: outlier columns and input transforms have no place in a GPTQ checkpoint")
    return {"bits": option.bits, "group_size": group, "sym": option.sym, "desc_act": False}


def _units(data: ExportInput) -> list[tuple[int, tuple[str, ...]]]:
    """(block, local names) that get one override: a vLLM fused set where the block has all of it, else one layer.

    The plan's own tie groups need nothing more: `check_against` already made their options equal.
    """
    remaining = dict.fromkeys(data.assignment)
    units = []
    for layer in data.assignment:
        if layer not in remaining:
            continue
        parent, _, name = layer.rpartition(".")
        members = next((m for m in FUSED.values() if m[0] == name), (name,))
        full = [f"{parent}.{m}" for m in members]
        full = full if all(f in remaining for f in full) else [layer]
        for f in full:
            del remaining[f]
        units.append((data.split(layer)[0], tuple(data.split(f)[1] for f in full)))
    return units


def _pattern(prefix: str, blocks: list[int], locals_: tuple[str, ...]) -> str:
    """Anchored regex for these modules in these blocks, plus vLLM's fused name when they form one."""
    parent = locals_[0].rpartition(".")[0]
    names = [name.rpartition(".")[2] for name in locals_]
    names += [fused for fused, members in FUSED.items() if tuple(names) == members]
    indices = "|".join(map(str, blocks))
    head = re.escape(f"{prefix}.") + f"(?:{indices})" + re.escape(f".{parent}." if parent else ".")
    return f"^{head}(?:{'|'.join(map(re.escape, names))})$"


@register_exporter("gptqmodel")
def export_gptqmodel(data: ExportInput) -> tuple[str, list[str]]:
    """quantize_config.json text, and notes for the person running the export."""
    chosen: dict[tuple[int, tuple[str, ...]], dict | None] = {}
    weight: dict[str, int] = defaultdict(int)
    for index, locals_ in _units(data):
        layers = [f"{data.prefix}.{index}.{local}" for local in locals_]
        found = [settings(layer, data.assignment[layer], data.shapes[layer].in_features) for layer in layers]
        if any(f != found[0] for f in found):
            raise BitallocError(f"layers {', '.join(layers)} must share one setting (vLLM fuses them into one "
                                f"module) but the plan gives them different options; search with --tie fused")
        chosen[(index, locals_)] = found[0]
        if found[0] is not None:
            weight[json.dumps(found[0], sort_keys=True)] += sum(data.shapes[layer].numel for layer in layers)
    if not weight:
        raise BitallocError("the plan quantizes no layer; there is nothing for GPTQModel to do")
    base = json.loads(max(sorted(weight), key=weight.get))
    overrides: dict[tuple[str, tuple[str, ...]], list[int]] = defaultdict(list)
    for (index, locals_), found in chosen.items():
        if found != base:
            overrides[(json.dumps(found, sort_keys=True), locals_)].append(index)
    dynamic = {}
    for (found, locals_), blocks in sorted(overrides.items(), key=lambda item: (item[1][0], item[0][1])):
        value = json.loads(found)
        sign = "-" if value is None else "+"
        dynamic[f"{sign}:{_pattern(data.prefix, blocks, locals_)}"] = {} if value is None else value
    config = {**base, "lm_head": False, "quant_method": "gptq", "checkpoint_format": "gptq", "dynamic": dynamic,
              "meta": {"quantizer": [f"bitalloc:{__version__}"], "plan_model": data.plan.model,
                       "plan_fingerprint": data.plan.fingerprint}}
    notes = [f"base: {base['bits']} bits, group {base['group_size']}, {'sym' if base['sym'] else 'asym'}; "
             f"{len(dynamic)} dynamic overrides",
             "GPTQModel re-quantizes with GPTQ at these settings; the plan's own codes are not carried over"]
    return json.dumps(config, indent=2, sort_keys=True) + "\n", notes
