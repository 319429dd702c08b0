"""One registry for quantization methods: name -> pure function with one signature.

    quantize(weight [out, in] float32, option, calib: LayerCalib | None) -> QuantizedWeight

Adding a method is one module with one `@register_quantizer` line, plus an import
in `bitalloc/quant/__init__.py`.  The version string enters cache keys, so bump
it whenever the method's output changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import BitallocError
from ..guards import check_quantized
from .calib import LayerCalib
from .option import Option
from .qweight import QuantizedWeight


@dataclass(frozen=True)
class Quantizer:
    name: str
    fn: Callable[[torch.Tensor, Option, LayerCalib | None], QuantizedWeight]
    version: str
    needs_calibration: bool
    formats: tuple[str, ...]
    transforms_input: bool  # stores a per-input-channel act_scale (AWQ, SmoothQuant)


QUANTIZERS: dict[str, Quantizer] = {}


def register_quantizer(name: str, version: str, needs_calibration: bool = False,
                       formats: tuple[str, ...] = ("int", "fp8e4m3", "fp8e5m2", "fp4", "nf4"),
                       transforms_input: bool = False):
    def decorate(fn):
        QUANTIZERS[name] = Quantizer(name, fn, version, needs_calibration, formats, transforms_input)
        return fn

    return decorate


def get_quantizer(name: str) -> Quantizer:
    try:
        return QUANTIZERS[name]
    except KeyError:
        known = ", ".join(sorted(QUANTIZERS))
        raise BitallocError(f"unknown quantization method '{name}' (known: {known})") from None


def check_option(option: Option) -> None:
    """Raise BitallocError if no registered method can produce this option."""
    if not option.quantized:
        return
    quantizer = get_quantizer(option.method)
    if option.fmt not in quantizer.formats:
        raise BitallocError(f"method '{option.method}' does not support format '{option.format_name}' ({option})")


def quantize(weight: torch.Tensor, option: Option, calib: LayerCalib | None = None,
             layer: str = "weight") -> QuantizedWeight:
    """Quantize one layer's weight with the option's method; `layer` names it in errors."""
    check_option(option)
    quantizer = get_quantizer(option.method)
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).nonzero()[0].tolist()
        raise BitallocError(f"layer {layer} has a NaN/Inf weight at {tuple(bad)}; refusing to quantize it")
    if quantizer.needs_calibration and calib is None:
        raise BitallocError(f"method '{option.method}' needs calibration inputs for layer {layer}")
    try:
        qw = quantizer.fn(weight.detach().float(), option, calib)
    except BitallocError as err:
        raise BitallocError(f"layer {layer}: {err}") from None
    check_quantized(qw, layer)
    return qw


def versions() -> dict[str, str]:
    return {name: q.version for name, q in sorted(QUANTIZERS.items())}
