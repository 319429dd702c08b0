"""Exact costs: parameters, bytes of the packed layers, and MACs counted by fvcore."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .kernels import layout
from .models import find_blocks, is_linear, linear_layers, linear_shape
from .quant.option import Option
from .quant.registry import get_quantizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerShape:
    name: str
    out_features: int
    in_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def layer_shapes(model: nn.Module) -> list[LayerShape]:
    return [
        LayerShape(name, *linear_shape(m), getattr(m, "bias", None) is not None)
        for name, m in linear_layers(model).items()
    ]


def layer_storage(shape: LayerShape, option: Option) -> dict[str, layout.TensorSpec]:
    transforms = option.quantized and get_quantizer(option.method).transforms_input
    return layout.storage(option, shape.out_features, shape.in_features, shape.bias, act_scale=transforms)


def layer_bytes(shape: LayerShape, option: Option) -> int:
    """Bytes the packed layer occupies: codes with padding, scales, zeros, transforms, bias."""
    return layout.nbytes(layer_storage(shape, option))


def bits_per_weight(shape: LayerShape, option: Option) -> float:
    return 8 * layer_bytes(shape, option) / shape.numel


def assignment_bytes(shapes: list[LayerShape], assignment: dict[str, Option]) -> int:
    return sum(layer_bytes(s, assignment[s.name]) for s in shapes)


def average_bits(shapes: list[LayerShape], assignment: dict[str, Option]) -> float:
    """Bits per quantizable weight, scale and zero overhead included."""
    return 8 * assignment_bytes(shapes, assignment) / sum(s.numel for s in shapes)


def other_bytes(model: nn.Module, dtype=torch.float16) -> int:
    """Bytes of everything that is not a decoder linear (embeddings, norms, head), kept in `dtype`."""
    quantized = {id(m.weight) for m in linear_layers(model).values()}
    quantized |= {id(m.bias) for m in linear_layers(model).values() if getattr(m, "bias", None) is not None}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in quantized or id(p) in seen:
            continue
        seen.add(id(p))  # tied embeddings/head count once
        total += p.numel() * torch.empty((), dtype=dtype).element_size()
    return total


# --- MACs via fvcore -------------------------------------------------------------

class LogitsOnly(nn.Module):
    """ids -> logits with the KV cache off: a forward fvcore's tracer can follow."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False, return_dict=True).logits


def _sdpa_macs(inputs, outputs):
    """fvcore has no handle for attention; count QK^T and AV: 2 * b*h*Lq*Lk*d."""
    from fvcore.nn.jit_handles import get_shape

    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    *batch, lq, d = q
    lk = k[-2]
    heads = 1
    for size in batch:
        heads *= size
    return 2 * heads * lq * lk * d


def count_macs(model: nn.Module, batch: int = 1, seqlen: int = 512) -> dict[str, int]:
    """MACs per module (fvcore counts one fused multiply-add as one flop, i.e. it counts MACs)."""
    from fvcore.nn import FlopCountAnalysis

    ids = torch.zeros(batch, seqlen, dtype=torch.long)
    analysis = FlopCountAnalysis(LogitsOnly(model).eval(), (ids,))
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.no_grad():
        by_module = analysis.by_module()
    # the wrapper's own names carry a leading "model."; "" and "model" are both the whole forward
    return {("" if name == "model" else name.removeprefix("model.")): v for name, v in by_module.items()}


def block_macs(model: nn.Module, batch: int = 1, seqlen: int = 512) -> tuple[list[int], int]:
    """(MACs of each decoder block, MACs of the whole forward) for `batch` x `seqlen` tokens."""
    prefix, blocks = find_blocks(model)
    macs = count_macs(model, batch, seqlen)
    per_block = [macs.get(f"{prefix}.{i}", 0) for i in range(len(blocks))]
    return per_block, macs.get("", sum(per_block))


def linear_macs(model: nn.Module, batch: int = 1, seqlen: int = 512) -> dict[str, int]:
    """MACs of each decoder linear (out * in per token), from fvcore's count."""
    macs = count_macs(model, batch, seqlen)
    return {name: macs.get(name, 0) for name in linear_layers(model)}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = [
    "LayerShape", "layer_shapes", "layer_bytes", "bits_per_weight", "assignment_bytes", "average_bits",
    "other_bytes", "count_macs", "block_macs", "linear_macs", "parameter_count", "is_linear",
]
