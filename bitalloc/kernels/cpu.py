"""`cpu`: torch's packed CPU kernels for weight-only integer layers.

Two of torch's CPU ops fit the stored formats exactly (checked on torch 2.13):

- `_weight_int4pack_mm_for_cpu(x, packed, group, scale_and_zero)` computes
  x @ ((q - 8) * s + m)^T per group of 32, 64, 128 or 256 input columns, with
  q in [0, 16) packed by `_convert_weight_to_int4pack_for_cpu` (N divisible by
  16).  Any integer option of at most 4 bits maps onto it exactly: codes < 16
  are valid int4 codes, and with codes moved by c = 8 - 2**(bits-1) to the middle
  of the int4 range, (q - z) * s = (q + c - 8) * s + (8 - c - z) * s.  Group
  sizes that are multiples of 32 (and per-channel) use the largest kernel group
  dividing them, the scale repeated; a ragged last group is padded with zero
  codes against zero inputs.
- `_weight_int8pack_mm(x, q8, s)` computes x @ (q8 * s)^T with one scale per
  output row (it crashes unless the input width is a multiple of 16: padded): per-channel integers of 5 to 8 bits, with q8 = q - 2**(bits-1)
  and, for a zero point, the exact correction (2**(bits-1) - z) * s * sum(x).

Both are fast only with bfloat16 activations (float32 and float16 inputs take
a path 2-5x slower than a float32 matmul), so the layer computes in bfloat16:
activations, scales and the output are rounded to bfloat16, which is the
tolerance against `reference`.  Asymmetric rows whose zero point sits far from
the middle of the code range lose more: the rounding of a group's scale and
additive term (int4) or of the product before its zero-point correction (int8)
then errs alike over the whole group (1.6-1.9 % relative error on rows with one
30x column, against 0.3 % for a bfloat16 matmul of the same weight).
`_dyn_quant_matmul_4bit` does not fit: it quantizes activations to 8 bits (a
W4A8 product, not the stored A16 layer: 0.8 % relative error against it) and on
x86 it is a slow fallback (24 ms for a 4096x4096 product at batch 1, against
2.8 ms in float32).  Everything else (codebook formats, activation quantization,
grouped 5-8 bit) runs through `reference`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.formats import num_groups
from .backends import Fallback, add_bias, divide_act_scale, register_backend

INT4_KERNEL_GROUPS = (256, 128, 64, 32)
COMPUTE_DTYPE = torch.bfloat16


def kernel_group(group_size: int) -> int | None:
    """The int4 kernel's group for a stored group size (a divisor of it), or None."""
    return next((g for g in INT4_KERNEL_GROUPS if group_size % g == 0), None)


