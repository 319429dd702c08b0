"""Round-to-nearest with min/max group scales and an optional clipping search.

Parameters (option `key=value`): `clip=1` searches shrink ratios of the group
range and keeps, per group, the one with the least error; the error is the
weight MSE, or the output error E[(dW x)^2] when calibration statistics are given.
"""
from __future__ import annotations

import torch

from . import formats
from .calib import LayerCalib
from .option import Option
from .qweight import QuantizedWeight, quantize_with_scales
from .registry import register_quantizer

CLIP_GRID = torch.linspace(1.0, 0.7, 16)


def _group_error(wg, option, clip, channel_weight):
    scales, zeros = formats.fit_scales(wg, option.fmt, option.bits, option.sym, clip)
    codes = formats.quantize_groups(wg, option.fmt, option.bits, option.sym, scales, zeros)
    err = (formats.dequantize_groups(codes, option.fmt, option.bits, scales, zeros) - wg) ** 2
    return (err * channel_weight).sum(-1), scales, zeros


def clipped_scales(w: torch.Tensor, option: Option, calib: LayerCalib | None):
    """Per-group scales minimising (activation-weighted) squared error over CLIP_GRID."""
    wg = formats.to_groups(w, option.group_size)
    channel_weight = torch.ones(w.shape[1])
    if calib is not None:
        channel_weight = calib.hessian().diagonal().clamp_min(1e-8)
    channel_weight = formats.to_groups(channel_weight[None], option.group_size)[0]
    best = None
    for ratio in CLIP_GRID:
        err, scales, zeros = _group_error(wg, option, ratio, channel_weight)
        if best is None:
            best = [err, scales, zeros]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better, scales, best[1])
        if zeros is not None:
            best[2] = torch.where(better, zeros, best[2])
    return best[1], best[2]


@register_quantizer("rtn", version="1")
def quantize_rtn(w: torch.Tensor, option: Option, calib: LayerCalib | None = None) -> QuantizedWeight:
    if option.param("clip", 0, int):
        scales, zeros = clipped_scales(w, option, calib)
    else:
        scales, zeros = formats.fit_scales(formats.to_groups(w, option.group_size), option.fmt, option.bits, option.sym)
    return quantize_with_scales(w, option, scales, zeros)
