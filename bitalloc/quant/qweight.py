"""The output every quantizer returns: codes, scales, zeros and input-side transforms."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import formats
from .option import Option


@dataclass
class QuantizedWeight:
    """A quantized [out, in] matrix as plain tensors (codes unpacked, one uint8 each).

    `act_scale` (AWQ/SmoothQuant) is a per-input-channel factor s: the codes
    approximate W * s and the layer computes them against x / s.  `outlier_idx`
    (MixQ-style) lists input columns kept in float16: `outlier_weight` holds
    (W * s)[:, outlier_idx] (for GPTQ, those columns as its error feedback left
    them), those columns of the codes are ignored, and those
    input channels skip activation quantization.  The effective weight the layer
    applies is what `dequantize` returns.
    """

    option: Option
    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float32, values exact in float16, [out, n_groups]
    zeros: torch.Tensor | None = None  # float32 [out, n_groups], asymmetric ints only
    act_scale: torch.Tensor | None = None  # float32 [in]
    outlier_idx: torch.Tensor | None = None  # int64 [k]
    outlier_weight: torch.Tensor | None = None  # float32 (float16 values) [out, k]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize_codes(self) -> torch.Tensor:
        """The quantized matrix before any input-side transform is undone."""
        opt = self.option
        wg = formats.dequantize_groups(
            formats.to_groups(self.codes, opt.group_size), opt.fmt, opt.bits, self.scales, self.zeros
        )
        return formats.from_groups(wg, self.shape[1])

    def dequantize(self) -> torch.Tensor:
        w = self.dequantize_codes()
        if self.outlier_idx is not None:
            w[:, self.outlier_idx] = self.outlier_weight
        if self.act_scale is not None:
            w = w / self.act_scale
        return w


def quantize_with_scales(w: torch.Tensor, option: Option, scales, zeros=None) -> QuantizedWeight:
    """Codes for `w` under given group scales/zeros (shared by every method)."""
    wg = formats.to_groups(w, option.group_size)
    codes = formats.quantize_groups(wg, option.fmt, option.bits, scales, zeros)
    return QuantizedWeight(option, formats.from_groups(codes, w.shape[1]).contiguous(), scales, zeros)
