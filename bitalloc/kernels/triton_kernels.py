"""Triton kernels for quantized linears: weight-only (W2/W3/W4/W8, A16) on the stored layout, and W8A8.

The weight stays as stored (`layout.py`): codes as a little-endian bit stream of
int32 words along each row, float16 scales and zeros per group.  Nothing is
repacked, so the GPU holds exactly the bytes the cost model counts.

- `gemv_units` (after `arrange_activations`): a few rows of activations.  Tiles
  of rows x 128 codes are loaded as contiguous vectors along each row; a code
  becomes a float with one shift and one AND-OR (`_code_float`), one FMA with
  x; offsets and zeros come out per unit from sums the activation pass made;
  split-K programs add float32 partial sums atomically.
- `scaled_int_matmul`: W8A8 (and W4A8/W4A4 codes held in int8): the int8 tensor-core
  product with the per-token and per-channel rescaling fused into its epilogue.
- `dequantize_codes`: larger batches (and group sizes that are not multiples
  of 32): the weight is dequantized to the activation dtype by one fully
  parallel pass (codes gathered from the word(s) holding them) into a
  temporary, which cuBLAS multiplies.  A fused dequantize-and-dot kernel
  (tl.dot over gathered codes) was measured slower on the H100: its K loop
  was latency-bound with one program per SM.

Codes become floats with the exponent trick (code | 0x4B000000 is the float
2**23 + code), which costs two integer ops instead of a slow int->float convert.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")  # no inline PTX on the CPU
MAGIC = tl.constexpr(0x4B000000)  # bits of float32 2**23: OR-ing a small integer into the mantissa gives 2**23 + code
MAGIC_FLOAT = tl.constexpr(8388608.0)


@triton.jit
def _and_or(value, MASK: tl.constexpr, BITS: tl.constexpr):
    """(value & MASK) | BITS as one LOP3 instruction: from the plain expression ptxas makes two, as one
    instruction cannot take two immediates; this is half the integer work of each code in the GEMV."""
    if INTERPRETED:
        return (value & MASK) | BITS
    mask = tl.full(value.shape, MASK, tl.uint32)
    bits = tl.full(value.shape, BITS, tl.uint32)
    return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [value, mask, bits],
                                     dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _shifted(word, D: tl.constexpr):
    if D >= 0:
        return word >> D
    else:
        return word << (-D)


@triton.jit
def _code_float(w0, w1, w2, J: tl.constexpr, BITS: tl.constexpr, PER_SHIFT: tl.constexpr):
    """Code J of a unit (one word, or three words for 3 bits) as the float M_J + code, with M_J = 2**(23 - t).

    The code is moved (one shift, shared by PER_SHIFT neighbouring codes) to bit
    t of the mantissa and given an exponent, so one AND-OR makes the float:
    M_J + code exactly, M_J <= 2**(BITS * PER_SHIFT).  With all words zero
    this returns M_J itself.  Codes straddling two words (3 bits) are joined first.
    """
    TOP: tl.constexpr = 23 - BITS  # the highest bit a code may start at and stay in the mantissa
    MASK: tl.constexpr = (1 << BITS) - 1
    start: tl.constexpr = BITS * J
    i: tl.constexpr = start // 32
    o: tl.constexpr = start % 32
    if i == 0:
        word = w0
        nxt = w1
    elif i == 1:
        word = w1
        nxt = w2
    else:
        word = w2
        nxt = w2
    if o + BITS > 32:
        t: tl.constexpr = TOP
        placed = (word >> (o - t)) | (nxt << (32 - o + t))
    else:
        first: tl.constexpr = (BITS - (32 * i) % BITS) % BITS  # where word i's first whole code starts
        span: tl.constexpr = BITS * PER_SHIFT
        base: tl.constexpr = first + (o - first) // span * span
        d: tl.constexpr = base - (23 - span)
        t: tl.constexpr = o - d
        placed = _shifted(word, d)
    return _and_or(placed, MASK << t, (150 - t) << 23).to(tl.float32, bitcast=True)


@triton.jit
def arrange_activations(x_ptr, xt_ptr, xb_ptr, out_ptr, K, U, N, stride_xm, stride_om, BITS: tl.constexpr,
                        PER_SHIFT: tl.constexpr, ZERO_OUT: tl.constexpr, BLOCK: tl.constexpr):
    """x [M, K] -> xt [M, CODES, U] float32 with xt[m, j, u] = x[m, CODES u + j] (zero padded), and per unit u
    xb[m, 0, u] = sum_j x, xb[m, 1, u] = sum_j M_j x (the offsets `_code_float` adds, taken out per unit).
    ZERO_OUT: also zero out[m, :N], which a split-K GEMV then adds into (no separate memset launch)."""
    WORDS: tl.constexpr = 1 if 32 % BITS == 0 else BITS
    CODES: tl.constexpr = 32 * WORDS // BITS
    m = tl.program_id(1)
    u = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    u_ok = u < U
    zero = tl.zeros([BLOCK], dtype=tl.uint32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    offsets = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(CODES):
        k = u * CODES + j
        x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        tl.store(xt_ptr + (m * CODES + j) * U + u, x, mask=u_ok)
        total += x
        offsets += _code_float(zero, zero, zero, j, BITS, PER_SHIFT) * x
    tl.store(xb_ptr + m * 2 * U + u, total, mask=u_ok)
    tl.store(xb_ptr + (m * 2 + 1) * U + u, offsets, mask=u_ok)
    if ZERO_OUT:
        _zero_rows(out_ptr + m * stride_om, N, BLOCK)


@triton.jit
def _zero_rows(out_ptr, N, BLOCK: tl.constexpr):
    """out[:N] = 0, shared by the programs of axis 0 (a split-K output, before the GEMV adds into it)."""
    for start in range(tl.program_id(0) * BLOCK, N, tl.num_programs(0) * BLOCK):
        n = start + tl.arange(0, BLOCK)
        tl.store(out_ptr + n, tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty), mask=n < N)


@triton.jit
def _load_words(ptr, ok, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(ptr).to(tl.uint32, bitcast=True)
    return tl.load(ptr, mask=ok, other=0).to(tl.uint32, bitcast=True)


@triton.jit
def _load_unit_words(qw_ptr, rows, row_ok, tile, U, KW, WORDS: tl.constexpr, BLOCK_U: tl.constexpr,
                     EVEN: tl.constexpr):
    """The WORDS words (unpacked as uint32) of units tile * BLOCK_U + [0, BLOCK_U) of `rows`: 3 tensors."""
    u = tile * BLOCK_U + tl.arange(0, BLOCK_U)
    ok = row_ok[:, None] & (u < U)[None, :]
    base = qw_ptr + rows[:, None] * KW + (u * WORDS)[None, :]
    w0 = _load_words(base, ok, EVEN)
    if WORDS > 1:
        w1 = _load_words(base + 1, ok, EVEN)
        w2 = _load_words(base + 2, ok, EVEN)
    else:
        w1 = w0
        w2 = w0
    return w0, w1, w2


@triton.jit
def gemv_units(xt_ptr, xb_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, U, KW, NG, stride_om,
               BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, PER_SHIFT: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr):
    """One row of activations (arranged by `arrange_activations`) against [rows, units] of packed codes.

    A unit is one int32 word (2, 4, 8 bits) or the three words of 32 codes (3
    bits); a tile is BLOCK_N rows x BLOCK_U units, loaded contiguously along
    the row.  Each code becomes M_J + q by a constant shift and one AND-OR
    (`_code_float`) and is multiplied by x; per unit, sum (q - z) x = part -
    sum M_J x - z sum x, then times the group's scale.  When a tile lies in one
    group (GROUP a multiple of its codes) scales and zeros are one load per row.
    Split-K adds the partial sums atomically into a float32 output zeroed by
    `arrange_activations` (no memset launch).
    """
    WORDS: tl.constexpr = 1 if 32 % BITS == 0 else BITS
    CODES: tl.constexpr = 32 * WORDS // BITS
    ROW_SCALES: tl.constexpr = GROUP % (BLOCK_U * CODES) == 0
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    xt_ptr += m * CODES * U
    xb_ptr += m * 2 * U
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tiles = tl.cdiv(U, BLOCK_U)
    per_split = tl.cdiv(tiles, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, tiles)
    acc = tl.zeros([BLOCK_N, BLOCK_U], dtype=tl.float32)
    dots = tl.zeros([BLOCK_N], dtype=tl.float32)  # the row-scale tiles' results
    w0, w1, w2 = _load_unit_words(qw_ptr, rows, row_ok, first, U, KW, WORDS, BLOCK_U, EVEN)
    for tile in range(first, last):
        u = tile * BLOCK_U + tl.arange(0, BLOCK_U)
        u_ok = u < U
        ok = row_ok[:, None] & u_ok[None, :]
        # the next tile's words are loaded before this one is used, so a load is always in flight
        # (the last tile loads itself again: a cache hit, no mask needed)
        n0, n1, n2 = _load_unit_words(qw_ptr, rows, row_ok, tl.minimum(tile + 1, last - 1), U, KW, WORDS, BLOCK_U,
                                      EVEN)
        part = tl.zeros([BLOCK_N, BLOCK_U], dtype=tl.float32)
        cols = u[None, :]  # [1, BLOCK_U] loads take the tile's layout: no shuffles to broadcast them over rows
        cols_ok = u_ok[None, :]
        for j in tl.static_range(CODES):
            if EVEN:
                x = tl.load(xt_ptr + j * U + cols)
            else:
                x = tl.load(xt_ptr + j * U + cols, mask=cols_ok, other=0.0)
            part += _code_float(w0, w1, w2, j, BITS, PER_SHIFT) * x
        if EVEN:
            total = tl.load(xb_ptr + cols)
            offsets = tl.load(xb_ptr + U + cols)
        else:
            total = tl.load(xb_ptr + cols, mask=cols_ok, other=0.0)
            offsets = tl.load(xb_ptr + U + cols, mask=cols_ok, other=0.0)
        if ROW_SCALES:  # one scale and zero per row: reduce the tile to one dot per row first, then scale
            where = rows * NG + (tile * BLOCK_U * CODES) // GROUP
            s = tl.load(s_ptr + where, mask=row_ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + where, mask=row_ok, other=0.0).to(tl.float32)
            else:
                z = (1 << (BITS - 1)) * 1.0
            dots += s * (tl.sum(part, axis=1) - tl.sum(offsets, axis=1) - z * tl.sum(total, axis=1))
        else:
            where = rows[:, None] * NG + (cols * CODES) // GROUP
            s = tl.load(s_ptr + where, mask=ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + where, mask=ok, other=0.0).to(tl.float32)
            else:
                z = (1 << (BITS - 1)) * 1.0
            acc += s * (part - offsets - z * total)
        w0, w1, w2 = n0, n1, n2
    if ROW_SCALES:
        total_rows = dots
    else:
        total_rows = tl.sum(acc, axis=1)
    _store_rows(out_ptr + m * stride_om, rows, row_ok, total_rows, SPLIT_K)


@triton.jit
def _store_rows(out_ptr, rows, row_ok, values, SPLIT_K: tl.constexpr):
    """A GEMV's results: stored, or with split-K added atomically (relaxed: acq_rel costs a fence per add)."""
    if SPLIT_K == 1:
        tl.store(out_ptr + rows, values.to(out_ptr.dtype.element_ty), mask=row_ok)
    else:
        tl.atomic_add(out_ptr + rows, values, mask=row_ok, sem="relaxed")


