"""The quantized versions of one block's linears that the profiler tries, one per (layer, option).

Each candidate is made once per block by the same `quantize` and `QuantLinear`
that apply uses; `installed` swaps a unit's candidates into the block for one
forward.  On the CPU each keeps its dequantized weight.  On an accelerator the
packed candidates stay on the device while their block is measured (about one
block's weights for four options of 2-8 bits) and a candidate's dequantized
weight exists only during its own forward, made by one Triton pass where the
kernels cover the format (`triton_backend.dense_weight`: 24 % less time for an
8B model on an H200 than torch's unpacking).  (Moving candidates to the host
between uses made the transfers, not the arithmetic, the cost of profiling an
8B model on an H100.)
"""
from __future__ import annotations

import contextlib

import torch

from .blocks import replace_module
from .kernels.quant_linear import QuantLinear
from .kernels.triton_backend import dense_weight
from .models import block_linears, weight_matrix
from .quant import Option, quantize


class Candidates:
    def __init__(self, block, pairs, full_name, calibs: dict, device):
        """`pairs`: (local layer name, Option); `full_name(local)` names the layer in errors."""
        self.device = torch.device(device)
        self.on_host = self.device.type == "cpu"
        self.dtype = next((p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32)
        linears = block_linears(block)
        self.layers: dict[tuple[str, Option], QuantLinear] = {}
        for name, option in pairs:
            module = linears[name]
            weight = weight_matrix(module).detach().float()
            qw = quantize(weight, option, calibs.get(name), layer=full_name(name)) if option.quantized else None
            dense = None if option.quantized else weight.cpu()
            layer = QuantLinear.from_weight(qw, getattr(module, "bias", None), dense=dense).to(self.device)
            if self.on_host:
                layer.set_backend("reference")
            self.layers[(name, option)] = layer

    def keys(self):
        return self.layers.keys()

    def _ready(self, layer: QuantLinear) -> QuantLinear:
        if not self.on_host:
            layer.set_backend("reference")
            layer._dense = dense_weight(layer, self.dtype)  # what `reference` would make, made faster
        return layer

    def _drop_dense(self, layer: QuantLinear) -> None:
        if not self.on_host:
            layer._dense = None

    @contextlib.contextmanager
    def installed(self, block, unit, option: Option):
        """The block with every layer of `unit` replaced by its candidate at `option`."""
        originals = {}
        try:
            for name in unit:
                originals[name] = replace_module(block, name, self._ready(self.layers[(name, option)]))
            yield
        finally:
            for name, original in originals.items():
                replace_module(block, name, original)
                self._drop_dense(self.layers[(name, option)])

    @torch.no_grad()
    def run(self, name: str, option: Option, x: torch.Tensor) -> torch.Tensor:
        layer = self._ready(self.layers[(name, option)])
        try:
            return layer(x)
        finally:
            self._drop_dense(layer)

    @torch.no_grad()
    def weight_error(self, name: str, option: Option, weight: torch.Tensor) -> torch.Tensor:
        """Effective weight minus the original (input-side transforms undone), float32 on `weight`'s device."""
        layer = self.layers[(name, option)]
        if not option.quantized:
            return layer.weight.float().to(weight.device) - weight
        return layer.quantized_weight().dequantize().to(weight.device) - weight
