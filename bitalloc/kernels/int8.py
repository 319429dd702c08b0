"""`int8`: integer-activation layers (W8A8, W4A8, W4A4) through `torch._int_mm`.

Activations are quantized per token exactly as `fake_quantize_tokens` does
(symmetric, absmax / qmax, round half to even), weights are the stored
per-channel integer codes moved to int8 (q - 2**(bits-1)), and the int32
product is rescaled: out = sx * sw * (qx @ q8^T) + sx * sum(qx) * (2**(bits-1) - z) * sw.
4-bit activations and weights are integers in int8's range, so W4A4 runs on the
same int8 tensor cores (Hopper has no int4 ones) with the same arithmetic.

On CUDA the activations are quantized by one Triton kernel, and the product
runs either as this repo's Triton int8 matmul with the rescaling fused into its
epilogue (`scaled_int_matmul`: the int32 [M, N] product never touches memory)
or as `_int_mm` plus a rescaling kernel, whichever the tuner measures faster
for the shape (`tuner.py`).  `_int_mm(A, B)` takes A row-major [M, K] and B the
transpose of the row-major [N, K] codes (B column-major, cuBLASLt's "TN" int8
case); on CUDA it needs M > 16 and K, N multiples of 8, so smaller batches are
padded to 32 rows.  Elsewhere everything is torch ops.
"""
from __future__ import annotations

import torch

from . import tuner
from .backends import Fallback, divide_act_scale, register_backend

MIN_ROWS = 17
PADDED_ROWS = 32
CUBLAS = ("_int_mm",)
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) of `scaled_int_matmul`; the first is the untuned
# default.  Small batches want short row blocks and deep pipelines (they are weight-bandwidth bound).
FUSED_CONFIGS = [(128, 128, 128, 8, 8, 3), (128, 256, 128, 8, 8, 3), (64, 128, 128, 8, 4, 4),
                 (64, 256, 128, 8, 8, 4), (32, 128, 256, 8, 4, 4), (16, 128, 256, 8, 4, 5),
                 (256, 128, 128, 8, 8, 3), (128, 128, 64, 8, 4, 5)]


