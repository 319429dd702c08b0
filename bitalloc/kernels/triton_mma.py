"""The batch-1 GEMV on tensor cores: float16-pair dequantization feeding mma.sync, float32 sums.

`gemv_pairs` (triton_pairs.py) spends one HFMA2 per code on the product with
the activations and moves its float16 sums to float32 every few steps.  Here a
warp hands its dequantized pairs to one m16n8k16 MMA per four pairs: 16 rows x
16 codes against 16 activations, summed in float32 by the tensor core.  Only
one column of the MMA's 8 is needed; every column gets the same activations,
so any lane's accumulator holds its rows' sums.

Why the layout fits without moving data: in an m16n8k16 MMA, lane 4 g + t holds
the A pairs (row g, columns 2t, 2t + 1) and (row g + 8, same columns), and the
same again 8 columns on; B pairs (rows 2t, 2t + 1); accumulators for rows g and
g + 8.  A dot product does not care in which order its terms are summed, so the
MMA's columns need not be consecutive codes: column pair (2t, 2t + 1) is code j
and its twin j + PAIRS of a unit that lane t loaded (`_pair_codes` builds that
pair), and the activations arranged by `arrange_pairs` are already those pairs.
So each lane dequantizes what it loaded, for rows g and g + 8, and the MMA
consumes it in place.  Each warp of a program takes its own slice of the row's
units; the zero-point term is summed per lane in float32, as in gemv_pairs.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from .triton_pairs import _fma_f16x2, _half_pair, _pair_codes, _pairs_per_unit

ROWS = 16  # rows per program: one MMA tile


@gluon.constexpr_function
def _lanes(warps):
    """[warp, g, t] with one element per lane: the MMA fragments' view of a program."""
    return gl.BlockedLayout([1, 1, 1], [1, 8, 4], [warps, 1, 1], [2, 1, 0])


@gluon.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """One warp-wide m16n8k16 float16 MMA with float32 accumulators: each lane passes its fragment."""
    return gl.inline_asm_elementwise(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$8, $9, $10, $11}, {$12, $13}, "
        "{$4, $5, $6, $7};", "=f,=f,=f,=f,f,f,f,f,r,r,r,r,r,r", [c0, c1, c2, c3, a0, a1, a2, a3, b0, b1],
        dtype=(gl.float32, gl.float32, gl.float32, gl.float32), is_pure=True, pack=1)


@gluon.jit
def _dequantized(words, j: gl.constexpr, scale, s, BITS: gl.constexpr):
    """Codes j and j + PAIRS of a unit as the float16 pair (q s, q' s), one rounding each."""
    codes, M = _pair_codes(words, j, BITS)
    return _fma_f16x2(codes, scale, _half_pair(-M * s))


