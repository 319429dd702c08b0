"""Number formats and group-wise scaling: pure tensor functions, no modules.

A weight matrix [out, in] is cut along `in` into groups of `group_size` columns
(group_size 0 = one group per row).  When `in` is not a multiple of the group
size the last group is ragged: it is padded for the arithmetic by repeating its
last column (which leaves its min/max unchanged) and the padding is dropped again.

Codes are unsigned integers < 2**bits.  Integer formats dequantize as
(code - zero) * scale; codebook formats (FP8, FP4 E2M1, NF4) as
table[code] * scale with the table normalised to max |value| = 1.  Scales and
zeros are rounded to float16 here, because that is how they are stored: what the
profiler measures is then bit-for-bit what a packed model computes.
"""
from __future__ import annotations

import functools
import math

import torch

from ..errors import BitallocError

STORAGE_DTYPE = torch.float16


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == 0 else math.ceil(in_features / group_size)


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, g], padding a ragged last group by repetition."""
    out_features, in_features = w.shape
    if group_size == 0 or group_size >= in_features:
        return w.reshape(out_features, 1, in_features)
    pad = num_groups(in_features, group_size) * group_size - in_features
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out_features, pad)], dim=1)
    return w.reshape(out_features, -1, group_size)


def real_columns(in_features: int, group_size: int) -> torch.Tensor:
    """[n_groups, g] in `to_groups`' layout: 1.0 on real columns, 0.0 on a ragged last group's padding, which
    must not count in an error or a mean (repeating the last column leaves min/max alone, not averages)."""
    shape = to_groups(torch.zeros(1, in_features), group_size).shape[1:]
    return (torch.arange(shape.numel()) < in_features).reshape(shape).float()


def from_groups(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    return wg.reshape(wg.shape[0], -1)[:, :in_features]


def to_storage(values: torch.Tensor, what: str) -> torch.Tensor:
    """Round to the float16 that will be stored; overflow is an error, not an inf."""
    stored = values.to(STORAGE_DTYPE)
    if not torch.isfinite(stored).all():
        raise BitallocError(f"{what} overflow float16 (|value| > 65504); the weights are out of range")
    # a nonzero value below float16's smallest (2**-24: a near-constant group) keeps that magnitude, since
    # a zero scale would divide by zero
    tiny = torch.full_like(stored, 2.0**-24).copysign(values)
    return torch.where((stored == 0) & (values != 0), tiny, stored).to(values.dtype)


# --- codebook formats -------------------------------------------------------

def _float_codes(dtype: torch.dtype) -> torch.Tensor:
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    values[~torch.isfinite(values)] = float("nan")  # codes never produced
    return values


def _fp4_e2m1() -> torch.Tensor:
    magnitudes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    return torch.cat([magnitudes, -magnitudes])  # bit 3 is the sign


def _nf4() -> torch.Tensor:
    """NormalFloat-4 (QLoRA): quantiles of N(0, 1), asymmetric with an exact zero."""
    from scipy.stats import norm

    offset = 0.9677083
    positive = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())).tolist()
    return torch.tensor(sorted(positive + [0.0] + negative), dtype=torch.float32)


_CODEBOOKS = {
    "fp8e4m3": lambda: _float_codes(torch.float8_e4m3fn),
    "fp8e5m2": lambda: _float_codes(torch.float8_e5m2),
    "fp4": _fp4_e2m1,
    "nf4": _nf4,
}


@functools.lru_cache(maxsize=None)
def codebook(fmt: str) -> torch.Tensor:
    """Value of each code, normalised to max |value| = 1 (NaN for unused codes)."""
    values = _CODEBOOKS[fmt]()
    return values / values.nan_to_num(0).abs().max()


@functools.lru_cache(maxsize=None)
def _codebook_search(fmt: str):
    table = codebook(fmt)
    valid = torch.nonzero(~torch.isnan(table)).flatten()
    values, order = table[valid].sort()
    # keep one code per distinct value (+0/-0), then nearest-value boundaries
    keep = torch.ones_like(values, dtype=torch.bool)
    keep[1:] = values[1:] != values[:-1]
    values, codes = values[keep], valid[order][keep]
    return (values[1:] + values[:-1]) / 2, codes.to(torch.uint8)


def _codebook_quantize(wg, scales, fmt):
    bounds, codes = _codebook_search(fmt)
    return codes[torch.bucketize(wg / scales.unsqueeze(-1), bounds)]


# --- integer formats --------------------------------------------------------

def asym_range(lo: torch.Tensor, hi: torch.Tensor):
    """The range an asymmetric grid covers: [lo, hi] widened to include 0.

    The zero point is a code in [0, 2^bits - 1], so 0 must lie in the range; a group
    of all-positive (or all-negative) weights would otherwise lose its top (bottom).
    """
    return torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))


def int_scales(wg: torch.Tensor, bits: int, sym: bool, clip: torch.Tensor | float = 1.0):
    """Scales and zeros for integer groups: wg [out, ng, g] -> ([out, ng], [out, ng] | None)."""
    maxq = 2**bits - 1
    if sym:  # restricted range: +-absmax land exactly on codes 1 and maxq (zero point 2**(bits-1))
        absmax = wg.abs().amax(dim=-1) * clip
        scales = torch.where(absmax > 0, absmax / (2 ** (bits - 1) - 1), torch.ones_like(absmax))
        return to_storage(scales, "scales"), None
    lo, hi = asym_range(wg.amin(dim=-1) * clip, wg.amax(dim=-1) * clip)
    scales = torch.where(hi > lo, (hi - lo) / maxq, torch.ones_like(hi))
    scales = to_storage(scales, "scales")
    zeros = torch.clamp(torch.round(-lo / scales), 0, maxq)
    return scales, zeros


def quantize_groups(wg, fmt: str, bits: int, scales, zeros=None) -> torch.Tensor:
    """Codes for grouped weights given their scales (and zeros for asymmetric ints; symmetric ones are offset
    by half the range)."""
    if fmt != "int":
        return _codebook_quantize(wg, scales, fmt)
    maxq = 2**bits - 1
    offset = zeros if zeros is not None else torch.full_like(scales, 2 ** (bits - 1))
    q = torch.round(wg / scales.unsqueeze(-1)) + offset.unsqueeze(-1)
    return torch.clamp(q, 0, maxq).to(torch.uint8)


def dequantize_groups(codes, fmt: str, bits: int, scales, zeros=None) -> torch.Tensor:
    scales = scales.unsqueeze(-1)
    if fmt != "int":
        return codebook(fmt).to(scales.device)[codes.long()] * scales
    offset = zeros if zeros is not None else torch.full(scales.shape[:-1], 2 ** (bits - 1), device=scales.device)
    return (codes.float() - offset.unsqueeze(-1)) * scales


def codebook_scales(wg: torch.Tensor, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    absmax = wg.abs().amax(dim=-1) * clip
    return to_storage(torch.where(absmax > 0, absmax, torch.ones_like(absmax)), "scales")


def fit_scales(wg, fmt: str, bits: int, sym: bool, clip: torch.Tensor | float = 1.0):
    """Min/max scales (optionally shrunk by `clip`) for any format."""
    if fmt == "int":
        return int_scales(wg, bits, sym, clip)
    return codebook_scales(wg, clip), None
