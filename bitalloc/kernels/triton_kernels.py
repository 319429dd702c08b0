"""Triton kernels for weight-only quantized linears (W2/W3/W4/W8, A16), on the stored layout.

The weight stays as stored (`layout.py`): codes as a little-endian bit stream of
int32 words along each row, float16 scales and zeros per group.  Nothing is
repacked, so the GPU holds exactly the bytes the cost model counts.

- `gemv_words`: batch 1 (one program per block of rows and slice of K: split-K
  with float32 atomics).  For 2, 4 and 8 bits each word holds 32/bits whole
  codes, unpacked in registers as a [rows, words, codes-per-word] tile; a tile
  lies inside one group, so the group's scale and zero are loaded once per row
  and tile; partial sums stay per code position and are reduced once at the end.
- `matmul_codes`: every other case (3 bits at batch 1, and batches > 1): codes
  gathered per column from the word(s) holding them, dequantized to the
  activation dtype and multiplied on the tensor cores with `tl.dot`.

Codes become floats with the exponent trick (code | 0x4B000000 is the float
2**23 + code), which costs two integer ops instead of a slow int->float convert.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

MAGIC = tl.constexpr(0x4B000000)  # bits of float32 2**23: OR-ing a small integer into the mantissa gives 2**23 + code
MAGIC_FLOAT = tl.constexpr(8388608.0)


@triton.jit
def gemv_words(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, K, KW, NG, stride_xm, stride_om,
               BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr):
    """EVEN: N, KW and K are multiples of the block sizes, so loads need no masks (and vectorize)."""
    PER_WORD: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = BLOCK_W * PER_WORD
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_in_tile = tl.arange(0, BLOCK_W)
    code_in_word = tl.arange(0, PER_WORD)
    shifts = (code_in_word * BITS).to(tl.uint32)[None, None, :]
    tiles = tl.cdiv(KW, BLOCK_W)
    per_split = tl.cdiv(tiles, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, tiles)
    # one partial sum per code position, reduced once at the end: the loop body is
    # element-wise (shift, mask|exponent, subtract, multiply, fma), with no shuffles
    acc = tl.zeros([BLOCK_N, BLOCK_W, PER_WORD], dtype=tl.float32)
    for tile in range(first, last):
        word = tile * BLOCK_W + w_in_tile
        k = word[:, None] * PER_WORD + code_in_word[None, :]
        if EVEN:
            words = tl.load(qw_ptr + rows[:, None] * KW + word[None, :])
            x = tl.load(x_ptr + m * stride_xm + k).to(tl.float32)
        else:
            words = tl.load(qw_ptr + rows[:, None] * KW + word[None, :],
                            mask=row_ok[:, None] & (word[None, :] < KW), other=0)
            x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        codes = (words.to(tl.uint32, bitcast=True)[:, :, None] >> shifts) & MASK
        if GROUP % BLOCK_K == 0:  # the tile lies in one group: one scale and zero per row
            group = (tile * BLOCK_K) // GROUP
            s = tl.load(s_ptr + rows * NG + group, mask=row_ok | EVEN, other=0.0).to(tl.float32)[:, None, None]
            if HAS_ZEROS:
                z = tl.load(z_ptr + rows * NG + group, mask=row_ok | EVEN, other=0.0).to(tl.float32)[:, None, None]
            else:
                z = (1 << (BITS - 1)) * 1.0
        else:  # groups narrower than the tile (or not aligned to it): per-element group index
            where = rows[:, None, None] * NG + (k // GROUP)[None, :, :]
            ok = row_ok[:, None, None] & (k < K)[None, :, :]
            s = tl.load(s_ptr + where, mask=ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + where, mask=ok, other=0.0).to(tl.float32)
            else:
                z = (1 << (BITS - 1)) * 1.0
        # (2**23 + q) - (2**23 + z) = q - z exactly
        q = (codes | MAGIC).to(tl.float32, bitcast=True) - (z + MAGIC_FLOAT)
        acc += q * (s * x[None, :, :])
    total = tl.sum(tl.sum(acc, axis=2), axis=1)
    if SPLIT_K == 1:
        tl.store(out_ptr + m * stride_om + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)
    else:
        tl.atomic_add(out_ptr + m * stride_om + rows, total, mask=row_ok)


@triton.jit
def _gather_codes(row_base, k, KW, BITS: tl.constexpr):
    """Codes at columns `k` of rows starting at word pointers `row_base` (broadcast together)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    bit = k * BITS
    word = bit >> 5
    offset = (bit & 31).to(tl.uint32)
    lo = tl.load(row_base + word).to(tl.uint32, bitcast=True)
    codes = lo >> offset
    if 32 % BITS != 0:  # a code may straddle two words
        hi = tl.load(row_base + word + 1, mask=word + 1 < KW, other=0).to(tl.uint32, bitcast=True)
        codes = codes | ((hi << 1) << (31 - offset))
    return codes & MASK


@triton.jit
def matmul_codes(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, KW, NG, stride_xm, stride_om,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # row-block swizzle: neighbouring programs share weight tiles in L2
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rn_safe = tl.where(rn < N, rn, 0)
    row_base = qw_ptr + rn_safe[None, :] * KW
    tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(tiles, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, tiles)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(first, last):
        k = tile * BLOCK_K + rk
        a = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K),
                    other=0.0)
        codes = _gather_codes(row_base, k[:, None], KW, BITS)
        if GROUP % BLOCK_K == 0:
            where = rn_safe[None, :] * NG + (tile * BLOCK_K) // GROUP
        else:
            where = rn_safe[None, :] * NG + tl.minimum(k // GROUP, NG - 1)[:, None]
        s = tl.load(s_ptr + where).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + where).to(tl.float32)
        else:
            z = (1 << (BITS - 1)) * 1.0
        w = (((codes | MAGIC).to(tl.float32, bitcast=True) - (z + MAGIC_FLOAT)) * s).to(a.dtype)
        acc += tl.dot(a, w)
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(out, acc, mask=ok)


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
        k = start + cols
        x = tl.load(x_ptr + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
        if HAS_KEEP:
            x = x * tl.load(keep_ptr + k, mask=k < K, other=0.0)
        absmax = tl.maximum(absmax, tl.abs(x))
    scale = (tl.maximum(tl.max(absmax, axis=0), 1e-8) / QMAX).to(x_ptr.dtype.element_ty).to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, K, BLOCK):
        k = start + cols
        x = tl.load(x_ptr + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
        if HAS_KEEP:
            x = x * tl.load(keep_ptr + k, mask=k < K, other=0.0)
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
    acc = tl.load(acc_ptr + rm[:, None] * N + rn[None, :], mask=ok, other=0).to(tl.float32)
    sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
    out = acc * sx[:, None] * sw[None, :]
    if HAS_CORR:
        rowsum = tl.load(rowsum_ptr + rm, mask=rm < M, other=0).to(tl.float32)
        corr = tl.load(corr_ptr + rn, mask=rn < N, other=0.0)
        out += (sx * rowsum)[:, None] * corr[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)