def _padded(in_features: int, group_size: int) -> tuple[int, int]:
    """(stored group size with per-channel resolved, padded input width)."""
    if group_size == 0 or group_size >= in_features:
        width = -(-in_features // 32) * 32
        return width, width
    return group_size, num_groups(in_features, group_size) * group_size


def zero_outlier_codes(layer, codes: torch.Tensor, offset: torch.Tensor, scales: torch.Tensor):
    """Outlier columns keep their weight in float16 apart: set their codes to the code nearest their
    group's zero point, so the packed product all but skips them, and return (columns, the float16 weight
    less what the product still computes there) or None.  That remainder is not zero where zero points are
    not integers (HQQ): (round(z) - z) s, times the outlier channel, the largest input."""
    if layer.outlier_idx is None:
        return None
    idx = layer.outlier_idx.long()
    group = layer.option.group_size
    group_of = idx // group if group else torch.zeros_like(idx)
    codes[:, idx] = offset[:, group_of].round().to(codes.dtype)
    left = (codes[:, idx].float() - offset[:, group_of]) * scales[:, group_of]
    return idx, layer.outlier_weight.float() - left


@register_backend("cpu")
class CpuBackend(Fallback):
    def unsupported(self, layer) -> str | None:
        opt = layer.option
        if not opt.quantized:
            return "unquantized layer"
        if opt.fmt != "int":
            return f"no packed CPU kernel for {opt.format_name}"
        if opt.act_bits < 16:
            return "activation quantization"
        if opt.bits <= 4:
            group, _ = _padded(layer.in_features, opt.group_size)
            return None if kernel_group(group) else f"group size {opt.group_size} is not a multiple of 32"
        return None if opt.group_size == 0 else "grouped scales above 4 bits"

    def build(self, layer) -> dict:
        qw = layer.quantized_weight()
        opt = qw.option
        offset = qw.zeros if qw.zeros is not None else torch.full_like(qw.scales, 2 ** (opt.bits - 1))
        codes = qw.codes.clone()
        outliers = zero_outlier_codes(layer, codes, offset, qw.scales)
        if outliers is not None:
            outliers = (outliers[0], outliers[1].to(COMPUTE_DTYPE))
        if opt.bits <= 4:
            return self._build_int4(qw, codes, offset, outliers)
        width = -(-layer.in_features // 32) * 32  # the kernel crashes on widths that are not multiples of 16
        q8 = torch.zeros(layer.out_features, width, dtype=torch.int8)
        q8[:, :layer.in_features] = codes.to(torch.int16) - 2 ** (opt.bits - 1)
        correction = ((2 ** (opt.bits - 1) - offset[:, 0]) * qw.scales[:, 0])
        return {"kind": "int8", "q": q8, "scales": qw.scales[:, 0].to(COMPUTE_DTYPE), "width": width,
                "correction": correction if bool(correction.ne(0).any()) else None, "outliers": outliers}

    def _build_int4(self, qw, codes, offset, outliers) -> dict:
        opt = qw.option
        out_features, in_features = codes.shape
        group, width = _padded(in_features, opt.group_size)
        kgroup = kernel_group(group)
        rows = -(-out_features // 16) * 16
        # codes move to the middle of the int4 range, so the additive term stays small in bfloat16
        centre = 8 - 2 ** (opt.bits - 1)
        padded = torch.zeros(rows, width, dtype=torch.int32)
        padded[:out_features, :in_features] = codes.to(torch.int32) + centre
        # per kernel group: scale s and additive m = (8 - z - centre) * s of the stored group it lies in
        repeat = group // kgroup
        scales = qw.scales.repeat_interleave(repeat, dim=1)
        shift = ((8 - centre - offset) * qw.scales).repeat_interleave(repeat, dim=1)
        groups = width // kgroup
        scale_zero = torch.zeros(groups, rows, 2)
        scale_zero[:, :out_features, 0] = scales[:, :groups].T
        scale_zero[:, :out_features, 1] = shift[:, :groups].T
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded, 1)
        return {"kind": "int4", "packed": packed, "group": kgroup, "scale_zero": scale_zero.to(COMPUTE_DTYPE),
                "width": width, "outliers": outliers}

    def run(self, layer, state: dict, x: torch.Tensor) -> torch.Tensor:
        x = divide_act_scale(layer, x)
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE)
        inputs = F.pad(flat, (0, state["width"] - flat.shape[1])) if state["width"] != flat.shape[1] else flat
        if state["kind"] == "int4":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(inputs, state["packed"], state["group"],
                                                              state["scale_zero"])[:, :layer.out_features]
        else:
            out = torch.ops.aten._weight_int8pack_mm(inputs, state["q"], state["scales"])
        out = out.to(x.dtype)
        if state.get("correction") is not None:
            out = out + flat.to(x.dtype).sum(-1, keepdim=True) * state["correction"].to(x.dtype)
        if state["outliers"] is not None:
            idx, weight = state["outliers"]
            out = out + (flat[:, idx] @ weight.T).to(x.dtype)
        return add_bias(layer, out.reshape(*shape[:-1], layer.out_features))
