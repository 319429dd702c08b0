"""The float16 GEMV for 2, 3, 4 and 8 bits: two codes per instruction (half2), on the stored layout.

`gemv_units` (triton_kernels.py) spends about 3.5 float32 instructions per code
and spreads each tile over many threads.  Here each 32-bit register holds two
float16 values, so one instruction serves two codes, the way Marlin and ExLlama
dequantize:

- code j of a word and code j + 16/bits (its twin in the upper half-word) sit at
  the same bit of their halves; one shift (shared by neighbouring codes) and one
  LOP3 put both into the mantissas of the float16 pair M + q (M = 2**(10 - b) for
  a code at bit b: the `_pair_codes` exponent trick);
- one HFMA2 turns that into q * s: (M + q) s - M s, exact before its one
  rounding, as M s is exact; a second HFMA2 adds q s x to a pair of partial sums;
- float16 sums hold 8 products before they become float32; the zero-point term
  s z sum(x) is taken out per chunk in float32;
- 3-bit codes fill a 96-bit stream of three words (32 codes, straddling words
  and half-words); code j and code j + 16, 48 bits apart, are twins: the
  stream's windows at their position are shifted down and their low halves
  merged (one PRMT), after which the same LOP3 applies.

Weights are scaled before they meet the activations, so the float16 products
stay small (|q s| is about the weight's size), as they do in a float16 matmul.
Activations must be float16 (bfloat16 ones would overflow float16's range):
the backend offers this kernel only for them.

The GEMV is written in Gluon (Triton's layout-explicit dialect) so that lanes
and warps run along the row and every thread keeps its chunk of a few whole
rows: each thread's activations serve all its rows, per-row values are one per
row and chunk, and nothing moves between layouts.  Measured on the H200
(docs/RESULTS.md), this beat the layouts plain Triton chose, a shared-memory
ring of cp.async copies, and whole tile rows per thread.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .triton_kernels import _zero_rows

SUMMED = gl.constexpr(8)  # products per float16 half before the sum moves to float32


@triton.jit
def _pair(lo, hi):
    """uint32 words holding float16(lo) in the low and float16(hi) in the high half."""
    low = lo.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    return low | (hi.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32) << 16)


@triton.jit
def arrange_pairs(x_ptr, xp_ptr, xs_ptr, out_ptr, K, U, N, stride_xm, stride_om, CODES: tl.constexpr,
                  TILE: tl.constexpr, ZERO_OUT: tl.constexpr, BLOCK: tl.constexpr, OFFSETS: tl.constexpr = False):
    """float16 x [M, K] -> xp [M, PAIRS, U] uint32 with xp[m, j, u] = (x[m, CODES u + j], x[m, CODES u + j +
    PAIRS]) as a float16 pair (zero past K; CODES per unit, PAIRS = CODES / 2), and xs[m, t] = the sum of x over
    units [TILE t, TILE (t + 1)) in float32: the GEMV's chunks.  OFFSETS: xs is [M, 2, T] and xs[m, 1, t] the
    chunk's sum of M_j x over the offsets M_j that `_pair_codes` leaves on pair j (what the tensor-core GEMV
    takes out once per chunk instead of once per pair).  ZERO_OUT: also zero out[m, :N], which a split-K
    GEMV then adds into."""
    PAIRS: tl.constexpr = CODES // 2
    tl.static_assert(BLOCK % TILE == 0)
    m = tl.program_id(1)
    u = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    weighted = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(PAIRS):
        k = u * CODES + j
        lo = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        hi = tl.load(x_ptr + m * stride_xm + k + PAIRS, mask=k + PAIRS < K, other=0.0).to(tl.float32)
        tl.store(xp_ptr + (m * PAIRS + j) * U + u, _pair(lo, hi).to(tl.int32, bitcast=True), mask=u < U)
        total += lo + hi
        if OFFSETS:
            weighted += (lo + hi) * code_offset(j, _unit_bits(CODES))
    tiles = tl.program_id(0) * (BLOCK // TILE) + tl.arange(0, BLOCK // TILE)
    T = tl.cdiv(U, TILE)
    row = xs_ptr + m * (2 if OFFSETS else 1) * T
    tl.store(row + tiles, tl.sum(tl.reshape(total, [BLOCK // TILE, TILE]), axis=1), mask=tiles < T)
    if OFFSETS:
        tl.store(row + T + tiles, tl.sum(tl.reshape(weighted, [BLOCK // TILE, TILE]), axis=1), mask=tiles < T)
    if ZERO_OUT:
        _zero_rows(out_ptr + m * stride_om, N, BLOCK)


@gluon.jit
def _and_or(value, MASK: gl.constexpr, BITS: gl.constexpr):
    """(value & MASK) | BITS as one LOP3: the Gluon twin of `triton_kernels._and_or` (Gluon's constants
    need the operand's layout)."""
    mask = gl.full(value.shape, MASK, gl.uint32, value.type.layout)
    bits = gl.full(value.shape, BITS, gl.uint32, value.type.layout)
    return gl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [value, mask, bits],
                                     dtype=gl.uint32, is_pure=True, pack=1)