@gluon.jit
def gemv_mma(xp_ptr, xs_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, U, NG, stride_om, BITS: gl.constexpr,
             GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, VEC: gl.constexpr, SPLIT_K: gl.constexpr,
             EVEN: gl.constexpr, STAGES: gl.constexpr):
    """One row of float16 activations (arranged by `arrange_pairs`, sums per VEC units) against 16 rows of
    packed codes: s * (sum_j q_j x_j - z sum_j x_j) through tensor-core MMAs (module docstring).

    Tensors are [warp, g, t]: one element per lane.  Lane (g, t) of warp w takes VEC units of rows g and
    g + 8 per step (chunk 4 w + t of the step's 4 * num_warps chunks), the matching activation pairs, and
    its rows' scales and zeros.  STAGES 0: the next step's words are loaded into registers before this one
    computes.  STAGES >= 2: each lane copies its words STAGES - 1 steps ahead into its own slots of a
    shared-memory ring (cp.async, 16 bytes a copy), so more bytes are in flight per SM than registers hold.
    Activations, scales and zeros come one step ahead in registers either way.  EVEN (rows a multiple of
    16, units of the step): no masks; the register loads after the last step repeat it instead.
    """
    PAIRS: gl.constexpr = _pairs_per_unit(BITS)
    WARPS: gl.constexpr = gl.num_warps()
    STEP: gl.constexpr = WARPS * 4 * VEC  # units per row and step
    LANES: gl.constexpr = _lanes(WARPS)
    gl.static_assert(GROUP % (VEC * 2 * PAIRS) == 0, "a lane's chunk must lie in one group")
    gl.static_assert(PAIRS % 2 == 0, "an MMA takes two pairs of each row")
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    m = gl.program_id(2)
    xp_ptr += m * PAIRS * U
    xs_ptr += m * gl.cdiv(U, VEC)
    warp = gl.expand_dims(gl.expand_dims(gl.arange(0, WARPS, layout=gl.SliceLayout(1, gl.SliceLayout(2, LANES))),
                                         1), 2)
    g = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, LANES))), 0), 2)
    t = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, LANES))), 0), 1)
    rows = pid_n * 16 + g + 0 * warp + 0 * t  # [WARPS, 8, 4]: row g of every lane
    lane_chunk = warp * 4 + t + 0 * g  # the lane's chunk within a step
    steps = gl.cdiv(U, STEP)
    per_split = gl.cdiv(steps, SPLIT_K)
    first = pid_k * per_split
    last = gl.minimum(first + per_split, steps)
    start = gl.minimum(first, steps - 1)
    side = _mma_side_data(xp_ptr, xs_ptr, s_ptr, z_ptr, rows, lane_chunk, N, U, NG, start, first < last, BITS,
                          GROUP, HAS_ZEROS, VEC, STEP, EVEN)
    if STAGES == 0:
        words = _mma_words(qw_ptr, rows, lane_chunk, N, U, start, first < last, BITS, VEC, STEP, EVEN)
    else:
        ring = _ring(STAGES, BITS, VEC)
        for slot in gl.static_range(STAGES - 1):
            _copy_words(ring, slot, qw_ptr, rows, lane_chunk, N, U, first + slot, first + slot < last, BITS, VEC,
                        STEP, EVEN)
            async_copy.commit_group()
    acc0 = gl.zeros([WARPS, 8, 4], gl.float32, LANES)
    acc1 = gl.zeros([WARPS, 8, 4], gl.float32, LANES)
    acc2 = gl.zeros([WARPS, 8, 4], gl.float32, LANES)
    acc3 = gl.zeros([WARPS, 8, 4], gl.float32, LANES)
    zero_terms = gl.zeros([WARPS, 8, 4], gl.float32, LANES)  # rows g and g + 8 summed apart: two tensors
    zero_terms8 = gl.zeros([WARPS, 8, 4], gl.float32, LANES)
    for step in range(first, last):
        following = gl.minimum(step + 1, last - 1)
        if STAGES == 0:
            low, high = words
            words = _mma_words(qw_ptr, rows, lane_chunk, N, U, following, step + 1 < last, BITS, VEC, STEP, EVEN)
        else:
            ahead = step + STAGES - 1
            _copy_words(ring, (ahead - first) % STAGES, qw_ptr, rows, lane_chunk, N, U, ahead, ahead < last, BITS,
                        VEC, STEP, EVEN)
            async_copy.commit_group()
        x, s, s8, z, z8, total = side
        side = _mma_side_data(xp_ptr, xs_ptr, s_ptr, z_ptr, rows, lane_chunk, N, U, NG, following, step + 1 < last,
                              BITS, GROUP, HAS_ZEROS, VEC, STEP, EVEN)
        if STAGES > 0:
            async_copy.wait_group(STAGES - 1)  # this step's copies (each lane reads back only its own)
            low, high = _ring_words(ring, (step - first) % STAGES, BITS, VEC)
        scale = _half_pair(s)
        scale8 = _half_pair(s8)
        for v in gl.static_range(VEC):
            for j in gl.static_range(0, PAIRS, 2):
                acc0, acc1, acc2, acc3 = _mma(
                    _dequantized(low[v], j, scale, s, BITS), _dequantized(high[v], j, scale8, s8, BITS),
                    _dequantized(low[v], j + 1, scale, s, BITS), _dequantized(high[v], j + 1, scale8, s8, BITS),
                    x[v][j], x[v][j + 1], acc0, acc1, acc2, acc3)
        zero_terms += z * s * total
        zero_terms8 += z8 * s8 * total
    if STAGES > 0:
        async_copy.wait_group(0)  # no copy may land after the program ends
    # every column of the accumulators holds the same sums: count lane t = 0's once, then sum the warps
    dots = gl.sum(gl.sum(gl.where(t == 0, acc0, 0.0) - zero_terms, axis=2), axis=0)  # rows g
    dots8 = gl.sum(gl.sum(gl.where(t == 0, acc2, 0.0) - zero_terms8, axis=2), axis=0)  # rows g + 8
    out_rows = pid_n * 16 + gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, LANES)))
    if SPLIT_K == 1:
        gl.store(out_ptr + m * stride_om + out_rows, dots.to(out_ptr.dtype.element_ty), mask=out_rows < N)
        gl.store(out_ptr + m * stride_om + out_rows + 8, dots8.to(out_ptr.dtype.element_ty), mask=out_rows + 8 < N)
    else:
        gl.atomic_add(out_ptr + m * stride_om + out_rows, dots, mask=out_rows < N, sem="relaxed")
        gl.atomic_add(out_ptr + m * stride_om + out_rows + 8, dots8, mask=out_rows + 8 < N, sem="relaxed")


