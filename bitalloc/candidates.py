"""The quantized versions of one block's linears that the profiler tries, one per (layer, option).

Each candidate is made once per block by the same `quantize` and `QuantLinear`
that apply uses, and waits in host memory; `installed` swaps a unit's
candidates into the block for one forward.  On an accelerator each candidate is
moved there only for that forward and its dequantized weight dropped after, so
candidates never hold more device memory than one unit's layers.
"""
from __future__ import annotations

import contextlib

import torch

from .blocks import replace_module
from .kernels.quant_linear import QuantLinear
from .models import block_linears, weight_matrix
from .quant import Option, quantize


class Candidates:
    def __init__(self, block, pairs, full_name, calibs: dict, device):
        """`pairs`: (local layer name, Option); `full_name(local)` names the layer in errors."""
        self.device = torch.device(device)
        self.on_host = self.device.type == "cpu"
        linears = block_linears(block)
        self.layers: dict[tuple[str, Option], QuantLinear] = {}
        for name, option in pairs:
            module = linears[name]
            weight = weight_matrix(module).detach().float()
            qw = quantize(weight, option, calibs.get(name), layer=full_name(name)) if option.quantized else None
            dense = None if option.quantized else weight.cpu()
            layer = QuantLinear.from_weight(qw, getattr(module, "bias", None), dense=dense)
            if self.on_host:
                layer.set_backend("reference")
            self.layers[(name, option)] = layer

    def keys(self):
        return self.layers.keys()

    def items(self):
        return self.layers.items()

    def _on_device(self, layer: QuantLinear) -> QuantLinear:
        if not self.on_host:
            layer.to(self.device)
            layer.set_backend("reference")
        return layer

    def _back(self, layer: QuantLinear) -> None:
        if not self.on_host:
            layer.to("cpu")
            layer._dense = None

    @contextlib.contextmanager
    def installed(self, block, unit, option: Option):
        """The block with every layer of `unit` replaced by its candidate at `option`."""
        originals = {}
        try:
            for name in unit:
                originals[name] = replace_module(block, name, self._on_device(self.layers[(name, option)]))
            yield
        finally:
            for name, original in originals.items():
                replace_module(block, name, original)
                self._back(self.layers[(name, option)])

    @torch.no_grad()
    def run(self, name: str, option: Option, x: torch.Tensor) -> torch.Tensor:
        layer = self._on_device(self.layers[(name, option)])
        try:
            return layer(x)
        finally:
            self._back(layer)

    @torch.no_grad()
    def weight_error(self, name: str, option: Option, weight: torch.Tensor) -> torch.Tensor:
        """Effective weight minus the original (input-side transforms undone), float32 on `weight`'s device."""
        layer = self.layers[(name, option)]
        if not option.quantized:
            return layer.weight.float().to(weight.device) - weight
        return layer.quantized_weight().dequantize().to(weight.device) - weight
