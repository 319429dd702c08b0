"""The storage layout of a quantized linear: the one place that says which tensors,
of which shapes and dtypes, a packed layer holds.

QuantLinear allocates exactly these tensors, `save` writes exactly these, and the
cost model sums exactly these bytes, so predicted and real sizes cannot drift.

Codes are packed along the input dimension as a little-endian bit stream: every
32 consecutive codes of a row occupy `bits` int32 words (rows padded to a
multiple of 32 codes).  For 2, 4 and 8 bits this is the usual "32/bits codes per
word" layout; 3-bit codes may straddle words.
"""
from __future__ import annotations

import math

import torch

from ..quant.formats import num_groups
from ..quant.option import Option

CODES_PER_CHUNK = 32
TensorSpec = tuple[tuple[int, ...], torch.dtype]


def packed_words(in_features: int, bits: int) -> int:
    return math.ceil(in_features / CODES_PER_CHUNK) * bits


def storage(option: Option, out_features: int, in_features: int, bias: bool = False,
            act_scale: bool = False) -> dict[str, TensorSpec]:
    """Tensor name -> (shape, dtype) of a layer stored under `option`."""
    spec: dict[str, TensorSpec] = {}
    if not option.quantized:
        spec["weight"] = ((out_features, in_features), torch.float16)
    else:
        groups = num_groups(in_features, option.group_size)
        spec["qweight"] = ((out_features, packed_words(in_features, option.bits)), torch.int32)
        spec["scales"] = ((out_features, groups), torch.float16)
        if option.fmt == "int" and not option.sym:
            spec["zeros"] = ((out_features, groups), torch.float16)
        if act_scale:
            spec["act_scale"] = ((in_features,), torch.float16)
        outliers = option.param("outliers", 0, int)
        if outliers:
            spec["outlier_idx"] = ((outliers,), torch.int32)
            spec["outlier_weight"] = ((out_features, outliers), torch.float16)
    if bias:
        spec["bias"] = ((out_features,), torch.float16)
    return spec


def nbytes(spec: dict[str, TensorSpec]) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in spec.values())


GATE_ROWS = 8  # a gated layer's gate and up rows alternate in blocks of this many (`bitalloc.fuse`)


def gated_order(rows: int) -> torch.Tensor:
    """The order of the 2 `rows` rows of a gate projection stacked on an up projection in one gated layer:
    GATE_ROWS gate rows, then the same outputs' up rows, and so on, so that a 16-row tile of the
    tensor-core GEMV holds both rows of 8 outputs and can take silu(gate) * up itself (`triton_mma`)."""
    first = torch.arange(rows).view(-1, GATE_ROWS)
    return torch.stack([first, first + rows], 1).flatten()


def gate_rows(out: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up from a gated layer's output [..., 2 rows] (rows in `gated_order`): [..., rows]."""
    pairs = out.unflatten(-1, (-1, 2, GATE_ROWS))
    return (torch.nn.functional.silu(pairs[..., 0, :]) * pairs[..., 1, :]).flatten(-2)