@gluon.jit
def _mma_side_data(xp_ptr, xs_ptr, s_ptr, z_ptr, rows, lane_chunk, N, U, NG, step, live, BITS: gl.constexpr,
                   GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, VEC: gl.constexpr, STEP: gl.constexpr,
                   EVEN: gl.constexpr):
    """A step's loads besides the words, for every lane: the activation pairs of its VEC units (a tuple per
    unit), the scales and zeros of rows g and g + 8 (float32) and the chunk's sum of x; zeros where not
    `live`."""
    PAIRS: gl.constexpr = _pairs_per_unit(BITS)
    chunk = step * (STEP // VEC) + lane_chunk
    chunk_ok = (chunk * VEC < U) & live
    ok = chunk_ok & (rows < N)
    ok8 = chunk_ok & (rows + 8 < N)
    where = rows * NG + (chunk * VEC * 2 * PAIRS) // GROUP
    s = _load(s_ptr + where, ok, EVEN).to(gl.float32)
    s8 = _load(s_ptr + where + 8 * NG, ok8, EVEN).to(gl.float32)
    if HAS_ZEROS:
        z = _load(z_ptr + where, ok, EVEN).to(gl.float32)
        z8 = _load(z_ptr + where + 8 * NG, ok8, EVEN).to(gl.float32)
    else:
        z = gl.full(s.shape, (1 << (BITS - 1)) * 1.0, gl.float32, s.type.layout)
        z8 = z
    total = _load(xs_ptr + chunk, chunk_ok, EVEN)
    u, _ = _lane_units(rows, chunk, VEC)
    unit_ok = (u < U) & live
    per_pair = ()
    for j in gl.static_range(PAIRS):
        per_pair = per_pair + (_unstack(_load(xp_ptr + j * U + u, unit_ok, EVEN), VEC),)
    return _transposed(per_pair, PAIRS, VEC), s, s8, z, z8, total


@gluon.jit
def _mma_words(qw_ptr, rows, lane_chunk, N, U, step, live, BITS: gl.constexpr, VEC: gl.constexpr,
               STEP: gl.constexpr, EVEN: gl.constexpr):
    """A step's words for every lane, loaded into registers: its VEC units of rows g and g + 8 (tuples per
    unit of each unit's words); zeros where not `live`."""
    PAIRS: gl.constexpr = _pairs_per_unit(BITS)
    WORDS: gl.constexpr = PAIRS * 2 * BITS // 32
    u, row4 = _lane_units(rows, step * (STEP // VEC) + lane_chunk, VEC)
    unit_ok = (u < U) & live
    low = _units(qw_ptr, row4, u, unit_ok & (row4 < N), U, WORDS, VEC, EVEN)
    high = _units(qw_ptr + 8 * U * WORDS, row4, u, unit_ok & (row4 + 8 < N), U, WORDS, VEC, EVEN)
    return low, high


@gluon.jit
def _lane_units(rows, chunk, VEC: gl.constexpr):
    """[WARPS, 8, 4, VEC]: a lane's VEC units side by side (16-byte loads), and its row g alike."""
    VECTORS: gl.constexpr = gl.BlockedLayout([1, 1, 1, VEC], [1, 8, 4, 1], [gl.num_warps(), 1, 1, 1], [3, 2, 1, 0])
    v = gl.arange(0, VEC, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, VECTORS))))
    v = gl.expand_dims(gl.expand_dims(gl.expand_dims(v, 0), 1), 2)
    u = gl.expand_dims(gl.convert_layout(chunk, gl.SliceLayout(3, VECTORS)), 3) * VEC + v
    return u, gl.expand_dims(gl.convert_layout(rows, gl.SliceLayout(3, VECTORS)), 3)


@gluon.constexpr_function
def _pieces(bits, vec):
    """16-byte pieces of a lane's words in one row and step (VEC units of one word, or of three at 3 bits)."""
    words = vec * (3 if bits == 3 else 1)
    assert words % 4 == 0, "the ring copies 16-byte pieces: VEC units must fill them"
    return words // 4


@gluon.jit
def _ring(STAGES: gl.constexpr, BITS: gl.constexpr, VEC: gl.constexpr):
    """Shared memory for STAGES steps of every lane's words: one buffer per 16-byte piece of rows g and
    g + 8 (a piece of all lanes is contiguous: no bank conflicts), so that the compiler's barriers come
    once per step, not once per piece (copies into different buffers need none between them)."""
    buffers = ()
    for piece in gl.static_range(2 * _pieces(BITS, VEC)):
        buffers = buffers + (gl.allocate_shared_memory(gl.int32, [STAGES, gl.num_warps(), 8, 4, 4],
                                                       gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0])),)
    return buffers


@gluon.constexpr_function
def _piece_layout(warps):
    """[warp, g, t, word]: a lane's 16-byte piece of one row, lane 4 g + t."""
    return gl.BlockedLayout([1, 1, 1, 4], [1, 8, 4, 1], [warps, 1, 1, 1], [3, 2, 1, 0])