def integer_weight(layer) -> dict:
    """Per-channel codes as int8 [N, K] (outlier columns zeroed), weight scales and zero-point correction."""
    qw = layer.quantized_weight()
    bits = qw.option.bits
    q8 = (qw.codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    if layer.outlier_idx is not None:
        q8[:, layer.outlier_idx.long()] = 0
    scales = qw.scales[:, 0].float()
    correction = None
    if qw.zeros is not None:
        correction = (2 ** (bits - 1) - qw.zeros[:, 0]) * scales
    device = layer.qweight.device
    return {"q": q8.contiguous().to(device), "scales": scales.to(device),
            "correction": None if correction is None else correction.float().to(device)}


def quantize_tokens(x: torch.Tensor, bits: int, keep: torch.Tensor | None = None):
    """x [M, K] -> (int8 codes, float32 scale [M], int32 code sum [M]); keep == 0 channels become zeros."""
    if x.is_cuda:
        from . import triton_kernels as tk

        m, k = x.shape
        q = torch.empty(m, k, dtype=torch.int8, device=x.device)
        scale = torch.empty(m, dtype=torch.float32, device=x.device)
        rowsum = torch.empty(m, dtype=torch.int32, device=x.device)
        tk.quantize_rows[(m,)](x, keep if keep is not None else x, q, scale, rowsum, k, x.stride(0),
                               QMAX=2 ** (bits - 1) - 1, HAS_KEEP=keep is not None,
                               BLOCK=min(4096, 1 << (k - 1).bit_length()), num_warps=4)
        return q, scale, rowsum
    if keep is not None:
        x = x * keep.to(x.dtype)
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qmax
    q = torch.clamp(torch.round(x / scale), -qmax - 1, qmax).to(torch.int8)
    return q, scale[:, 0].float(), q.sum(-1, dtype=torch.int32)


def int_product(q: torch.Tensor, weight: dict) -> torch.Tensor:
    """int8 [M, K] @ int8 [N, K]^T -> int32 [M, N] on the tensor cores' int8 path."""
    rows = q.shape[0]
    if q.is_cuda and rows < MIN_ROWS:
        q = torch.nn.functional.pad(q, (0, 0, 0, PADDED_ROWS - rows))
    return torch._int_mm(q, weight["q"].t())[:rows]


def rescale(acc: torch.Tensor, sx, rowsum, weight: dict, bias, dtype) -> torch.Tensor:
    if acc.is_cuda:
        from . import triton_kernels as tk

        m, n = acc.shape
        out = torch.empty(m, n, dtype=dtype, device=acc.device)
        corr, has_bias = weight["correction"], bias is not None
        grid = (-(-m // 32), -(-n // 128))
        tk.scale_int_product[grid](acc, sx, rowsum, weight["scales"], corr if corr is not None else sx,
                                   bias if has_bias else sx, out, m, n, HAS_CORR=corr is not None,
                                   HAS_BIAS=has_bias, BLOCK_M=32, BLOCK_N=128, num_warps=4)
        return out
    out = acc.float() * sx[:, None] * weight["scales"][None, :]
    if weight["correction"] is not None:
        out += (sx * rowsum.float())[:, None] * weight["correction"][None, :]
    if bias is not None:
        out += bias.float()
    return out.to(dtype)


def scaled_product(q, sx, rowsum, weight: dict, bias, dtype) -> torch.Tensor:
    """out = sx * sw * (q @ w^T) (+ zero-point correction) (+ bias) in `dtype`; on CUDA the faster of the
    fused Triton matmul and `_int_mm` + rescaling for this shape."""
    if not q.is_cuda:
        return rescale(int_product(q, weight), sx, rowsum, weight, bias, dtype)
    rows, (n, k) = q.shape[0], weight["q"].shape
    key = ("w8a8", 1 << max(4, (rows - 1).bit_length()), n, k, weight["correction"] is not None, bias is not None,
           dtype)
    choices = [FUSED_CONFIGS[0], CUBLAS] + FUSED_CONFIGS[1:]
    choice = tuner.choose(key, choices, lambda c: run_product(c, q, sx, rowsum, weight, bias, dtype), reference=CUBLAS)
    return run_product(choice, q, sx, rowsum, weight, bias, dtype)


def run_product(choice: tuple, q, sx, rowsum, weight: dict, bias, dtype) -> torch.Tensor:
    """One way of computing `scaled_product` on CUDA: CUBLAS or a FUSED_CONFIGS entry."""
    if choice == CUBLAS:
        return rescale(int_product(q, weight), sx, rowsum, weight, bias, dtype)
    from . import triton_kernels as tk

    block_m, block_n, block_k, group_m, warps, stages = choice
    (m, k), n = q.shape, weight["q"].shape[0]
    out = torch.empty(m, n, dtype=dtype, device=q.device)
    corr = weight["correction"]
    grid = (-(-m // block_m) * -(-n // block_n),)
    tk.scaled_int_matmul[grid](q, weight["q"], sx, rowsum, weight["scales"], corr if corr is not None else sx,
                               bias if bias is not None else sx, out, m, n, k, HAS_CORR=corr is not None,
                               HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, BLOCK_M=block_m,
                               BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=warps,
                               num_stages=stages)
    return out


def integer_forward(layer, weight: dict, x: torch.Tensor, keep=None, outliers=None) -> torch.Tensor:
    """The integer product of a layer, plus the float16 product of its outlier channels if any."""
    x = divide_act_scale(layer, x)
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).contiguous()
    q, sx, rowsum = quantize_tokens(flat, layer.option.act_bits, keep)
    out = scaled_product(q, sx, rowsum, weight, layer.bias, x.dtype)
    if outliers is not None:
        idx, w_out = outliers
        out = out.addmm_(flat[:, idx], w_out.to(out.dtype).T)
    return out.reshape(*shape[:-1], layer.out_features)


def integer_unsupported(layer) -> str | None:
    opt = layer.option
    if not opt.quantized:
        return "unquantized layer"
    if opt.act_bits >= 16:
        return "weight-only layer (no activation quantization)"
    if opt.act_fmt != "int":
        return f"{opt.act_fmt} activations (these kernels quantize activations to integers)"
    if opt.fmt != "int" or opt.group_size != 0:
        return "needs per-channel integer weights"
    if layer.qweight.is_cuda and (layer.in_features % 8 or layer.out_features % 8):
        return "torch._int_mm needs in/out features divisible by 8"
    return None


@register_backend("int8")
class Int8Backend(Fallback):
    def unsupported(self, layer) -> str | None:
        if getattr(layer, "outlier_idx", None) is not None:
            return "fp16 outlier channels (use mixed-outlier)"
        return integer_unsupported(layer)

    def build(self, layer) -> dict:
        return integer_weight(layer)

    def run(self, layer, state: dict, x: torch.Tensor) -> torch.Tensor:
        return integer_forward(layer, state, x)

