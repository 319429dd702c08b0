"""Budgets as users write them, resolved against the model's layers.

    4.5 or 4.5bits         average bits per quantizable weight (scales/zeros included)
    60MB, 57MiB, 123456B   bytes of the quantized linears
    rtn:int3:g64:asym      the bytes of that option applied uniformly
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .cost import LayerShape, layer_bytes
from .errors import BitallocError
from .quant.option import Option, parse

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Budget:
    kind: str  # a cost kind the solvers know: "bytes"
    limit: float
    spec: str
    uniform: Option | None = None  # set when the budget was given as a uniform option

    def to_json(self) -> dict:
        return {"kind": self.kind, "limit": self.limit, "spec": self.spec}


def parse_budget(text: str, shapes: list[LayerShape]) -> Budget:
    spec = str(text).strip()
    numel = sum(s.numel for s in shapes)
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(bits?)?", spec, flags=re.I)
    if match:
        bits = float(match.group(1))
        if not 0 < bits <= 32:
            raise BitallocError(f"budget '{spec}': average bits must be in (0, 32]")
        return Budget("bytes", math.floor(bits * numel / 8), spec)
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmg]i?b|b)", spec, flags=re.I)
    if match:
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
        return Budget("bytes", math.floor(value), spec)
    if ":" in spec or spec == "fp16":
        option = parse(spec)
        return Budget("bytes", sum(layer_bytes(s, option) for s in shapes), spec, option)
    raise BitallocError(f"cannot read budget '{spec}': use average bits (4.5), bytes (60MB) or an option (rtn:int4:g64:asym)")