@triton.jit
def _gather_codes(row_base, k, KW, ok, BITS: tl.constexpr):
    """Codes at columns `k` of rows starting at word pointers `row_base` (broadcast together)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    bit = k * BITS
    word = bit >> 5
    offset = (bit & 31).to(tl.uint32)
    lo = tl.load(row_base + word, mask=ok, other=0).to(tl.uint32, bitcast=True)
    codes = lo >> offset
    if 32 % BITS != 0:  # a code may straddle two words
        hi = tl.load(row_base + word + 1, mask=ok & (word + 1 < KW), other=0).to(tl.uint32, bitcast=True)
        codes = codes | ((hi << 1) << (31 - offset))
    return codes & MASK


@triton.jit
def dequantize_codes(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, KW, NG, BITS: tl.constexpr, GROUP: tl.constexpr,
                     HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """w[n, k] = (q - z) * s in w's dtype: one [BLOCK_N, BLOCK_K] tile per program, no loop.  The same
    float32 operations as `QuantizedWeight.dequantize_codes`, so the result is bit-identical to it."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rn[:, None] < N) & (k[None, :] < K)
    codes = _gather_codes(qw_ptr + rn[:, None] * KW, k[None, :], KW, ok, BITS)
    where = rn[:, None] * NG + tl.minimum(k // GROUP, NG - 1)[None, :]
    s = tl.load(s_ptr + where, mask=ok, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + where, mask=ok, other=0.0).to(tl.float32)
    else:
        z = (1 << (BITS - 1)) * 1.0
    q = (codes | MAGIC).to(tl.float32, bitcast=True) - MAGIC_FLOAT  # exact; then the reference's arithmetic
    w = (q - z) * s
    tl.store(w_ptr + rn[:, None] * K + k[None, :], w.to(w_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _kept_chunk(row_ptr, keep_ptr, k, K, HAS_KEEP: tl.constexpr):
    """Columns k of one activation row as float32, outlier channels (keep == 0) zeroed."""
    x = tl.load(row_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    if HAS_KEEP:
        x = x * tl.load(keep_ptr + k, mask=k < K, other=0.0)
    return x


@triton.jit
def quantize_rows(x_ptr, keep_ptr, q_ptr, scale_ptr, rowsum_ptr, K, stride_x, QMAX: tl.constexpr,
                  HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr):
    """Per-token symmetric quantization of one row: int8 codes, float32 scale and the codes' sum.

    Same arithmetic as `fake_quantize_tokens` in float16: scale = absmax / QMAX
    rounded to the input dtype, codes = round-half-even(x / scale).  Channels
    with keep == 0 (fp16 outlier channels) are quantized as zeros.
    """
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    absmax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        x = _kept_chunk(x_ptr + row * stride_x, keep_ptr, start + cols, K, HAS_KEEP)
        absmax = tl.maximum(absmax, tl.abs(x))
    scale = (tl.maximum(tl.max(absmax, axis=0), 1e-8) / QMAX).to(x_ptr.dtype.element_ty).to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, K, BLOCK):
        k = start + cols
        x = _kept_chunk(x_ptr + row * stride_x, keep_ptr, k, K, HAS_KEEP)
        ratio = (x / scale).to(x_ptr.dtype.element_ty).to(tl.float32)
        q = tl.minimum(tl.maximum(libdevice.rint(ratio), -QMAX - 1.0), QMAX * 1.0).to(tl.int32)
        tl.store(q_ptr + row * K + k, q.to(tl.int8), mask=k < K)
        total += q
    tl.store(scale_ptr + row, scale)
    tl.store(rowsum_ptr + row, tl.sum(total, axis=0))


@triton.jit
def scale_int_product(acc_ptr, sx_ptr, rowsum_ptr, sw_ptr, corr_ptr, bias_ptr, out_ptr, M, N,
                      HAS_CORR: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = acc * sx[m] * sw[n] (+ sx[m] * rowsum[m] * corr[n]) (+ bias[n]), in out's dtype."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    acc = tl.load(acc_ptr + rm[:, None] * N + rn[None, :], mask=ok, other=0)
    _store_rescaled(acc, rm, rn, M, N, sx_ptr, rowsum_ptr, sw_ptr, corr_ptr, bias_ptr, out_ptr, HAS_CORR, HAS_BIAS)


@triton.jit
def _store_rescaled(acc, rm, rn, M, N, sx_ptr, rowsum_ptr, sw_ptr, corr_ptr, bias_ptr, out_ptr,
                    HAS_CORR: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out[rm, rn] = acc * sx[m] * sw[n] (+ sx[m] * rowsum[m] * corr[n]) (+ bias[n]), in out's dtype."""
    sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
    out = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_CORR:
        rowsum = tl.load(rowsum_ptr + rm, mask=rm < M, other=0).to(tl.float32)
        corr = tl.load(corr_ptr + rn, mask=rn < N, other=0.0)
        out += (sx * rowsum)[:, None] * corr[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def scaled_int_matmul(q_ptr, w_ptr, sx_ptr, rowsum_ptr, sw_ptr, corr_ptr, bias_ptr, out_ptr, M, N, K,
                      HAS_CORR: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """int8 q [M, K] @ int8 w [N, K]^T on the tensor cores, rescaled as `scale_int_product` does, in registers:
    the int32 product never goes through memory.  Programs walk GROUP_M row blocks per column block, so
    neighbouring programs share weight tiles in L2."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows past M or N read row 0 again (their results are never stored): no masks in the K loop
    a_ptrs = q_ptr + (rm % M)[:, None] * K + rk[None, :]
    b_ptrs = w_ptr + (rn % N)[None, :] * K + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for start in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            left = K - start
            a = tl.load(a_ptrs, mask=rk[None, :] < left, other=0)
            b = tl.load(b_ptrs, mask=rk[:, None] < left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    _store_rescaled(acc, rm, rn, M, N, sx_ptr, rowsum_ptr, sw_ptr, corr_ptr, bias_ptr, out_ptr, HAS_CORR, HAS_BIAS)