@gluon.jit
def _fma_f16x2(a, b, c):
    """a * b + c on both float16 halves: one HFMA2."""
    return gl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=gl.uint32,
                                     is_pure=True, pack=1)


@gluon.jit
def _sum_f16x2(a):
    """The sum of both float16 halves, as float32."""
    return gl.inline_asm_elementwise(
        "{ .reg .f16 lo, hi; .reg .f32 flo, fhi; mov.b32 {lo, hi}, $1; cvt.f32.f16 flo, lo; cvt.f32.f16 fhi, hi;"
        " add.f32 $0, flo, fhi; }", "=r,r", [a], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _half_pair(v):
    """float32 v as the float16 pair (v, v) in a uint32."""
    half = v.to(gl.float16).to(gl.uint16, bitcast=True).to(gl.uint32)
    return half | (half << 16)


@gluon.jit
def _merge_halves(low, high):
    """The low half-words of `low` and of `high` as one word (one PRMT)."""
    return gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [low, high], dtype=gl.uint32,
                                     is_pure=True, pack=1)


@gluon.jit
def _merge_high_halves(low, high):
    """The high half-words of `low` and of `high` as one word (one PRMT)."""
    return gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [low, high], dtype=gl.uint32,
                                     is_pure=True, pack=1)


@gluon.jit
def _stream_bits(words, START: gl.constexpr):
    """Bits START.. of a unit's bit stream (the tuple of its words) at bit 0: the next 9 at least."""
    k: gl.constexpr = START // 32
    r: gl.constexpr = START % 32
    if r == 0:
        value = words[k]
    elif r > 23 and k < 2:  # the 9 bits cross into the next word
        value = (words[k] >> r) | (words[k + 1] << (32 - r))
    else:
        value = words[k] >> r
    return value


