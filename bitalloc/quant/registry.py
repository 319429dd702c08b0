"""One registry for quantization methods: name -> pure function with one signature.

    quantize(weight [out, in] float32, option, calib: LayerCalib | None) -> QuantizedWeight

Adding a method is one module with one `@register_quantizer` line, plus an import
in `bitalloc/quant/__init__.py`.  The version string enters cache keys, so bump
it whenever the method's output changes.

Three things are handled here for every method alike: NaN checks, the option's
parameters (each method declares the ones it reads, with the values that make
sense, so a misspelt or impossible parameter stops before any work instead of
being ignored or failing deep inside), and MixQ-style outlier channels (option
parameter `outliers=N`): the N input channels with the largest calibration
max |x| (after the method's own input transform x / s) keep their weight
columns in float16 and skip activation quantization.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import BitallocError
from ..guards import check_quantized
from . import formats
from .calib import LayerCalib
from .option import Option
from .qweight import QuantizedWeight


@dataclass(frozen=True)
class Param:
    """An option parameter a method reads: its type, and the values it accepts (`valid`, said in `what`)."""
    cast: type
    valid: Callable[[float], bool]
    what: str


def flag() -> Param:
    return Param(int, lambda v: v in (0, 1), "0 or 1")


def at_least(low: float, cast: type = int) -> Param:
    return Param(cast, lambda v: v >= low, f"at least {low}")


def positive(cast: type = float) -> Param:
    return Param(cast, lambda v: v > 0, "above 0")


COMMON_PARAMS = {"outliers": at_least(0)}  # read here, for every method


@dataclass(frozen=True)
class Quantizer:
    name: str
    fn: Callable[[torch.Tensor, Option, LayerCalib | None], QuantizedWeight]
    version: str
    needs_calibration: bool | Callable[[Option], bool]  # a rule when only some of the method's options calibrate
    formats: tuple[str, ...]
    transforms_input: bool  # stores a per-input-channel act_scale (AWQ, SmoothQuant)
    params: dict[str, Param]  # the option parameters the method reads


QUANTIZERS: dict[str, Quantizer] = {}


def register_quantizer(name: str, version: str, needs_calibration: bool | Callable[[Option], bool] = False,
                       formats: tuple[str, ...] = ("int", "fp8e4m3", "fp8e5m2", "fp4", "nf4"),
                       transforms_input: bool = False, params: dict[str, Param] | None = None):
    def decorate(fn):
        QUANTIZERS[name] = Quantizer(name, fn, version, needs_calibration, formats, transforms_input,
                                     {**COMMON_PARAMS, **(params or {})})
        return fn

    return decorate


def get_quantizer(name: str) -> Quantizer:
    try:
        return QUANTIZERS[name]
    except KeyError:
        known = ", ".join(sorted(QUANTIZERS))
        raise BitallocError(f"unknown quantization method '{name}' (known: {known})") from None


def check_option(option: Option) -> None:
    """Raise BitallocError if no registered method can produce this option, or a parameter is unknown to the
    method or out of its range."""
    if not option.quantized:
        return
    quantizer = get_quantizer(option.method)
    if option.fmt not in quantizer.formats:
        raise BitallocError(f"method '{option.method}' does not support format '{option.format_name}' ({option})")
    for key, _ in option.params:
        param = quantizer.params.get(key)
        if param is None:
            known = ", ".join(sorted(quantizer.params))
            raise BitallocError(f"option '{option}': method '{option.method}' has no parameter '{key}' "
                                f"(it reads: {known})")
        value = option.param(key, cast=param.cast)
        if not param.valid(value):
            raise BitallocError(f"option '{option}': {key} must be {param.what}, got {value}")


def method_needs_calibration(option: Option) -> bool:
    """Whether the option's method itself needs the layer's LayerCalib for this option."""
    rule = get_quantizer(option.method).needs_calibration
    return rule(option) if callable(rule) else rule


def needs_calibration(option: Option) -> bool:
    """Whether quantizing with this option needs the layer's LayerCalib (the method's, or outlier selection).

    Every caller asks this one question, so profile, search and apply give a layer the same inputs.
    """
    if not option.quantized:
        return False
    return method_needs_calibration(option) or option.param("outliers", 0, int) > 0


def outlier_channels(calib: LayerCalib, act_scale: torch.Tensor | None, count: int) -> torch.Tensor:
    """The `count` input channels with the largest max |x / s|, in ascending channel order."""
    magnitude = calib.abs_max if act_scale is None else calib.abs_max / act_scale
    order = torch.sort(magnitude, descending=True, stable=True).indices
    return order[:count].sort().values


def _keep_outliers(qw: QuantizedWeight, weight: torch.Tensor, calib: LayerCalib, count: int) -> QuantizedWeight:
    """The float16 outlier columns, for methods that do not choose and fit them themselves (gptq does)."""
    if qw.outlier_idx is not None:
        return qw
    idx = outlier_channels(calib, qw.act_scale, count)
    scaled = weight if qw.act_scale is None else weight * qw.act_scale
    qw.outlier_idx = idx
    qw.outlier_weight = formats.to_storage(scaled[:, idx], "outlier weights")
    return qw


def quantize(weight: torch.Tensor, option: Option, calib: LayerCalib | None = None,
             layer: str = "weight") -> QuantizedWeight:
    """Quantize one layer's weight with the option's method; `layer` names it in errors."""
    check_option(option)
    quantizer = get_quantizer(option.method)
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).nonzero()[0].tolist()
        raise BitallocError(f"layer {layer} has a NaN/Inf weight at {tuple(bad)}; refusing to quantize it")
    if needs_calibration(option) and calib is None:
        what = f"method '{option.method}'" if method_needs_calibration(option) else "outlier selection (outliers=N)"
        raise BitallocError(f"{what} needs calibration inputs for layer {layer}")
    weight = weight.detach().float()
    outliers = option.param("outliers", 0, int)
    if outliers >= weight.shape[1]:
        raise BitallocError(f"layer {layer}: outliers={outliers} must be fewer than the layer's {weight.shape[1]} "
                            f"input channels")
    try:
        qw = quantizer.fn(weight, option, calib)
        if outliers:
            qw = _keep_outliers(qw, weight, calib, outliers)
    except BitallocError as err:
        raise BitallocError(f"layer {layer}: {err}") from None
    check_quantized(qw, layer)
    return qw


def versions() -> dict[str, str]:
    return {name: q.version for name, q in sorted(QUANTIZERS.items())}
