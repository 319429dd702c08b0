"""The float16 GEMV for 2, 4 and 8 bits: two codes per instruction (half2), on the stored layout.

`gemv_units` (triton_kernels.py) spends about three float32 instructions per
code, more than a batch-1 GEMV may spend and still keep up with HBM at 4 bits
(~3.7 per code with every issue slot busy, and an H200 kept 57 % busy).  Here
each 32-bit register holds two float16 values, so one instruction serves two
codes, the way Marlin and ExLlama dequantize:

- code j of a word and code j + 16/bits (its twin in the upper half-word) sit at
  the same bit of their halves; one shift (shared by neighbouring codes) and one
  LOP3 put both into the mantissas of the float16 pair M + q (M = 2**(10 - b) for
  a code at bit b: the `_pair_codes` exponent trick);
- one HFMA2 turns that into q * s: (M + q) s - M s, exact before its one
  rounding, as M s is exact; a second HFMA2 adds q s x to a pair of partial sums;
- per word the pair of sums becomes one float32, so float16 sums only ever hold
  16/bits products; the zero-point term s z sum(x) is taken out per tile in
  float32.

Weights are scaled before they meet the activations, so the float16 products
stay small (|q s| is about the weight's size), as they do in a float16 matmul.
Activations must be float16 (bfloat16 ones would overflow float16's range):
the backend offers this kernel only for them.  A tile never crosses a group,
so the scale is one per row and step.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from .triton_kernels import _zero_rows


@triton.jit
def _pair(lo, hi):
    """uint32 words holding float16(lo) in the low and float16(hi) in the high half."""
    low = lo.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    return low | (hi.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32) << 16)


@triton.jit
def arrange_pairs(x_ptr, xp_ptr, xs_ptr, out_ptr, K, U, N, stride_xm, stride_om, BITS: tl.constexpr,
                  TILE: tl.constexpr, ZERO_OUT: tl.constexpr, BLOCK: tl.constexpr):
    """float16 x [M, K] -> xp [M, PAIRS, U] uint32 with xp[m, j, u] = (x[m, CODES u + j], x[m, CODES u + j +
    PAIRS]) as a float16 pair (zero past K), and xs[m, t] = the sum of x over units [TILE t, TILE (t + 1)) in
    float32: the GEMV's tiles.  ZERO_OUT: also zero out[m, :N], which a split-K GEMV then adds into."""
    PAIRS: tl.constexpr = 16 // BITS
    CODES: tl.constexpr = 32 // BITS
    tl.static_assert(BLOCK % TILE == 0)
    m = tl.program_id(1)
    u = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(PAIRS):
        k = u * CODES + j
        lo = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        hi = tl.load(x_ptr + m * stride_xm + k + PAIRS, mask=k + PAIRS < K, other=0.0).to(tl.float32)
        tl.store(xp_ptr + (m * PAIRS + j) * U + u, _pair(lo, hi).to(tl.int32, bitcast=True), mask=u < U)
        total += lo + hi
    tiles = tl.program_id(0) * (BLOCK // TILE) + tl.arange(0, BLOCK // TILE)
    tile_sums = tl.sum(tl.reshape(total, [BLOCK // TILE, TILE]), axis=1)
    tl.store(xs_ptr + m * tl.cdiv(U, TILE) + tiles, tile_sums, mask=tiles < tl.cdiv(U, TILE))
    if ZERO_OUT:
        _zero_rows(out_ptr + m * stride_om, N, BLOCK)


@gluon.jit
def _and_or(value, MASK: gl.constexpr, BITS: gl.constexpr):
    """(value & MASK) | BITS as one LOP3 (ptxas makes two of the plain expression: two immediates)."""
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
def _pair_codes(w, J: gl.constexpr, BITS: gl.constexpr):
    """Codes J and J + 16 // BITS of words w as the float16 pair M + q, M = 2**(10 - b); and M.

    The word is shifted by a multiple of the span of codes that fit in the
    10-bit mantissa (one shift per span), leaving code J at bit b of the low
    half and its twin at bit b of the high half.
    """
    FIT: gl.constexpr = (10 - BITS) // BITS + 1
    SPAN: gl.constexpr = FIT * BITS
    o: gl.constexpr = J * BITS
    d: gl.constexpr = o // SPAN * SPAN
    b: gl.constexpr = o - d
    MASK: gl.constexpr = ((1 << BITS) - 1) << b
    EXPONENT: gl.constexpr = (25 - b) << 10  # float16 2**(10 - b): its mantissa's bit b is worth 1
    M: gl.constexpr = 1 << (10 - b)
    if d > 0:
        w = w >> d
    return _and_or(w, MASK | (MASK << 16), EXPONENT | (EXPONENT << 16)), M


@gluon.jit
def gemv_pairs(xp_ptr, xs_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, U, NG, stride_om, BITS: gl.constexpr,
               GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_U: gl.constexpr,
               VEC: gl.constexpr, STAGES: gl.constexpr, SPLIT_K: gl.constexpr, EVEN: gl.constexpr):
    """One row of float16 activations (arranged by `arrange_pairs`) against [rows, words] of packed codes:
    per row and tile, s * (sum_j q_j x_j - z sum_j x_j), two codes per instruction (module docstring).

    Gluon, for its explicit layouts and asynchronous copies.  Each thread holds VEC consecutive words
    of a row, and per-row values live in the tile layout's row slice, so nothing moves between layouts
    (plain Triton moved scales through shared memory, with barriers, at every step).  Tiles stream
    through a ring of STAGES shared-memory buffers by cp.async, STAGES - 1 ahead: the bytes in flight
    cost no registers (a register prefetch held 169 per thread and ran at 12 % occupancy on the H200).
    Every thread copies exactly the words it later reads, so no barrier is needed.  Tiles and
    split-K as in `gemv_units`.
    """
    PAIRS: gl.constexpr = 16 // BITS
    CODES: gl.constexpr = 32 // BITS
    LANES_U: gl.constexpr = min(32, BLOCK_U // VEC)  # VEC <= BLOCK_U (the launcher's clamp)
    TILE: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // LANES_U, LANES_U], [gl.num_warps(), 1], [1, 0])
    ROWS: gl.constexpr = gl.SliceLayout(1, TILE)
    COLS: gl.constexpr = gl.SliceLayout(0, TILE)
    gl.static_assert(GROUP % (BLOCK_U * CODES) == 0, "a tile must lie in one group")
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    m = gl.program_id(2)
    xp_ptr += m * PAIRS * U
    xs_ptr += m * gl.cdiv(U, BLOCK_U)
    rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=ROWS)
    row_ok = rows < N
    lanes = gl.arange(0, BLOCK_U, layout=COLS)
    tiles = gl.cdiv(U, BLOCK_U)
    per_split = gl.cdiv(tiles, SPLIT_K)
    first = pid_k * per_split
    last = gl.minimum(first + per_split, tiles)
    dots = gl.zeros([BLOCK_N], gl.float32, ROWS)
    row_words = qw_ptr + gl.expand_dims(rows, 1) * U
    ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, BLOCK_U], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    for early in gl.static_range(STAGES - 1):
        _copy_tile(ring.index(early), row_words, row_ok, first + early, last, lanes, U, BLOCK_U, EVEN)
    side = _side_data(xp_ptr, xs_ptr, s_ptr, z_ptr, rows, row_ok, NG, first, lanes, U, BITS, GROUP, HAS_ZEROS,
                      BLOCK_U, EVEN)
    for tile in range(first, last):
        ahead = tile + STAGES - 1
        _copy_tile(ring.index((ahead - first) % STAGES), row_words, row_ok, ahead, last, lanes, U, BLOCK_U, EVEN)
        s, z, total, x = side
        # scales, zeros and activations of the next tile are loaded now, used one step later (the last tile
        # loads itself again: cache hits): every load of the step is in flight while it computes
        side = _side_data(xp_ptr, xs_ptr, s_ptr, z_ptr, rows, row_ok, NG, gl.minimum(tile + 1, last - 1), lanes, U,
                          BITS, GROUP, HAS_ZEROS, BLOCK_U, EVEN)
        async_copy.wait_group(STAGES - 1)  # this tile's words have landed
        w = ring.index((tile - first) % STAGES).load(TILE).to(gl.uint32, bitcast=True)
        scale = gl.expand_dims(_half_pair(s), 1)
        part = gl.zeros([BLOCK_N, BLOCK_U], gl.uint32, TILE)  # float16 pairs (+0, +0)
        for j in gl.static_range(PAIRS):
            codes, M = _pair_codes(w, j, BITS)
            dequantized = _fma_f16x2(codes, scale, gl.expand_dims(_half_pair(-M * s), 1))  # q s, one rounding
            part = _fma_f16x2(dequantized, gl.expand_dims(x[j], 0), part)
        dots += gl.sum(_sum_f16x2(part), axis=1) - z * s * total
    async_copy.wait_group(0)
    if SPLIT_K == 1:
        gl.store(out_ptr + m * stride_om + rows, dots.to(out_ptr.dtype.element_ty), mask=row_ok)
    else:
        gl.atomic_add(out_ptr + m * stride_om + rows, dots, mask=row_ok, sem="relaxed")


@gluon.jit
def _side_data(xp_ptr, xs_ptr, s_ptr, z_ptr, rows, row_ok, NG, tile, lanes, U, BITS: gl.constexpr,
               GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, BLOCK_U: gl.constexpr, EVEN: gl.constexpr):
    """What a tile needs besides its words: per-row scale and zero (float32), the tile's sum of x, and its
    PAIRS activation pairs (a tuple of uint32 vectors)."""
    CODES: gl.constexpr = 32 // BITS
    where = rows * NG + (tile * BLOCK_U * CODES) // GROUP
    s = gl.load(s_ptr + where, mask=row_ok, other=0.0).to(gl.float32)
    if HAS_ZEROS:
        z = gl.load(z_ptr + where, mask=row_ok, other=0.0).to(gl.float32)
    else:
        z = gl.full(s.shape, (1 << (BITS - 1)) * 1.0, gl.float32, s.type.layout)
    total = gl.load(xs_ptr + tile)  # the tile's sum of x (`arrange_pairs`)
    cols = tile * BLOCK_U + lanes
    x = ()
    for j in gl.static_range(16 // BITS):
        if EVEN:
            pair = gl.load(xp_ptr + j * U + cols)
        else:
            pair = gl.load(xp_ptr + j * U + cols, mask=cols < U, other=0)
        x = x + (pair.to(gl.uint32, bitcast=True),)
    return s, z, total, x


@gluon.jit
def _copy_tile(buffer, row_words, row_ok, tile, last, lanes, U, BLOCK_U: gl.constexpr, EVEN: gl.constexpr):
    """Start copying words [tile * BLOCK_U, +BLOCK_U) of the rows at `row_words` into `buffer` (zeros past
    the split's last tile, past U and for rows past N), as one cp.async group."""
    cols = tile * BLOCK_U + lanes
    ok = gl.expand_dims(row_ok & (tile < last), 1)
    if not EVEN:
        ok = ok & gl.expand_dims(cols < U, 0)
    async_copy.async_copy_global_to_shared(buffer, row_words + gl.expand_dims(cols, 0), mask=ok)
    async_copy.commit_group()
