"""Registry of compute backends for QuantLinear.

A backend is an object with `prepare(layer)` (build whatever it computes from:
cached dequantized weights, library-specific packs) and `forward(layer, x)`.
`reference` dequantizes and multiplies: the ground truth every other backend is
tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BitallocError
from ..quant.activation import fake_quantize_tokens

BACKENDS: dict[str, object] = {}


def register_backend(name: str):
    def decorate(cls):
        BACKENDS[name] = cls()
        return cls

    return decorate


def get_backend(name: str):
    try:
        return BACKENDS[name]
    except KeyError:
        raise BitallocError(f"unknown backend '{name}' (known: {', '.join(sorted(BACKENDS))})") from None


def prepare_input(layer, x: torch.Tensor) -> torch.Tensor:
    """Input-side transforms every backend applies identically: x / act_scale, then activation
    quantization of every channel except the float16 outlier channels."""
    if getattr(layer, "act_scale", None) is not None:
        x = x / layer.act_scale.to(x.dtype)
    if layer.option.act_bits >= 16:
        return x
    idx = getattr(layer, "outlier_idx", None)
    if idx is None:
        return fake_quantize_tokens(x, layer.option.act_bits, layer.option.act_fmt)
    idx = idx.long()
    kept = x[..., idx]
    rest = x.index_fill(-1, idx, 0)
    return fake_quantize_tokens(rest, layer.option.act_bits, layer.option.act_fmt).index_copy(-1, idx, kept)


@register_backend("reference")
class ReferenceBackend:
    """Dequantize once (cached on the layer, not saved), then a dense matmul in the input's dtype."""

    def prepare(self, layer) -> None:
        layer._dense = layer.dequantize_codes()

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        if getattr(layer, "_dense", None) is None:
            self.prepare(layer)
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        return F.linear(prepare_input(layer, x), layer._dense.to(x.dtype), bias)
