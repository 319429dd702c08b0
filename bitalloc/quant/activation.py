"""Dynamic per-token activation quantization (simulated): the A in W8A8/W4A8/W4A4/W4A8-FP8.

Each token (row) gets its own scale from its own max |x| at run time, so no
calibration is needed; outlier channels (MixQ-style) are taken out by the
caller before this is applied (see kernels.backends.prepare_input).
"""
from __future__ import annotations

import torch

FP8_DTYPES = {"fp8e4m3": torch.float8_e4m3fn, "fp8e5m2": torch.float8_e5m2}


def fake_quantize_tokens(x: torch.Tensor, bits: int, fmt: str = "int") -> torch.Tensor:
    """Quantize-dequantize x with one scale per token (last dim = channels).

    int: symmetric integers in [-2^(b-1), 2^(b-1)-1], scale = max|x| / (2^(b-1)-1).
    fp8e4m3 / fp8e5m2: the token is scaled so its max |x| is the format's largest
    finite value, rounded to FP8 (round to nearest even), and scaled back.
    """
    if bits >= 16:
        return x
    absmax = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8)
    if fmt in FP8_DTYPES:
        dtype = FP8_DTYPES[fmt]
        scale = absmax / torch.finfo(dtype).max
        return (x / scale).to(dtype).to(x.dtype) * scale
    qmax = 2 ** (bits - 1) - 1
    scale = absmax / qmax
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale
