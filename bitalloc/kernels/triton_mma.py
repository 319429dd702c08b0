"""The batch-1 GEMV on tensor cores: float16-pair dequantization feeding mma.sync, float32 sums.

`gemv_pairs` (triton_pairs.py) spends one HFMA2 per code on the product with
the activations and moves its float16 sums to float32 every few steps.  Here a
warp hands its unpacked pairs to one m16n8k16 MMA per four pairs: 16 rows x
16 codes against 16 activations, summed in float32 by the tensor core.

Why the layout fits without moving data: in an m16n8k16 MMA, lane 4 g + t holds
the A pairs (row g, columns 2t, 2t + 1) and (row g + 8, same columns), and the
same again 8 columns on; B pairs (rows 2t, 2t + 1); accumulators for rows g and
g + 8.  A dot product does not care in which order its terms are summed, so the
MMA's columns need not be consecutive codes: column pair (2t, 2t + 1) is code j
and its twin j + PAIRS of a unit that lane t loaded (`_pair_codes` builds that
pair), and the activations arranged by `arrange_pairs` are already those pairs.
So each lane unpacks what it loaded, for rows g and g + 8, and the MMA consumes
it in place.  Each warp of a program takes its own slice of the row's units.

On arranged activations the MMAs take the pairs M + q as `_pair_codes` leaves
them (integers below 2048, exact in float16; no HFMA2 per pair) into float32
sums that start afresh each step.  Only lane (2t, t) of a quad passes its
activations as B (the others pass zeros), so column 2t of the product sums lane
t's chunk alone: lane (g, t) finds its own chunk's sums for rows g and g + 8 in
its first and third accumulators, whatever group each of the quad's chunks lies
in, and scales them once per step; s (sum M x + z sum x) leaves once per chunk,
from the chunk sums `arrange_pairs` writes.  DEQUANTIZE keeps the older step
instead: q s rounded to float16 per pair (one HFMA2), every column of B the same
activations, one running sum per row (the fastest for int4 on 8192x8192).

With X_LOAD = RAW the kernel reads the float16 activations themselves (no
`arrange_pairs` pass, which costs a launch and ~1.5 us per layer): a unit's
2 PAIRS activations are PAIRS consecutive words of x, pair j is the low (j even)
or high (j odd) halves of words j // 2 and PAIRS / 2 + j // 2 (one PRMT).  The
MMAs take the unpacked pairs M + q here too (only the feeding lanes load x), and
the offsets and zero points leave through a second MMA per MMA with A = -(M + z),
integers below 2048 and exact in float16: exact float32 sums of float16
products, without chunk sums of x, as long as the zero points are integers (HQQ's
real ones round in -(M + z): the backend launches DEQUANTIZE for them).  With
DEQUANTIZE that second MMA takes -z s beside the pairs q s instead.  X_LOAD =
RAW_AHEAD loads those words of x a step ahead, as the weights are (more
registers; the backend offers it where it measured faster).
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .triton_pairs import (_fma_f16x2, _half_pair, _merge_halves, _merge_high_halves, _pair_codes, _pairs_per_unit,
                           code_offset)

ROWS = 16  # rows per program: one MMA tile
# X_LOAD: arranged pairs loaded in the step or a step ahead; x itself in the step or a step ahead
# (triton_backend.X_RAW, X_RAW_AHEAD)
IN_STEP, AHEAD, RAW, RAW_AHEAD = gl.constexpr(0), gl.constexpr(1), gl.constexpr(2), gl.constexpr(3)


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
    M: gl.constexpr = code_offset(j, BITS)
    return _fma_f16x2(_pair_codes(words, j, BITS), scale, _half_pair(-M * s))


@gluon.jit
def gemv_mma(xp_ptr, xs_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, U, NG, stride_om, stride_xm, KX,
             BITS: gl.constexpr, GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, VEC: gl.constexpr,
             SPLIT_K: gl.constexpr, EVEN: gl.constexpr, X_LOAD: gl.constexpr, PDL: gl.constexpr = False,
             DEQUANTIZE: gl.constexpr = False, GATED: gl.constexpr = False):
    """One row of float16 activations against 16 rows of packed codes: s * (sum_j q_j x_j - z sum_j x_j)
    through tensor-core MMAs (module docstring).  The activations are pairs arranged by `arrange_pairs`
    (sums per VEC units in xs) or, X_LOAD = RAW or RAW_AHEAD, x itself as int32 words (KX per row; xs unused);
    stride_xm is the words from one row of activations to the next.

    Tensors are [warp, g, t]: one element per lane.  Lane (g, t) of warp w loads VEC units of rows g and
    g + 8 per step (chunk 4 w + t of the step's 4 * num_warps chunks), the matching activations, and
    its rows' scales and zeros; the next step's words, scales and zeros are loaded before this one
    computes, its activations too if X_LOAD = AHEAD or RAW_AHEAD (else in the step, from L1: 40-45 fewer registers,
    which 2-bit codes need).  DEQUANTIZE (arranged): the older step of the module docstring.  EVEN (rows a
    multiple of 16, units of the step, and with RAW no ragged units): no masks; the loads after the last
    step repeat it instead.  PDL (launched as a programmatic dependent, reading x): the first step's weights
    are requested before waiting for the kernel that writes x, and the next kernel may launch once the
    sums are done.  GATED (SPLIT_K 1; the rows of a gate and an up projection interleaved eight by eight,
    `bitalloc.fuse`): out holds N / 2 columns, silu(gate) * up, the product a gated MLP's down projection
    reads (the kernel that would compute it from the N rows is saved).
    """
    PAIRS: gl.constexpr = _pairs_per_unit(BITS)
    WARPS: gl.constexpr = gl.num_warps()
    STEP: gl.constexpr = WARPS * 4 * VEC  # units per row and step
    LANES: gl.constexpr = _lanes(WARPS)
    gl.static_assert(GROUP % (VEC * 2 * PAIRS) == 0, "a lane's chunk must lie in one group")
    gl.static_assert(PAIRS % 2 == 0, "an MMA takes two pairs of each row")
    READS_X: gl.constexpr = X_LOAD >= RAW  # x itself, in the step or a step ahead
    gl.static_assert(not PDL or READS_X, "with PDL only x may come from the kernel before")
    gl.static_assert(not GATED or SPLIT_K == 1, "a gated output needs whole sums")
    UNPACKED: gl.constexpr = not DEQUANTIZE  # the MMAs take M + q (module docstring)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    m = gl.program_id(2)
    xp_ptr += m * stride_xm
    xs_ptr += m * (1 + UNPACKED) * gl.cdiv(U, VEC)  # the chunk sums of x (UNPACKED: then of M x)
    warp = gl.expand_dims(gl.expand_dims(gl.arange(0, WARPS, layout=gl.SliceLayout(1, gl.SliceLayout(2, LANES))),
                                         1), 2)
    g = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, LANES))), 0), 2)
    t = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, LANES))), 0), 1)
    rows = pid_n * 16 + g + 0 * warp + 0 * t  # [WARPS, 8, 4]: row g of every lane
    lane_chunk = warp * 4 + t + 0 * g  # the lane's chunk within a step
    feeds = (g == 2 * t) & (warp >= 0)  # UNPACKED: the lanes whose x is column 2 t of the MMA's B
    steps = gl.cdiv(U, STEP)
    per_split = gl.cdiv(steps, SPLIT_K)
    first = pid_k * per_split
    last = gl.minimum(first + per_split, steps)
    data = _mma_step_data(qw_ptr, xp_ptr, xs_ptr, s_ptr, z_ptr, rows, lane_chunk, feeds, N, U, NG,
                          gl.minimum(first, steps - 1), first < last, BITS, GROUP, HAS_ZEROS, VEC, STEP, EVEN, X_LOAD,
                          UNPACKED)
    acc0 = gl.zeros([WARPS, 8, 4], gl.float32, LANES)
    acc1 = gl.zeros([WARPS, 8, 4], gl.float32, LANES)
    acc2 = gl.zeros([WARPS, 8, 4], gl.float32, LANES)
    acc3 = gl.zeros([WARPS, 8, 4], gl.float32, LANES)
    zero_terms = gl.zeros([WARPS, 8, 4], gl.float32, LANES)  # rows g and g + 8 summed apart: two tensors
    zero_terms8 = gl.zeros([WARPS, 8, 4], gl.float32, LANES)
    if PDL:
        gdc_wait()  # x is written by the kernel before; the weights, scales and zeros were not
    if X_LOAD == RAW_AHEAD:
        x_next = _mma_x_raw(xp_ptr, feeds, lane_chunk, KX, gl.minimum(first, steps - 1), BITS, VEC, STEP, EVEN,
                            UNPACKED)
    for step in range(first, last):
        low, high, x, s, s8, z, z8, total, offsets = data
        if X_LOAD == IN_STEP:
            x = _mma_x(xp_ptr, feeds, lane_chunk, U, step, True, BITS, VEC, STEP, EVEN, UNPACKED)
        elif X_LOAD == RAW:
            x = _mma_x_raw(xp_ptr, feeds, lane_chunk, KX, step, BITS, VEC, STEP, EVEN, UNPACKED)
        elif X_LOAD == RAW_AHEAD:
            x = x_next
            x_next = _mma_x_raw(xp_ptr, feeds, lane_chunk, KX, gl.minimum(step + 1, last - 1), BITS, VEC, STEP, EVEN,
                                UNPACKED)
        data = _mma_step_data(qw_ptr, xp_ptr, xs_ptr, s_ptr, z_ptr, rows, lane_chunk, feeds, N, U, NG,
                              gl.minimum(step + 1, last - 1), step + 1 < last, BITS, GROUP, HAS_ZEROS, VEC, STEP, EVEN,
                              X_LOAD, UNPACKED)
        if not UNPACKED:
            scale = _half_pair(s)
            scale8 = _half_pair(s8)
            zs = _half_pair(-z * s)  # RAW: the zero-point term's A, the same for every column of the chunk
            zs8 = _half_pair(-z8 * s8)
            for v in gl.static_range(VEC):
                for j in gl.static_range(0, PAIRS, 2):
                    acc0, acc1, acc2, acc3 = _mma(
                        _dequantized(low[v], j, scale, s, BITS), _dequantized(high[v], j, scale8, s8, BITS),
                        _dequantized(low[v], j + 1, scale, s, BITS), _dequantized(high[v], j + 1, scale8, s8, BITS),
                        x[v][j], x[v][j + 1], acc0, acc1, acc2, acc3)
                    if READS_X:
                        acc0, acc1, acc2, acc3 = _mma(zs, zs8, zs, zs8, x[v][j], x[v][j + 1], acc0, acc1, acc2, acc3)
            if not READS_X:
                zero_terms += z * s * total
                zero_terms8 += z8 * s8 * total
        else:  # the pairs M + q as unpacked; M x and z x leave once per chunk (arranged) or by MMA (RAW)
            c0 = gl.full(s.shape, 0.0, gl.float32, s.type.layout)
            c1 = c0
            c2 = c0
            c3 = c0
            if READS_X:  # the A of each pair's offset and zero-point MMA: -(M + z), exact in float16
                less = ()
                less8 = ()
                for j in gl.static_range(PAIRS):
                    less = less + (_half_pair(-(code_offset(j, BITS) + z)),)
                    less8 = less8 + (_half_pair(-(code_offset(j, BITS) + z8)),)
            for v in gl.static_range(VEC):
                for j in gl.static_range(0, PAIRS, 2):
                    c0, c1, c2, c3 = _mma(_pair_codes(low[v], j, BITS), _pair_codes(high[v], j, BITS),
                                          _pair_codes(low[v], j + 1, BITS), _pair_codes(high[v], j + 1, BITS),
                                          x[v][j], x[v][j + 1], c0, c1, c2, c3)
                    if READS_X:
                        c0, c1, c2, c3 = _mma(less[j], less8[j], less[j + 1], less8[j + 1], x[v][j], x[v][j + 1],
                                              c0, c1, c2, c3)
            acc0 += s * c0  # column 2 t: the lane's own chunk (`feeds`), so its own scales
            acc2 += s8 * c2
            if not READS_X:
                zero_terms += s * (offsets + z * total)
                zero_terms8 += s8 * (offsets + z8 * total)
    if PDL:
        gdc_launch_dependents()  # a dependent kernel still waits for this one's stores before reading them
    # UNPACKED: each lane holds its own chunk's sums; else every column of the accumulators holds the same
    # sums, so count lane t = 0's once.  Then sum the lanes and warps.
    counted = (t == 0) | UNPACKED
    dots = gl.sum(gl.sum(gl.where(counted, acc0, 0.0) - zero_terms, axis=2), axis=0)  # rows g
    dots8 = gl.sum(gl.sum(gl.where(counted, acc2, 0.0) - zero_terms8, axis=2), axis=0)  # rows g + 8
    out_rows = pid_n * 16 + gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, LANES)))
    if GATED:  # rows g and g + 8 are the gate and the up row of output 8 pid_n + g: silu(gate) * up
        gated = dots / (1.0 + gl.exp(-dots)) * dots8
        gl.store(out_ptr + m * stride_om + out_rows - pid_n * 8, gated.to(out_ptr.dtype.element_ty),
                 mask=out_rows + 8 < N)
    elif SPLIT_K == 1:
        gl.store(out_ptr + m * stride_om + out_rows, dots.to(out_ptr.dtype.element_ty), mask=out_rows < N)
        gl.store(out_ptr + m * stride_om + out_rows + 8, dots8.to(out_ptr.dtype.element_ty), mask=out_rows + 8 < N)
    else:
        gl.atomic_add(out_ptr + m * stride_om + out_rows, dots, mask=out_rows < N, sem="relaxed")
        gl.atomic_add(out_ptr + m * stride_om + out_rows + 8, dots8, mask=out_rows + 8 < N, sem="relaxed")


@gluon.jit
def _mma_step_data(qw_ptr, xp_ptr, xs_ptr, s_ptr, z_ptr, rows, lane_chunk, feeds, N, U, NG, step, live,
                   BITS: gl.constexpr, GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, VEC: gl.constexpr,
                   STEP: gl.constexpr, EVEN: gl.constexpr, X_LOAD: gl.constexpr, UNPACKED: gl.constexpr):
    """A step's loads for every lane: the words of its VEC units in rows g and g + 8 (tuples per unit of
    each unit's words), with X_LOAD = AHEAD the activation pairs of those units (`_mma_x`; else 0), the
    rows' scales and zeros (float32) and, unless reading x, the chunk's sum of x (UNPACKED: and of M x); zeros
    where not `live`."""
    PAIRS: gl.constexpr = _pairs_per_unit(BITS)
    WORDS: gl.constexpr = PAIRS * 2 * BITS // 32
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
    total = 0.0
    offsets = 0.0
    if X_LOAD < RAW:
        total = _load(xs_ptr + chunk, chunk_ok, EVEN)
    if UNPACKED and X_LOAD < RAW:
        offsets = _load(xs_ptr + gl.cdiv(U, VEC) + chunk, chunk_ok, EVEN)
    low, high = _units(qw_ptr, rows, chunk, live, N, U, WORDS, VEC, EVEN)
    x = 0
    if X_LOAD == AHEAD:
        x = _mma_x(xp_ptr, feeds, lane_chunk, U, step, live, BITS, VEC, STEP, EVEN, UNPACKED)
    return low, high, x, s, s8, z, z8, total, offsets


@gluon.jit
def _mma_x(xp_ptr, feeds, lane_chunk, U, step, live, BITS: gl.constexpr, VEC: gl.constexpr, STEP: gl.constexpr,
           EVEN: gl.constexpr, UNPACKED: gl.constexpr):
    """The activation pairs of a lane's VEC units in a step: a tuple per unit of its PAIRS pairs.  UNPACKED:
    zero in the lanes that do not `feed` the MMA's B, so that column 2 t of the product sums lane t's
    chunk alone (the chunks of a quad may lie in different groups, and each is scaled by its own lane)."""
    PAIRS: gl.constexpr = _pairs_per_unit(BITS)
    u, feeds4 = _lane_units(feeds, step * (STEP // VEC) + lane_chunk, VEC)
    per_pair = ()
    for j in gl.static_range(PAIRS):
        if UNPACKED:
            values = gl.load(xp_ptr + j * U + u, mask=feeds4 & live if EVEN else feeds4 & live & (u < U), other=0)
        else:
            values = _load(xp_ptr + j * U + u, (u < U) & live, EVEN)
        per_pair = per_pair + (_unstack(values, VEC),)
    return _transposed(per_pair, PAIRS, VEC)


@gluon.jit
def _mma_x_raw(x_ptr, feeds, lane_chunk, KX, step, BITS: gl.constexpr, VEC: gl.constexpr, STEP: gl.constexpr,
               EVEN: gl.constexpr, UNPACKED: gl.constexpr):
    """The activation pairs of a lane's VEC units in a step from x itself (int32 words, two float16 each):
    unit u's codes j and j + PAIRS meet x[CODES u + j] and x[CODES u + j + PAIRS], the same half of words
    PAIRS u + j // 2 and PAIRS u + PAIRS / 2 + j // 2; a tuple per unit of its PAIRS pairs.  The lane's
    VEC * PAIRS words are consecutive: 16-byte loads, zero past the row's KX words (UNPACKED: and in the
    lanes that do not `feed` the MMA's B, as in `_mma_x`)."""
    PAIRS: gl.constexpr = _pairs_per_unit(BITS)
    HALF: gl.constexpr = PAIRS // 2
    word, feeds4 = _lane_units(feeds, step * (STEP // VEC) + lane_chunk, VEC * PAIRS)
    if UNPACKED:
        loaded = gl.load(x_ptr + word, mask=feeds4 if EVEN else feeds4 & (word < KX), other=0)
    else:
        loaded = _load(x_ptr + word, word < KX, EVEN)
    words = _unstack(loaded, VEC * PAIRS)
    per_unit = ()
    for v in gl.static_range(VEC):
        pairs = ()
        for j in gl.static_range(0, PAIRS, 2):
            low, high = words[v * PAIRS + j // 2], words[v * PAIRS + HALF + j // 2]
            pairs = pairs + (_merge_halves(low, high), _merge_high_halves(low, high))
        per_unit = per_unit + (pairs,)
    return per_unit


@gluon.jit
def _lane_units(per_lane, chunk, VEC: gl.constexpr):
    """[WARPS, 8, 4, VEC]: a lane's VEC units side by side (16-byte loads), and a value of the lane (its row
    g, say) in the same layout, [WARPS, 8, 4, 1]."""
    VECTORS: gl.constexpr = gl.BlockedLayout([1, 1, 1, VEC], [1, 8, 4, 1], [gl.num_warps(), 1, 1, 1], [3, 2, 1, 0])
    v = gl.arange(0, VEC, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, VECTORS))))
    v = gl.expand_dims(gl.expand_dims(gl.expand_dims(v, 0), 1), 2)
    u = gl.expand_dims(gl.convert_layout(chunk, gl.SliceLayout(3, VECTORS)), 3) * VEC + v
    return u, gl.expand_dims(gl.convert_layout(per_lane, gl.SliceLayout(3, VECTORS)), 3)


@gluon.jit
def _units(qw_ptr, rows, chunk, live, N, U, WORDS: gl.constexpr, VEC: gl.constexpr, EVEN: gl.constexpr):
    """The words of a lane's VEC units (chunk `chunk`) in rows g and g + 8: for each row a tuple over the
    units of tuples of each unit's words, every word one element per lane.  The units' VEC * WORDS words
    are consecutive, so they are read as WORDS vectors of VEC words (16-byte loads at VEC 4, three-word
    units included; reading word k of each unit apart would take 4-byte loads)."""
    low = ()
    high = ()
    for k in gl.static_range(WORDS):
        word, row4 = _lane_units(rows, chunk * WORDS + k, VEC)
        ok = (word < U * WORDS) & live
        low = low + _unstack(_load(qw_ptr + row4 * (U * WORDS) + word, ok & (row4 < N), EVEN), VEC)
        high = high + _unstack(_load(qw_ptr + 8 * U * WORDS + row4 * (U * WORDS) + word, ok & (row4 + 8 < N),
                                     EVEN), VEC)
    return _grouped(low, WORDS), _grouped(high, WORDS)


@gluon.jit
def _grouped(flat, SIZE: gl.constexpr):
    """A flat tuple cut into consecutive tuples of SIZE."""
    groups = ()
    for i in gl.static_range(len(flat) // SIZE):
        group = ()
        for k in gl.static_range(SIZE):
            group = group + (flat[i * SIZE + k],)
        groups = groups + (group,)
    return groups


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
