"""AWQ (Lin et al. 2023): protect the weights that meet large activations by scaling.

Per input channel j the layer computes (W[:, j] * s_j) (x_j / s_j): the same
function, but the channels with large mean |x_j| get larger weights, so rounding
costs them relatively less.  s = mean|x|^r / mean|w|^(1-r) (normalised to
geometric mean 1), with r searched over a grid; the scale s = 1 (plain RTN) is
always a candidate, so AWQ never does worse than RTN on its own objective.  Then,
as AutoAWQ does, the group ranges of W * s are clipped (a grid of shrink ratios
down to 0.5, error weighted by E[(x/s)^2]).

The objective is the layer's squared output error over every calibration token,
computed exactly from X^T X (LayerCalib) without storing activations.  AutoAWQ
measures it on the output of the module the layers feed (the attention or MLP)
and folds s into the preceding norm; here each layer gets its own s, stored as
the layer's act_scale and applied to its input at run time, so any mix of
methods per layer stays correct (see smoothquant.py on folding).

Option fields map to AutoAWQ's: w_bit = bits, q_group_size = group size,
zero_point = asym.  Parameters: grid=20 (ratios tried), duo=1 (divide by
mean|w|^(1-r); duo=0 uses mean|x|^r alone), clip=1 (the clipping search).
Modes: 'real' is the default path (codes packed by QuantLinear), 'fake' and
'scale' (the scaled float model) are `quantize_model(..., mode=...)`.
"""
from __future__ import annotations

import torch

from . import formats
from .calib import LayerCalib, output_error
from .option import Option
from .qweight import QuantizedWeight, quantize_with_scales
from .registry import at_least, flag, register_quantizer
from .rtn import channel_weight, clip_search

CLIP_GRID = torch.linspace(1.0, 0.5, 21)


def _rounded(w: torch.Tensor, option: Option) -> torch.Tensor:
    wg = formats.to_groups(w, option.group_size)
    scales, zeros = formats.fit_scales(wg, option.fmt, option.bits, option.sym)
    codes = formats.quantize_groups(wg, option.fmt, option.bits, scales, zeros)
    return formats.from_groups(formats.dequantize_groups(codes, option.fmt, option.bits, scales, zeros), w.shape[1])


def search_scale(w: torch.Tensor, option: Option, calib: LayerCalib, grid: int = 20, duo: bool = True) -> torch.Tensor:
    """The per-input-channel scale s (float16 values) minimising the layer's output error."""
    hessian = calib.hessian()
    x_mean = calib.act_mean().clamp_min(1e-4)
    magnitude = formats.to_groups(w.abs(), option.group_size)
    normalised = magnitude / magnitude.amax(-1, keepdim=True).clamp_min(1e-8)
    w_mean = formats.from_groups(normalised, w.shape[1]).mean(0).clamp_min(1e-4)
    candidates = [torch.ones(w.shape[1])]
    for ratio in torch.arange(grid) / grid:
        s = x_mean.pow(ratio) / w_mean.pow(1 - ratio) if duo else x_mean.pow(ratio)
        candidates.append(s / (s.max() * s.min()).sqrt())
    best, best_error = None, None
    for s in candidates:
        s = formats.to_storage(s.clamp(1e-4, 1e4), "AWQ scales")
        error = float(output_error(_rounded(w * s, option) / s - w, hessian).sum())
        if best_error is None or error < best_error:
            best, best_error = s, error
    return best


@register_quantizer("awq", version="2", needs_calibration=True, transforms_input=True,
                    params={"grid": at_least(1), "duo": flag(), "clip": flag()})
def quantize_awq(w: torch.Tensor, option: Option, calib: LayerCalib) -> QuantizedWeight:
    s = search_scale(w, option, calib, option.param("grid", 20, int), bool(option.param("duo", 1, int)))
    scaled = w * s
    if option.param("clip", 1, int):
        scales, zeros, _ = clip_search(scaled, option, channel_weight(calib, w.shape[1]) / s**2, CLIP_GRID)
    else:
        scales, zeros = formats.fit_scales(formats.to_groups(scaled, option.group_size), option.fmt, option.bits,
                                           option.sym)
    qw = quantize_with_scales(scaled, option, scales, zeros)
    qw.act_scale = s
    return qw
