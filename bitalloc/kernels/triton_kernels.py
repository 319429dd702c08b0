"""Triton kernels for weight-only quantized linears (W2/W3/W4/W8, A16), on the stored layout.

The weight stays as stored (`layout.py`): codes as a little-endian bit stream of
int32 words along each row, float16 scales and zeros per group.  Nothing is
repacked, so the GPU holds exactly the bytes the cost model counts.

- `gemv_chunks`: a few rows of activations (one program per block of rows and
  slice of K: split-K with float32 atomics).  Rows are cut in chunks of 32
  codes (`bits` words); each code position of a chunk is a compile-time word
  and shift, so unpacking is a constant shift and mask, and the activations
  come pre-arranged by code position (a [32, chunks] copy of x) so that one
  small load serves every row a thread holds.
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

import triton
import triton.language as tl
from triton.language.extra import libdevice

MAGIC = tl.constexpr(0x4B000000)  # bits of float32 2**23: OR-ing a small integer into the mantissa gives 2**23 + code
MAGIC_FLOAT = tl.constexpr(8388608.0)


@triton.jit
def _add_code(part, code, zb, xt_ptr, J: tl.constexpr, C, chunk, chunk_ok, EVEN: tl.constexpr):
    """part += (q - z) * x for code position J of every chunk: (2**23 + q) - (2**23 + z) is exact."""
    if EVEN:
        x = tl.load(xt_ptr + J * C + chunk)
    else:
        x = tl.load(xt_ptr + J * C + chunk, mask=chunk_ok, other=0.0)
    q = (code | MAGIC).to(tl.float32, bitcast=True) - zb
    return part + q * x.to(tl.float32)[None, :]


@triton.jit
def _load_word(base, i: tl.constexpr, ok, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(base + i).to(tl.uint32, bitcast=True)
    return tl.load(base + i, mask=ok, other=0).to(tl.uint32, bitcast=True)


@triton.jit
def gemv_chunks(xt_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, C, KW, NG, stride_om,
                BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_C: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr):
    """One row of activations against [rows, chunks of 32 codes]; xt[j, c] = x[32 c + j] (zero padded).

    Every code position j of a chunk is a compile-time (word, shift) pair, so
    unpacking is a constant shift and mask, and x for position j of the tile's
    chunks is one small load shared by all the rows a thread holds.  GROUP is a
    multiple of 32 (a chunk lies in one group).  EVEN: no masks needed.
    """
    PER_WORD: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    xt_ptr += m * 32 * C
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tiles = tl.cdiv(C, BLOCK_C)
    per_split = tl.cdiv(tiles, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, tiles)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for tile in range(first, last):
        chunk = tile * BLOCK_C + tl.arange(0, BLOCK_C)
        chunk_ok = chunk < C
        ok = row_ok[:, None] & chunk_ok[None, :]
        base = qw_ptr + rows[:, None] * KW + (chunk * BITS)[None, :]
        where = rows[:, None] * NG + ((chunk * 32) // GROUP)[None, :]
        if EVEN:
            s = tl.load(s_ptr + where).to(tl.float32)
        else:
            s = tl.load(s_ptr + where, mask=ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            if EVEN:
                zb = tl.load(z_ptr + where).to(tl.float32) + MAGIC_FLOAT
            else:
                zb = tl.load(z_ptr + where, mask=ok, other=0.0).to(tl.float32) + MAGIC_FLOAT
        else:
            zb = (1 << (BITS - 1)) * 1.0 + MAGIC_FLOAT
        part = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        if BITS == 3:  # 32 codes in 3 words; codes 10 and 21 straddle two words
            w0 = _load_word(base, 0, ok, EVEN)
            w1 = _load_word(base, 1, ok, EVEN)
            w2 = _load_word(base, 2, ok, EVEN)
            for j in tl.static_range(32):
                if j < 10:
                    code = (w0 >> (3 * j)) & 7
                elif j == 10:
                    code = ((w0 >> 30) | (w1 << 2)) & 7
                elif j < 21:
                    code = (w1 >> (3 * j - 32)) & 7
                elif j == 21:
                    code = ((w1 >> 31) | (w2 << 1)) & 7
                else:
                    code = (w2 >> (3 * j - 64)) & 7
                part = _add_code(part, code, zb, xt_ptr, j, C, chunk, chunk_ok, EVEN)
        else:
            for i in tl.static_range(BITS):
                word = _load_word(base, i, ok, EVEN)
                for p in tl.static_range(PER_WORD):
                    part = _add_code(part, (word >> (p * BITS)) & MASK, zb, xt_ptr, i * PER_WORD + p, C, chunk,
                                     chunk_ok, EVEN)
        acc += s * part
    total = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        tl.store(out_ptr + m * stride_om + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)
    else:
        tl.atomic_add(out_ptr + m * stride_om + rows, total, mask=row_ok)


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
    """w[n, k] = (q - z) * s in w's dtype: one [BLOCK_N, BLOCK_K] tile per program, no loop."""
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
    w = ((codes | MAGIC).to(tl.float32, bitcast=True) - (z + MAGIC_FLOAT)) * s
    tl.store(w_ptr + rn[:, None] * K + k[None, :], w.to(w_ptr.dtype.element_ty), mask=ok)


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
