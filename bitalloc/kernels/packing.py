"""Pack and unpack codes as the layout in `layout.py` describes (bit streams in int32).

Both work on slices of rows, so their int64 working tensors stay near 32 MB
whatever the layer's size (a whole 14336 x 4096 matrix at once took ~2 GB of
transient device memory while profiling an 8B model).
"""
from __future__ import annotations

import torch

from .layout import CODES_PER_CHUNK, packed_words

SLICE_ELEMENTS = 1 << 22  # codes per slice of rows


def row_slices(rows: int, cols: int) -> list[slice]:
    step = max(1, SLICE_ELEMENTS // max(cols, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, cols] -> int32 words [rows, ceil(cols/32) * bits]."""
    rows, cols = codes.shape
    words = torch.empty(rows, packed_words(cols, bits), dtype=torch.int32, device=codes.device)
    for part in row_slices(rows, cols):
        words[part] = _pack_rows(codes[part], bits)
    return words


def unpack(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack`: int32 words -> uint8 codes [rows, cols]."""
    rows = words.shape[0]
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=words.device)
    for part in row_slices(rows, cols):
        codes[part] = _unpack_rows(words[part], bits, cols)
    return codes


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = codes.shape
    chunks = -(-cols // CODES_PER_CHUNK)
    padded = torch.zeros(rows, chunks * CODES_PER_CHUNK, dtype=torch.int64, device=codes.device)
    padded[:, :cols] = codes.to(torch.int64)
    values = padded.view(rows, chunks, CODES_PER_CHUNK)
    # bit j of code i sits at stream position i*bits + j
    positions = torch.arange(CODES_PER_CHUNK, device=codes.device) * bits
    words = torch.zeros(rows, chunks, bits, dtype=torch.int64, device=codes.device)
    for j in range(bits):
        bit = (values >> j) & 1
        pos = positions + j
        words.scatter_add_(2, (pos // 32).expand(rows, chunks, -1), bit << (pos % 32))
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32).view(rows, chunks * bits)


def _unpack_rows(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    rows = words.shape[0]
    if 32 % bits == 0:  # whole codes per word: one shift and mask (int32 >> is arithmetic; the mask drops the sign)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
        codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.view(rows, -1)[:, :cols].to(torch.uint8)
    stream = words.to(torch.int64) & 0xFFFFFFFF
    stream = stream.view(rows, -1, bits)
    positions = torch.arange(CODES_PER_CHUNK, device=words.device) * bits
    codes = torch.zeros(rows, stream.shape[1], CODES_PER_CHUNK, dtype=torch.int64, device=words.device)
    for j in range(bits):
        pos = positions + j
        word = torch.gather(stream, 2, (pos // 32).expand(rows, stream.shape[1], -1))
        codes |= ((word >> (pos % 32)) & 1) << j
    return codes.view(rows, -1)[:, :cols].to(torch.uint8)
