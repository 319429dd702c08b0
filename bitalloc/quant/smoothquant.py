"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before
quantizing both.

Per input channel j, s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha) (alpha, the
migration strength, is the option parameter `alpha`, default 0.85).  The layer
computes (W * s) against x / s: the activations lose their outlier channels
(easier per-token quantization, the `aN` part of the option), the weights take
them on (W * s is quantized round-to-nearest in the option's format; `clip=1`
adds the clipping search).  Channels that never fire keep s = 1.

Where s lives.  Every layer stores its own s as act_scale (float16) and divides
its input by s at run time, in the same pass that quantizes the activations (a
fused kernel reads x once for both).  That is always correct, whatever options a
mixed plan gives the layers that read the same tensor.  Folding s away instead
is possible only when every linear reading one tensor uses the very same s
(same method and alpha, s computed from the group's concatenated weights rather
than each layer's own): for q/k/v and gate/up, divide the preceding RMSNorm's
weight (and a LayerNorm's bias) by s; for o_proj and down_proj, which have no
norm before them, divide the rows of up_proj, or of v_proj (with grouped KV
heads only if s is equal across the query heads sharing a KV head), by s,
before those layers are quantized themselves.  A
plan that gives one option per tie group (`--tie fused`) meets the condition;
a per-layer plan in general does not, so bitalloc keeps the per-layer act_scale.
"""
from __future__ import annotations

import torch

from . import formats
from .calib import LayerCalib
from .option import Option
from .qweight import QuantizedWeight
from .registry import Param, flag, register_quantizer
from .rtn import channel_weight, rtn_quantize

DEFAULT_ALPHA = 0.85


def smoothing_scale(w: torch.Tensor, calib: LayerCalib, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max|W_j|^(1-alpha), float16 values; 1 where a channel or column is all zero."""
    x_max, w_max = calib.abs_max, w.abs().amax(0)
    live = (x_max > 0) & (w_max > 0)
    s = x_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    s = torch.where(live, s.clamp(1e-4, 1e4), torch.ones_like(s))
    return formats.to_storage(s, "SmoothQuant scales")


@register_quantizer("smoothquant", version="1", needs_calibration=True, transforms_input=True,
                    params={"alpha": Param(float, lambda v: 0 <= v <= 1, "in [0, 1]"), "clip": flag()})
def quantize_smoothquant(w: torch.Tensor, option: Option, calib: LayerCalib) -> QuantizedWeight:
    s = smoothing_scale(w, calib, option.param("alpha", DEFAULT_ALPHA, float))
    qw = rtn_quantize(w * s, option, channel_weight(calib, w.shape[1]) / s**2)
    qw.act_scale = s
    return qw