@gluon.jit
def _copy_words(ring, slot, qw_ptr, rows, lane_chunk, N, U, step, live, BITS: gl.constexpr, VEC: gl.constexpr,
                STEP: gl.constexpr, EVEN: gl.constexpr):
    """Start copying a step's words of every lane into slot `slot` of the ring: piece p of row g + 8 h into
    buffer h PIECES + p.  Nothing is copied where not `live`."""
    PIECES: gl.constexpr = _pieces(BITS, VEC)
    WORDS: gl.constexpr = PIECES * 4 // VEC  # words per unit
    PIECE: gl.constexpr = _piece_layout(gl.num_warps())
    e = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, PIECE))))
    e = gl.expand_dims(gl.expand_dims(gl.expand_dims(e, 0), 1), 2)
    chunk = gl.expand_dims(gl.convert_layout(step * (STEP // VEC) + lane_chunk, gl.SliceLayout(3, PIECE)), 3)
    row4 = gl.expand_dims(gl.convert_layout(rows, gl.SliceLayout(3, PIECE)), 3)
    if live:
        for h in gl.static_range(2):
            for p in gl.static_range(PIECES):
                where = chunk * (VEC * WORDS) + 4 * p + e
                pointers = qw_ptr + (row4 + 8 * h) * (U * WORDS) + where
                target = ring[h * PIECES + p].index(slot)
                if EVEN:
                    async_copy.async_copy_global_to_shared(target, pointers)
                else:
                    async_copy.async_copy_global_to_shared(target, pointers,
                                                           mask=(where < U * WORDS) & (row4 + 8 * h < N))


@gluon.jit
def _ring_words(ring, slot, BITS: gl.constexpr, VEC: gl.constexpr):
    """A lane's words of one ring slot, as `_mma_words` returns them: a 16-byte shared load per piece."""
    PIECES: gl.constexpr = _pieces(BITS, VEC)
    WORDS: gl.constexpr = PIECES * 4 // VEC
    halves = ()
    for h in gl.static_range(2):
        flat = ()
        for p in gl.static_range(PIECES):
            flat = flat + _unstack(ring[h * PIECES + p].index(slot).load(_piece_layout(gl.num_warps())), 4)
        units = ()
        for v in gl.static_range(VEC):
            unit = ()
            for k in gl.static_range(WORDS):
                unit = unit + (flat[v * WORDS + k],)
            units = units + (unit,)
        halves = halves + (units,)
    return halves


@gluon.jit
def _units(qw_ptr, row4, u, ok, U, WORDS: gl.constexpr, VEC: gl.constexpr, EVEN: gl.constexpr):
    """The words of units u of rows row4 ([WARPS, 8, 4, VEC]) as a tuple over the VEC units of tuples of
    each unit's words, every word one element per lane."""
    per_word = ()
    for k in gl.static_range(WORDS):
        per_word = per_word + (_unstack(_load(qw_ptr + row4 * (U * WORDS) + u * WORDS + k, ok, EVEN), VEC),)
    return _transposed(per_word, WORDS, VEC)


@gluon.jit
def _transposed(nested, OUTER: gl.constexpr, INNER: gl.constexpr):
    """A tuple of OUTER tuples of INNER tensors, indexed [i][k], as INNER tuples indexed [k][i]."""
    flipped = ()
    for k in gl.static_range(INNER):
        column = ()
        for i in gl.static_range(OUTER):
            column = column + (nested[i][k],)
        flipped = flipped + (column,)
    return flipped


@gluon.jit
def _load(pointers, ok, EVEN: gl.constexpr):
    """Values at `pointers`, zero where not `ok` (EVEN: every pointer is in bounds, so no mask)."""
    if EVEN:
        values = gl.load(pointers)
    else:
        values = gl.load(pointers, mask=ok, other=0)
    return values


@gluon.jit
def _unstack(values, VEC: gl.constexpr):
    """[WARPS, 8, 4, VEC] int32 (VEC a power of two, held by one lane) -> a tuple of VEC uint32 tensors
    [WARPS, 8, 4], one element per lane."""
    values = values.to(gl.uint32, bitcast=True)
    if VEC == 1:
        parts = (gl.convert_layout(gl.reshape(values, values.shape[:-1]), _lanes(gl.num_warps())),)
    else:
        shape: gl.constexpr = values.shape[:-1] + [VEC // 2, 2]
        even, odd = gl.split(gl.reshape(values, shape))
        evens = _unstack(even, VEC // 2)
        odds = _unstack(odd, VEC // 2)
        parts = ()
        for i in gl.static_range(VEC // 2):
            parts = parts + (evens[i], odds[i])
    return parts
