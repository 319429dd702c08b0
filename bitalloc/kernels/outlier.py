"""`mixed-outlier`: MixQ-style layers, integer weights and activations plus float16 outlier channels.

The few input channels listed in `outlier_idx` carry activations too large to
quantize well.  They skip activation quantization (zeroed before the per-token
scale is taken, exactly as `prepare_input` does) and are multiplied in float16
by `outlier_weight`; every other channel goes through the int8 tensor-core
product of `int8.py`.  The two products are summed into one output.
"""
from __future__ import annotations

import torch

from .backends import Fallback, register_backend
from .int8 import integer_forward, integer_unsupported, integer_weight


@register_backend("mixed-outlier")
class MixedOutlierBackend(Fallback):
    def unsupported(self, layer) -> str | None:
        return integer_unsupported(layer)

    def build(self, layer) -> dict:
        state = {"weight": integer_weight(layer), "keep": None, "outliers": None}
        if layer.outlier_idx is not None:
            idx = layer.outlier_idx.long()
            keep = torch.ones(layer.in_features, device=idx.device)
            keep[idx] = 0
            state.update(keep=keep, outliers=(idx, layer.outlier_weight))
        return state

    def run(self, layer, state: dict, x: torch.Tensor) -> torch.Tensor:
        return integer_forward(layer, state["weight"], x, state["keep"], state["outliers"])
