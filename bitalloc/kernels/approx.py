"""`approx`: the layer's product computed through the approximate-multiplier simulation.

AxCore-style hardware multiplies floating-point mantissas approximately; the
simulation itself is a quantizer-side function, `bitalloc.quant.approx.approx_matmul(x, weight)`
(x [..., K], weight [N, K] -> [..., N], every product through the approximate
multiplier), owned by the quantizers.  This backend only feeds it the layer's
effective weight (dequantized once, as `reference` does) and its prepared
input, so any stored format can be evaluated under approximate multiplication.
Until that function exists the layers run through `reference`, marked so in
`layer.kernel`.
"""
from __future__ import annotations

import importlib

import torch

from .backends import Fallback, add_bias, prepare_input, register_backend

SIMULATION = ("bitalloc.quant.approx", "approx_matmul")


def simulation():
    """The simulation function, or None while it is not part of the package."""
    module_name, function = SIMULATION
    try:
        return getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError):
        return None


@register_backend("approx")
class ApproxBackend(Fallback):
    def unsupported(self, layer) -> str | None:
        if simulation() is None:
            return f"{'.'.join(SIMULATION)} is not available"
        return None

    def build(self, layer) -> dict:
        return {"weight": layer.dequantize_codes(), "matmul": simulation()}

    def run(self, layer, state: dict, x: torch.Tensor) -> torch.Tensor:
        weight = state["weight"]
        if weight.device != x.device or weight.dtype != x.dtype:
            weight = state["weight"] = weight.to(x.device, x.dtype)
        return add_bias(layer, state["matmul"](prepare_input(layer, x), weight))
