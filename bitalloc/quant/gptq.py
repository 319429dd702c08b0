"""GPTQ (Frantar et al. 2022): quantize columns one at a time and push each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian
of the layer's output error, H = 2 X^T X / n (from LayerCalib).

Option parameters:
    damp=0.01        added to H's diagonal, as a fraction of its mean (numerical safety)
    block=128        columns updated lazily together (the error of a block reaches the
                     rest of the matrix in one matmul instead of column by column)
    act_order=1      quantize columns in order of decreasing H_jj (largest inputs first)
    static_groups=0  fit every group's scale from the original weights before starting;
                     with act_order and groups this is implied, because the stored
                     layout keeps groups of consecutive columns (there is no g_idx):
                     a group's columns are then reached out of order, so its scale
                     must exist before its first column is quantized.
Without static groups a group's scale is fitted when its first column is reached,
on the weights as updated by the errors of the groups before it (the GPTQ default).

With outliers=N the N input channels kept in float16 are not rounded: they go
last, so they take the error feedback of every other column instead of pushing
theirs onto the rest, and their final values are what is kept (OWQ/SpQR-style).
Their place in the order makes the scales static.

Which inputs the Hessian comes from is the caller's business: `quantize_model`
runs the block's layers in groups (q/k/v, then o, then gate/up, then down) and
collects each group's inputs from the block with the earlier groups already
quantized ("true sequential").
"""
from __future__ import annotations

import torch

from . import formats
from .calib import LayerCalib
from .option import Option
from .qweight import QuantizedWeight, quantize_with_scales
from .registry import at_least, flag, outlier_channels, positive, register_quantizer


def _round_column(column, option: Option, scale, zero):
    """Quantize-dequantize one column [out] with per-row scale/zero [out]."""
    zero = None if zero is None else zero[:, None]
    codes = formats.quantize_groups(column[:, None, None], option.fmt, option.bits, scale[:, None], zero)
    return formats.dequantize_groups(codes, option.fmt, option.bits, scale[:, None], zero)[:, 0, 0]


def gptq_quantize(w: torch.Tensor, option: Option, hessian: torch.Tensor, damp: float = 0.01, block: int = 128,
                  act_order: bool = True, static_groups: bool = False,
                  exact: torch.Tensor | None = None) -> QuantizedWeight:
    """GPTQ on one weight matrix [out, in] given its Hessian [in, in] (float32); `exact` lists input
    channels kept in float16 (the result's outlier columns)."""
    weight = w.clone()
    h = hessian.clone()
    out_features, in_features = weight.shape
    dead = h.diagonal() == 0  # inputs that were always zero: any value is free; pin it to 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0

    group = option.group_size if 0 < option.group_size < in_features else 0
    kept = torch.zeros(in_features, dtype=torch.bool)
    if exact is not None:
        kept[exact] = True
    static = group == 0 or static_groups or act_order or bool(kept.any())
    if static:
        scales, zeros = formats.fit_scales(formats.to_groups(weight, option.group_size), option.fmt, option.bits,
                                           option.sym)
    else:
        n_groups = formats.num_groups(in_features, group)
        scales = torch.ones(out_features, n_groups)
        zeros = None if option.fmt != "int" or option.sym else torch.zeros(out_features, n_groups)

    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(in_features)
    perm = torch.cat([perm[~kept[perm]], perm[kept[perm]]])  # float16 channels last: they absorb the errors
    kept = kept[perm]
    weight, h = weight[:, perm], h[perm][:, perm]
    group_of = (perm // group) if group else torch.zeros(in_features, dtype=torch.long)

    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    result = torch.empty_like(weight)
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        w_block = weight[:, start:end].clone()
        errors = torch.empty_like(w_block)
        h_block = hinv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            g = int(group_of[column])
            if not static and column % group == 0:  # first column of a group: fit its scale now
                span = torch.cat([w_block[:, i:], weight[:, end:]], dim=1)[:, :group]
                s, z = formats.fit_scales(span[:, None, :], option.fmt, option.bits, option.sym)
                scales[:, g] = s[:, 0]
                if zeros is not None:
                    zeros[:, g] = z[:, 0]
            if kept[column]:
                q = w_block[:, i]
            else:
                q = _round_column(w_block[:, i], option, scales[:, g], None if zeros is None else zeros[:, g])
            result[:, column] = q
            err = (w_block[:, i] - q) / h_block[i, i]
            w_block[:, i:] -= err[:, None] * h_block[i, i:][None, :]
            errors[:, i] = err
        weight[:, end:] -= errors @ hinv[start:end, end:]

    dequantized = result[:, torch.argsort(perm)]
    qw = quantize_with_scales(dequantized, option, scales, zeros)
    if exact is not None:
        qw.outlier_idx = exact
        qw.outlier_weight = formats.to_storage(dequantized[:, exact], "outlier weights")
    return qw


@register_quantizer("gptq", version="2", needs_calibration=True,
                    params={"damp": positive(), "block": at_least(1), "act_order": flag(), "static_groups": flag()})
def quantize_gptq(w: torch.Tensor, option: Option, calib: LayerCalib) -> QuantizedWeight:
    count = option.param("outliers", 0, int)
    return gptq_quantize(
        w, option, calib.hessian(),
        damp=option.param("damp", 0.01, float), block=option.param("block", 128, int),
        act_order=bool(option.param("act_order", 1, int)), static_groups=bool(option.param("static_groups", 0, int)),
        exact=outlier_channels(calib, None, count) if count else None,
    )
