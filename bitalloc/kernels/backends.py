"""Registry of compute backends for QuantLinear.

A backend is an object with `prepare(layer)` (build whatever it computes from:
cached dequantized weights, library-specific packs; kept on the layer in
`layer.kernel_state`, never saved) and `forward(layer, x)`.  A backend that
cannot compute a layer exactly as stored (a format or group size its kernel
lacks) runs that layer through `reference` instead, and says so in
`layer.kernel`, so one plan can mix whatever the kernels support.

`reference` dequantizes and multiplies: the ground truth every other backend is
tested against.  The other backends live in their own modules and register
themselves on import (`kernels/__init__.py` imports them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BitallocError
from ..quant.activation import fake_quantize_tokens

BACKENDS: dict[str, object] = {}
AUTO = "auto"


def register_backend(name: str):
    def decorate(cls):
        instance = cls()
        instance.name = name
        BACKENDS[name] = instance
        return cls

    return decorate


def get_backend(name: str):
    try:
        return BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(BACKENDS) + [AUTO])
        raise BitallocError(f"unknown backend '{name}' (known: {known})") from None


def check_backend_name(name: str) -> None:
    if name != AUTO:
        get_backend(name)


def auto_backend(layer, device: torch.device) -> str:
    """The fastest backend that computes this layer exactly on `device`."""
    opt = layer.option
    if not opt.quantized:
        return "reference"
    if device.type != "cuda":
        return "cpu"
    if opt.act_bits < 16:
        if opt.act_fmt != "int":
            return "reference"  # float8 activations: no packed kernel here computes them exactly
        return "mixed-outlier" if getattr(layer, "outlier_idx", None) is not None else "int8"
    return "triton"


def prepare_input(layer, x: torch.Tensor) -> torch.Tensor:
    """Input-side transforms every backend applies identically: x / act_scale, then activation
    quantization of every channel except the float16 outlier channels."""
    x = divide_act_scale(layer, x)
    if layer.option.act_bits >= 16:
        return x
    idx = getattr(layer, "outlier_idx", None)
    if idx is None:
        return fake_quantize_tokens(x, layer.option.act_bits, layer.option.act_fmt)
    idx = idx.long()
    kept = x[..., idx]
    rest = x.index_fill(-1, idx, 0)
    return fake_quantize_tokens(rest, layer.option.act_bits, layer.option.act_fmt).index_copy(-1, idx, kept)


def divide_act_scale(layer, x: torch.Tensor) -> torch.Tensor:
    if getattr(layer, "act_scale", None) is not None:
        x = x / layer.act_scale.to(x.dtype)
    return x


def add_bias(layer, out: torch.Tensor) -> torch.Tensor:
    return out if layer.bias is None else out + layer.bias.to(out.dtype)


class Fallback:
    """Mixin: run layers this backend's kernels cannot compute through `reference`."""

    def unsupported(self, layer) -> str | None:
        """Why this backend cannot compute `layer` exactly (None when it can)."""
        raise NotImplementedError

    def prepare(self, layer) -> None:
        reason = self.unsupported(layer)
        if reason is not None:
            BACKENDS["reference"].prepare(layer)
            layer.kernel = f"reference ({self.name}: {reason})"
            return
        layer.kernel_state = self.build(layer)
        layer.kernel = self.name

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        if layer.kernel_state is None:
            if layer.kernel is None:
                self.prepare(layer)
            if layer.kernel_state is None:
                return BACKENDS["reference"].forward(layer, x)
        return self.run(layer, layer.kernel_state, x)


@register_backend("reference")
class ReferenceBackend:
    """Dequantize on the first forward, in the input's dtype (cached on the layer, not saved), then a dense
    matmul.  Dequantizing straight into that dtype skips a float32 copy of the whole weight."""

    def prepare(self, layer) -> None:
        layer._dense = None
        layer.kernel = layer.kernel or "reference"

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        dense = getattr(layer, "_dense", None)
        if dense is None or dense.dtype != x.dtype or dense.device != x.device:
            layer._dense = dense = layer.dequantize_codes(x.dtype).to(x.device)
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        return F.linear(prepare_input(layer, x), dense, bias)
