"""Round-to-nearest with min/max group scales and an optional clipping search.

Parameters (option `key=value`): `clip=1` searches shrink ratios of the group
range and keeps, per group, the one with the least weight MSE; `clip=2` weighs
each input channel's squared error by E[x^2] (the diagonal of the Hessian, an
output-error proxy) and so needs calibration.  Weight MSE clips the largest
weights hardest, which on models with massive activations costs more than it
saves (docs/RESULTS.md, issue 4); the output-weighted search sees that.
Whether calibration is used depends only on the option, never on whether some
other layer's method happened to collect it, so profile and apply agree.
"""
from __future__ import annotations

import torch

from . import formats
from .calib import LayerCalib
from .option import Option
from .qweight import QuantizedWeight, quantize_with_scales
from .registry import Param, register_quantizer

CLIP_GRID = torch.linspace(1.0, 0.7, 16)


def channel_weight(calib: LayerCalib | None, in_features: int) -> torch.Tensor:
    """E[x_j^2] per input channel (ones without calibration): how much channel j's weight error costs."""
    if calib is None:
        return torch.ones(in_features)
    return calib.hessian().diagonal().clamp_min(1e-8)


def _group_error(wg, option, clip, weight_g):
    scales, zeros = formats.fit_scales(wg, option.fmt, option.bits, option.sym, clip)
    codes = formats.quantize_groups(wg, option.fmt, option.bits, scales, zeros)
    err = (formats.dequantize_groups(codes, option.fmt, option.bits, scales, zeros) - wg) ** 2
    return (err * weight_g).sum(-1), scales, zeros


def clip_search(w: torch.Tensor, option: Option, weights: torch.Tensor, grid: torch.Tensor = CLIP_GRID):
    """Per-group scales/zeros minimising the channel-weighted squared error over `grid`.

    Returns (scales, zeros, ratio): `ratio` [out, n_groups] is the chosen shrink factor.
    """
    wg = formats.to_groups(w, option.group_size)
    weight_g = formats.to_groups(weights[None], option.group_size)[0] * formats.real_columns(w.shape[1],
                                                                                             option.group_size)
    best = None
    for ratio in grid:
        err, scales, zeros = _group_error(wg, option, ratio, weight_g)
        if best is None:
            best = [err, scales, zeros, torch.full_like(err, float(ratio))]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better, scales, best[1])
        if zeros is not None:
            best[2] = torch.where(better, zeros, best[2])
        best[3] = torch.where(better, ratio, best[3])
    return best[1], best[2], best[3]


def rtn_quantize(w: torch.Tensor, option: Option, weights: torch.Tensor | None = None) -> QuantizedWeight:
    """Min/max scales, or the clipping search when `option` has clip=1 (weighted by `weights`)."""
    if option.param("clip", 0, int):
        weights = torch.ones(w.shape[1]) if weights is None else weights
        scales, zeros, _ = clip_search(w, option, weights)
    else:
        scales, zeros = formats.fit_scales(formats.to_groups(w, option.group_size), option.fmt, option.bits, option.sym)
    return quantize_with_scales(w, option, scales, zeros)


def _output_weighted(option: Option) -> bool:
    return option.param("clip", 0, int) == 2


@register_quantizer("rtn", version="4", needs_calibration=_output_weighted,
                    params={"clip": Param(int, lambda v: v in (0, 1, 2), "0, 1 or 2")})
def quantize_rtn(w: torch.Tensor, option: Option, calib: LayerCalib | None = None) -> QuantizedWeight:
    return rtn_quantize(w, option, channel_weight(calib if _output_weighted(option) else None, w.shape[1]))
