"""`approx`: the layer's product computed through the approximate-multiplier simulation.

AxCore-style hardware multiplies floating-point mantissas approximately; the
simulation is a quantizer-side function, `bitalloc.quant.approx.approx_matmul`
(x [..., K], weight [N, K] -> [..., N], every product through the approximate
multiplier).  This backend only feeds it the layer's effective weight
(dequantized once, as `reference` does) and its prepared input, so any stored
format can be evaluated under approximate multiplication.
"""
from __future__ import annotations

import torch

from ..quant.approx import approx_matmul
from .backends import add_bias, prepare_input, register_backend


@register_backend("approx")
class ApproxBackend:
    """Any stored format: the simulation takes the dense weight, so no layer falls back to `reference`."""

    def prepare(self, layer) -> None:
        layer.kernel_state = {"weight": layer.dequantize_codes()}
        layer.kernel = self.name

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        if layer.kernel_state is None:
            self.prepare(layer)
        state = layer.kernel_state
        if state["weight"].device != x.device or state["weight"].dtype != x.dtype:
            state["weight"] = state["weight"].to(x.device, x.dtype)
        return add_bias(layer, approx_matmul(prepare_input(layer, x), state["weight"]))