@gluon.jit
def _pair_codes(w, J: gl.constexpr, BITS: gl.constexpr):
    """Codes J and J + PAIRS of a unit (the tuple w of its words) as the float16 pair M + q, M = 2**(10 - b)
    (`code_offset`).

    2, 4, 8 bits (one word): the word is shifted by a multiple of the span of
    codes that fit in the 10-bit mantissa (one shift per span), leaving code J
    at bit b of the low half and its twin at bit b of the high half.  3 bits
    (three words, 32 codes, twins 48 bits apart): the stream's windows at bit
    9 (J // 3) and 48 bits further are shifted down and their low halves merged,
    so codes J of a window sit at bits b = 0, 3, 6 of both halves.
    """
    b: gl.constexpr = code_bit(J, BITS)
    d: gl.constexpr = J * BITS - b  # the shift that leaves code J at bit b (2, 4, 8 bits)
    MASK: gl.constexpr = ((1 << BITS) - 1) << b
    EXPONENT: gl.constexpr = (25 - b) << 10  # float16 2**(10 - b): its mantissa's bit b is worth 1
    if BITS == 3:
        both = _merge_halves(_stream_bits(w, 9 * (J // 3)), _stream_bits(w, 9 * (J // 3) + 48))
    elif d > 0:
        both = w[0] >> d
    else:
        both = w[0]
    return _and_or(both, MASK | (MASK << 16), EXPONENT | (EXPONENT << 16))


@gluon.jit
def gemv_pairs(xp_ptr, xs_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, U, NG, stride_om, BITS: gl.constexpr,
               GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, BLOCK_N: gl.constexpr, VEC: gl.constexpr,
               SPLIT_K: gl.constexpr):
    """One row of float16 activations (arranged by `arrange_pairs`, sums per VEC units) against BLOCK_N rows
    of packed codes: s * (sum_j q_j x_j - z sum_j x_j), two codes per instruction (module docstring).
    A unit is a word (2, 4, 8 bits) or the three words of 32 three-bit codes; U units per row.

    Lanes and warps run along the row: a step covers 32 * num_warps chunks of VEC units (one 16-byte
    load per row and thread at VEC = 4 words), each thread holds its chunk of all BLOCK_N rows.  So a warp
    reads 512 contiguous bytes of a row per load, each thread's activation pairs serve BLOCK_N rows
    and are loaded by no other thread, and per-row values are one per row and chunk.  The next step's
    words, scales, zeros and activations are loaded before this one is computed.  Float16 sums hold
    SUMMED products per half (over GATHER steps, or within a step of 16 pairs; the scale is in each
    product, so they may cross groups); rows are reduced over lanes and warps once, at the end.
    """
    PAIRS: gl.constexpr = _pairs_per_unit(BITS)
    GATHER: gl.constexpr = max(1, SUMMED // PAIRS)
    WARPS: gl.constexpr = gl.num_warps()
    CHUNKS: gl.constexpr = 32 * WARPS
    STEP: gl.constexpr = CHUNKS * VEC  # units per row and step
    TILE: gl.constexpr = gl.BlockedLayout([BLOCK_N, 1, VEC], [1, 32, 1], [1, WARPS, 1], [2, 1, 0])
    PER_CHUNK: gl.constexpr = gl.SliceLayout(2, TILE)  # [BLOCK_N, CHUNKS]
    ROWS: gl.constexpr = gl.SliceLayout(1, PER_CHUNK)
    gl.static_assert(GROUP % (VEC * 2 * PAIRS) == 0, "a chunk must lie in one group")
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    m = gl.program_id(2)
    xp_ptr += m * PAIRS * U
    xs_ptr += m * gl.cdiv(U, VEC)
    rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=ROWS)
    chunks = gl.arange(0, CHUNKS, layout=gl.SliceLayout(0, PER_CHUNK))
    CHUNK_WORDS: gl.constexpr = gl.SliceLayout(0, TILE)  # [CHUNKS, VEC]
    lanes = (gl.expand_dims(gl.arange(0, CHUNKS, layout=gl.SliceLayout(1, CHUNK_WORDS)), 1) * VEC
             + gl.expand_dims(gl.arange(0, VEC, layout=gl.SliceLayout(0, CHUNK_WORDS)), 0))  # words of a step
    steps = gl.cdiv(U, STEP)
    per_split = gl.cdiv(steps, SPLIT_K)
    first = pid_k * per_split
    last = gl.minimum(first + per_split, steps)
    row_ok = gl.expand_dims(rows < N, 1)  # [BLOCK_N, 1]
    rows2 = gl.expand_dims(rows, 1)
    step_data = _step_data(qw_ptr, xp_ptr, xs_ptr, s_ptr, z_ptr, rows2, row_ok, chunks, lanes, NG, U, first,
                           first < last, BITS, GROUP, HAS_ZEROS, VEC, STEP)
    acc = gl.zeros([BLOCK_N, CHUNKS], gl.float32, PER_CHUNK)
    part = gl.zeros([BLOCK_N, CHUNKS, VEC], gl.uint32, TILE)  # float16 pairs (+0, +0)
    for step in range(first, last):
        w, x, s, z, total = step_data
        # the next step's loads are issued before this one computes (masked off after the last)
        step_data = _step_data(qw_ptr, xp_ptr, xs_ptr, s_ptr, z_ptr, rows2, row_ok, chunks, lanes, NG, U, step + 1,
                               step + 1 < last, BITS, GROUP, HAS_ZEROS, VEC, STEP)
        scale = gl.expand_dims(_half_pair(s), 2)
        for j in gl.static_range(PAIRS):
            offset = gl.expand_dims(_half_pair(-code_offset(j, BITS) * s), 2)
            dequantized = _fma_f16x2(_pair_codes(w, j, BITS), scale, offset)  # q s, one rounding
            part = _fma_f16x2(dequantized, gl.expand_dims(x[j], 0), part)
            if PAIRS > SUMMED and j % SUMMED == SUMMED - 1:
                acc += gl.sum(_sum_f16x2(part), axis=2)
                part = gl.zeros([BLOCK_N, CHUNKS, VEC], gl.uint32, TILE)
        acc -= z * s * gl.expand_dims(total, 0)
        if PAIRS <= SUMMED and (step - first) % GATHER == GATHER - 1:
            acc += gl.sum(_sum_f16x2(part), axis=2)
            part = gl.zeros([BLOCK_N, CHUNKS, VEC], gl.uint32, TILE)
    dots = gl.sum(acc + gl.sum(_sum_f16x2(part), axis=2), axis=1)
    if SPLIT_K == 1:
        gl.store(out_ptr + m * stride_om + rows, dots.to(out_ptr.dtype.element_ty), mask=rows < N)
    else:
        gl.atomic_add(out_ptr + m * stride_om + rows, dots, mask=rows < N, sem="relaxed")


@gluon.jit
def _step_data(qw_ptr, xp_ptr, xs_ptr, s_ptr, z_ptr, rows2, row_ok, chunks, lanes, NG, U, step, live,
               BITS: gl.constexpr, GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, VEC: gl.constexpr,
               STEP: gl.constexpr):
    """A step's words (a tuple of each unit's words, [BLOCK_N, CHUNKS, VEC] uint32), its PAIRS activation
    pairs [CHUNKS, VEC] (a tuple), scales and zeros [BLOCK_N, CHUNKS] (float32) and the chunks' sums of x
    [CHUNKS]; zeros unless `live`."""
    PAIRS: gl.constexpr = _pairs_per_unit(BITS)
    WORDS: gl.constexpr = PAIRS * 2 * BITS // 32
    u = step * STEP + lanes  # [CHUNKS, VEC]
    chunk = step * (STEP // VEC) + chunks  # [CHUNKS]
    where = rows2 * NG + gl.expand_dims((chunk * VEC * 2 * PAIRS) // GROUP, 0)  # [BLOCK_N, CHUNKS]
    u_ok = (u < U) & live
    chunk_ok = (chunk * VEC < U) & live
    row_live = row_ok & live
    w = ()
    for k in gl.static_range(WORDS):
        word = gl.load(qw_ptr + gl.expand_dims(rows2, 2) * (U * WORDS) + gl.expand_dims(u * WORDS + k, 0),
                       mask=gl.expand_dims(row_live, 2) & gl.expand_dims(u_ok, 0), other=0)
        w = w + (word.to(gl.uint32, bitcast=True),)
    per_chunk_ok = row_live & gl.expand_dims(chunk_ok, 0)
    s = gl.load(s_ptr + where, mask=per_chunk_ok, other=0.0).to(gl.float32)
    if HAS_ZEROS:
        z = gl.load(z_ptr + where, mask=per_chunk_ok, other=0.0).to(gl.float32)
    else:
        z = gl.full(s.shape, (1 << (BITS - 1)) * 1.0, gl.float32, s.type.layout)
    total = gl.load(xs_ptr + chunk, mask=chunk_ok, other=0.0)
    x = ()
    for j in gl.static_range(PAIRS):
        pair = gl.load(xp_ptr + j * U + u, mask=u_ok, other=0)
        x = x + (pair.to(gl.uint32, bitcast=True),)
    return w, x, s, z, total


@gluon.constexpr_function
def code_bit(j, bits):
    """The bit b of a half-word at which `_pair_codes` leaves code j: 2, 4, 8 bits shift a word by a multiple
    of the span of codes that fit in the 10-bit mantissa; 3-bit windows hold codes at 0, 3, 6."""
    if bits == 3:
        return 3 * (j % 3)
    span = ((10 - bits) // bits + 1) * bits
    return j * bits % span


@gluon.constexpr_function
def code_offset(j, bits):
    """M = 2**(10 - b): the float16 pair `_pair_codes` makes of codes j and j + PAIRS is M + q."""
    return 1 << (10 - code_bit(j, bits))


@gluon.constexpr_function
def _unit_bits(codes):
    """Bits per code from codes per unit: a word of 32 // bits codes, or the 32 codes of three 3-bit words."""
    return 3 if codes == 32 else 32 // codes


@gluon.constexpr_function
def _pairs_per_unit(bits):
    """Code pairs per unit: a word holds 16 // bits pairs; the three words of 32 three-bit codes hold 16."""
    return 16 if bits == 3 else 16 // bits
