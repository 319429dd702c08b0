"""HQQ (Badri & Shaji 2023): half-quadratic optimisation of the zero points, no calibration.

Starting from min/max scales, alternate (1) rounding with the current zero, (2) a
sparse estimate of the rounding error through the generalised soft-threshold of
an l_p norm (p < 1: heavy-tailed errors, a few large ones are tolerated), and
(3) the closed-form zero that best explains the weights given that error;
beta, the quadratic penalty, grows by kappa each step.  Each group keeps the
zero with the least l_p error seen.  Zeros are real numbers (float16), not
integers: the layer dequantizes (code - zero) * scale as for any asymmetric format.

Parameters: iters=20, lp=0.7, beta=10, kappa=1.01 (HQQ's defaults).  Integer
formats with zero points (asym) only: the zero is what HQQ optimises.
"""
from __future__ import annotations

import torch

from . import formats
from ..errors import BitallocError
from .option import Option
from .qweight import QuantizedWeight
from .registry import Param, at_least, positive, register_quantizer


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal step of the l_p norm (generalised soft-thresholding)."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp_min(1e-12).pow(p - 1) / beta)


def optimise_zeros(wg: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, maxq: int, iters: int, p: float,
                   beta: float, kappa: float, real: torch.Tensor) -> torch.Tensor:
    """Zeros [out, ng] minimising the l_p rounding error of groups wg [out, ng, g]; `real` ([ng, g],
    `formats.real_columns`) keeps a ragged last group's padding out of the means."""
    s = scales[..., None]
    z = zeros[..., None]
    count = real.sum(-1, keepdim=True)
    best, best_error = z.clone(), torch.full_like(zeros, float("inf"))[..., None]
    for _ in range(iters):
        q = torch.clamp(torch.round(wg / s + z), 0, maxq)
        residual = wg - (q - z) * s
        error = (residual.abs().pow(p) * real).sum(-1, keepdim=True) / count
        better = error < best_error
        best, best_error = torch.where(better, z, best), torch.where(better, error, best_error)
        sparse = _shrink(residual, beta, p)
        z = ((q - (wg - sparse) / s) * real).sum(-1, keepdim=True) / count
        beta *= kappa
    return best[..., 0]


@register_quantizer("hqq", version="2", formats=("int",),
                    params={"iters": at_least(1), "lp": Param(float, lambda v: 0 < v <= 1, "in (0, 1]"),
                            "beta": positive(), "kappa": positive()})
def quantize_hqq(w: torch.Tensor, option: Option, calib=None) -> QuantizedWeight:
    if option.sym:
        raise BitallocError(f"hqq optimises zero points: use an asymmetric option ({option})")
    maxq = 2**option.bits - 1
    wg = formats.to_groups(w, option.group_size)
    scales, _ = formats.int_scales(wg, option.bits, sym=False)
    start = -formats.asym_range(wg.amin(-1), wg.amax(-1))[0] / scales
    zeros = optimise_zeros(wg, scales, start, maxq, option.param("iters", 20, int), option.param("lp", 0.7, float),
                           option.param("beta", 10.0, float), option.param("kappa", 1.01, float),
                           formats.real_columns(w.shape[1], option.group_size))
    zeros = formats.to_storage(zeros, "zeros")
    codes = torch.clamp(torch.round(wg / scales[..., None] + zeros[..., None]), 0, maxq).to(torch.uint8)
    return QuantizedWeight(option, formats.from_groups(codes, w.shape[1]).contiguous(), scales, zeros)
