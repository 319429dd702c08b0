"""QuantLinear: a linear layer holding packed codes, computed by a chosen backend."""
from __future__ import annotations

import torch
from torch import nn

from ..quant.option import Option, parse
from ..quant.qweight import QuantizedWeight
from . import layout, packing
from .backends import AUTO, BACKENDS, auto_backend, get_backend


class QuantLinear(nn.Module):
    """Stores exactly the tensors of `layout.storage` (so saved bytes == predicted bytes)."""

    def __init__(self, option: Option, in_features: int, out_features: int, bias: bool = False,
                 act_scale: bool = False, backend: str = "reference"):
        super().__init__()
        self.option = option
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        for name, (shape, dtype) in layout.storage(option, out_features, in_features, bias, act_scale).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        for name in ("bias", "act_scale", "zeros", "outlier_idx", "outlier_weight"):
            if name not in self._buffers:
                setattr(self, name, None)
        self.reset_kernel()

    def reset_kernel(self) -> None:
        """Drop what a backend built from the stored tensors (rebuilt on the next forward)."""
        self._dense = None
        self.kernel_state = None
        self.kernel = None  # what actually computes this layer, e.g. "triton" or "reference (cpu: nf4)"

    def _apply(self, fn, *args, **kwargs):
        # moving or casting the stored tensors invalidates whatever was built from them
        result = super()._apply(fn, *args, **kwargs)
        self.reset_kernel()
        return result

    @classmethod
    def from_weight(cls, qw: QuantizedWeight | None, bias: torch.Tensor | None, backend: str = "reference",
                    dense: torch.Tensor | None = None) -> "QuantLinear":
        """Pack a quantizer's output; `dense` (with qw None) keeps an unquantized fp16 layer."""
        if qw is None:
            out_features, in_features = dense.shape
            layer = cls(parse("fp16"), in_features, out_features, bias is not None, backend=backend)
            layer.weight.copy_(dense.to(torch.float16))
        else:
            out_features, in_features = qw.shape
            layer = cls(qw.option, in_features, out_features, bias is not None, qw.act_scale is not None, backend)
            layer.qweight.copy_(packing.pack(qw.codes, qw.option.bits))
            layer.scales.copy_(qw.scales.to(torch.float16))
            if qw.zeros is not None:
                layer.zeros.copy_(qw.zeros.to(torch.float16))
            if qw.act_scale is not None:
                layer.act_scale.copy_(qw.act_scale.to(torch.float16))
            if qw.outlier_idx is not None:
                layer.outlier_idx.copy_(qw.outlier_idx.to(torch.int32))
                layer.outlier_weight.copy_(qw.outlier_weight.to(torch.float16))
        if bias is not None:
            layer.bias.copy_(bias.to(torch.float16))
        return layer

    def quantized_weight(self, rows: slice = slice(None)) -> QuantizedWeight:
        """The stored layer (or a slice of its output rows) as the quantizers' plain data."""
        opt = self.option
        zeros = self.zeros[rows].float() if self.zeros is not None else None
        act = self.act_scale.float() if self.act_scale is not None else None
        codes = packing.unpack(self.qweight[rows], opt.bits, self.in_features)
        idx = self.outlier_idx.long() if self.outlier_idx is not None else None
        outlier = self.outlier_weight[rows].float() if self.outlier_weight is not None else None
        return QuantizedWeight(opt, codes, self.scales[rows].float(), zeros, act, idx, outlier)

    def dequantize_codes(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the matmul uses (before x / act_scale), computed in float32 and stored as `dtype`;
        outlier columns in float16 precision.  Slices of rows bound the float32 working memory."""
        if not self.option.quantized:
            return self.weight.to(dtype)
        w = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.qweight.device)
        for rows in packing.row_slices(self.out_features, self.in_features):
            qw = self.quantized_weight(rows)
            part = qw.dequantize_codes()
            if qw.outlier_idx is not None:
                part[:, qw.outlier_idx] = qw.outlier_weight
            w[rows] = part
        return w

    def set_backend(self, name: str) -> None:
        """Select the backend ("auto": the fastest exact one for this layer's device) and prepare it."""
        if name == AUTO:
            name = auto_backend(self, self.qweight.device if self.option.quantized else self.weight.device)
        backend = get_backend(name)
        self.backend = name
        self.reset_kernel()
        backend.prepare(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = BACKENDS.get(self.backend)
        if torch.compiler.is_compiling() and self.kernel_state is not None and getattr(backend, "traceable", False):
            return backend.run(self, self.kernel_state, x)  # traced: its kernels are one opaque operator
        return self._eager_forward(x)

    @torch.compiler.disable  # a graph break for torch.compile: building, tuning and caching run eagerly
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == AUTO:
            self.set_backend(AUTO)
        return get_backend(self.backend).forward(self, x)

    def extra_repr(self) -> str:
        return (f"{self.in_features}->{self.out_features}, option={self.option}, backend={self.backend}, "
                f"kernel={self.kernel}")
