"""`triton`: weight-only integer layers (2, 3, 4, 8 bits; A16) through this repo's Triton kernels.

The kernels read the stored tensors in place (`triton_kernels.py`, `triton_pairs.py`, `triton_mma.py`).
Batches of up to GEMV_ROWS rows run a GEMV: with float16 activations the
float16-pair ones (two codes per instruction, summed on CUDA cores or by
tensor-core MMAs), otherwise (and as a further choice) the float32 one; larger
batches dequantize into a temporary float16 weight and call cuBLAS (the tuner
also tries that for small batches).
Launch parameters are tuned per (kernel, bits, group, shape, batch bucket) the first
time a shape is seen (`tuner.py`: every candidate replayed from a CUDA graph after an
L2 flush, split-K's zeroing and cast included) and kept for the process.  Outlier columns (fp16)
are added by a small dense correction: x[:, idx] @ (W_outlier - W_codes[:, idx])^T.
With TRITON_INTERPRET=1 the kernels run on CPU tensors (slowly), which the CPU
tests use to check the kernels' logic.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from . import tuner
from .backends import Fallback, add_bias, divide_act_scale, register_backend
from .layout import gate_rows

BITS = (2, 3, 4, 8)
ONE_GROUP = 1 << 30  # group size for per-channel scales: every column falls in group 0
GEMV = "gemv"
PAIRS = "gemv-pairs"
MMA = "gemv-mma"
DEQUANT = "dequantize+cublas"
GEMV_ROWS = 4  # batches up to this size may run as one GEMV per row (the tuner decides)
# (BLOCK_N rows, BLOCK_K codes per row and step, SPLIT_K, num_warps); BLOCK_K dividing the group size lets a
# tile load one scale per row.  Split-K gives every SM several programs with short K loops (measured on the
# H100: 8-32 splits of 128-code steps are best for 4096-8192 wide layers; few long loops are latency-bound).
GEMV_CONFIGS = [(64, 128, 16, 4), (128, 128, 16, 4), (32, 128, 16, 2), (64, 128, 8, 4), (128, 128, 32, 4),
                (16, 128, 64, 1), (16, 1024, 4, 4), (64, 128, 32, 4), (256, 128, 16, 4), (256, 128, 8, 8),
                (512, 128, 8, 8)]
# the float16-pair GEMV: (BLOCK_N rows per program and thread, VEC words per thread and row, SPLIT_K, num_warps);
# a chunk of VEC words must lie in one group (VEC = 2 serves 2-bit codes in groups of 32).  The ones that were
# fastest somewhere of nine timed on the H200 (results/gemv_pairs_h200.txt; 4/4/1/2 in 8 of 9 cases),
# and a split-K one for layers with few rows (GQA k/v projections: too few programs otherwise; not yet timed there)
PAIR_CONFIGS = [(4, 4, 1, 2), (4, 4, 1, 4), (2, 4, 1, 4), (8, 4, 1, 4), (8, 2, 1, 4), (4, 4, 2, 4)]
# a 3-bit unit is three words of 32 codes (VEC units per thread and row), so fewer of them per thread: the five
# fastest of twelve timed on the H200 (results/gemv_pairs_configs_h200.txt; 4/1/1/2 on all three shapes), and
# the split-K one for layers with few rows
PAIR_CONFIGS_3BIT = [(4, 1, 1, 2), (4, 2, 1, 2), (8, 1, 1, 2), (2, 2, 1, 2), (8, 1, 1, 4), (4, 1, 2, 4)]
# the tensor-core GEMV: (VEC units per lane and row, SPLIT_K, num_warps, X_LOAD); a program holds 16 rows;
# X_LOAD (triton_mma) 1 loads a step's arranged activations a step ahead, 0 in the step, 2 reads x itself in
# the step (no activation pass; needs an even K).  The arranged ones ordered by the H200 sweeps
# (results/gemv_mma_configs_h200.txt: 8/1/4/1 fastest for int4 and int8 on 8192x8192;
# results/h200_unrolled/unrolled_configs.txt: 8/1/4/0 for int2 on four shapes); reading x itself
# (results/h200_raw_x/: 8/1/8/2 for int8 on 8192x8192, 4/1/16/2 for int4 on 4096x4096 and 4096x11008)
MMA_CONFIGS = [(8, 1, 4, 1), (8, 1, 8, 1), (4, 1, 4, 1), (4, 1, 8, 1), (2, 1, 4, 1), (2, 1, 8, 1), (1, 1, 4, 1),
               (4, 2, 4, 1), (8, 2, 4, 1), (8, 1, 4, 0),
               (8, 1, 4, 2), (8, 1, 8, 2), (4, 1, 4, 2), (4, 1, 8, 2), (2, 1, 4, 2), (2, 1, 8, 2), (8, 2, 4, 2),
               (4, 2, 4, 2), (8, 1, 16, 2), (4, 1, 16, 2)]
X_RAW, X_RAW_AHEAD = 2, 3  # the X_LOADs reading x itself, in the step or a step ahead (triton_mma.RAW, RAW_AHEAD)
# a fifth element 1 launches a configuration reading x itself as a programmatic dependent (PDL: its first
# weights load while the kernel before finishes).  On the H200 it was faster than the same configuration
# without it on every 7B shape, when GEMVs run back to back (results/h200_pdl/gemv_mma_pdl.txt); the tuner
# times it after a kernel that is not a dependent launch, as most GEMVs of a decode step run
MMA_CONFIGS += [c + (1,) for c in MMA_CONFIGS if c[3] == X_RAW]
# a sixth element 1 keeps the older step (pairs dequantized to q s by one HFMA2 each; triton_mma's
# DEQUANTIZE).  Arranged, only at 8/1/4/1 did it beat the MMAs on unpacked pairs, on int4 8192x8192 (15.0
# against 15.7 us; results/h200_unpacked/ab_*.txt).  Reading x itself, at 2, 3 and 4 bits it was never the
# fastest choice of a stacked 7B shape (int3 22016x4096 at 2/1/4/2: 31.5 against 21.2 us), but at int8 it was
# at 8/1/4/2 on 12288x4096 and at 4/1/16/2/1 on 4096x4096 (results/h200_rawpairs/gemv_mma_rawpairs.txt)
MMA_CONFIGS += [(8, 1, 4, 1, 0, 1), (8, 1, 4, 2, 0, 1), (4, 1, 16, 2, 1, 1)]
# x itself loaded a step ahead (X_RAW_AHEAD; 16-40 more registers): the fastest, by 3-4 %, only on int4
# 22016x4096 and int8 12288x4096 at 8/1/4 and int3 4096x11008 at 2/1/8, and up to 2x slower elsewhere
# (int2 22016x4096 at 8/1/8: 38.2 against 17.9 us; results/h200_raw_ahead/), so only those two are offered
MMA_CONFIGS += [(8, 1, 4, X_RAW_AHEAD), (2, 1, 8, X_RAW_AHEAD)]
ARRANGE_BLOCK = 128
DEQUANT_TILE = (32, 256)  # (BLOCK_N, BLOCK_K) of the dequantization pass


def available() -> str | None:
    """None when the kernels can run here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not torch.cuda.is_available() and not tuner.interpreting():
        return "needs a CUDA device (or TRITON_INTERPRET=1)"
    return None


def _launch(kind: str, config: tuple, x, qweight, scales, zeros, bits: int, group: int, in_features: int,
            real_zeros: bool = False, gated: bool = False):
    """x @ the layer's weight^T by one launch choice; `gated`: silu(gate) * up of a gated layer (rows in
    `layout.gated_order`), by the tensor-core GEMV's epilogue where it has whole sums (no split-K), else
    after the launch."""
    from . import triton_kernels as tk

    if gated and not (kind == MMA and config[1] == 1):
        return gate_rows(_launch(kind, config, x, qweight, scales, zeros, bits, group, in_features, real_zeros))

    m, n, kw, ng = x.shape[0], qweight.shape[0], qweight.shape[1], scales.shape[1]
    zeros_arg = zeros if zeros is not None else scales
    common = dict(BITS=bits, GROUP=group, HAS_ZEROS=zeros is not None)
    if kind == DEQUANT:
        return x @ dequantize(qweight, scales, zeros, bits, group, in_features, x.dtype, config).T
    if kind in (PAIRS, MMA):
        return _launch_pairs(kind, config, x, qweight, scales, zeros_arg, bits, in_features, real_zeros, common,
                             gated)
    block_n, block_k, split, warps = config
    out = _gemv_output(x, n, split)
    codes = unit_codes(bits)
    units = packed_units(kw, bits)
    # codes sharing one shift carry offsets up to 2**(bits * per_shift) (`_code_float`): float16/bfloat16
    # activations lose nothing to that at <= 2**8; float32 ones keep full precision with one shift per code
    per_shift = 1 if x.dtype == torch.float32 else max(1, 8 // bits)
    xt = torch.empty(m, codes, units, device=x.device, dtype=torch.float32)
    xb = torch.empty(m, 2, units, device=x.device, dtype=torch.float32)
    tk.arrange_activations[(triton_cdiv(units, ARRANGE_BLOCK), m)](
        x, xt, xb, out, in_features, units, n, x.stride(0), out.stride(0), BITS=bits, PER_SHIFT=per_shift,
        ZERO_OUT=split > 1, BLOCK=ARRANGE_BLOCK)
    block_u = max(1, block_k // codes)
    even = n % block_n == 0 and units % (block_u * split) == 0
    grid = (triton_cdiv(n, block_n), split, m)
    tk.gemv_units[grid](xt, xb, qweight, scales, zeros_arg, out, n, units, kw, ng, out.stride(0), BLOCK_N=block_n,
                        BLOCK_U=block_u, SPLIT_K=split, EVEN=even, PER_SHIFT=per_shift, num_warps=warps, **common)
    return out.to(x.dtype)


def _gemv_output(x: torch.Tensor, n: int, split: int) -> torch.Tensor:
    """A GEMV's [M, N] output; split-K adds float32 partial sums into it (native atomics; float16 ones are
    compare-and-swap loops), cast to x's dtype after the launch."""
    return torch.empty(x.shape[0], n, device=x.device, dtype=torch.float32 if split > 1 else x.dtype)


def _launch_pairs(kind, config, x, qweight, scales, zeros_arg, bits, in_features, real_zeros, common,
                  gated: bool = False):
    """The float16-pair GEMVs (CUDA cores or tensor cores) after their activation pass, or the tensor-core
    one reading x itself (X_LOAD = RAW).  That one MMAs -(M + z) in float16, exact only for integer zero
    points, so real ones (`zero_points`) take its dequantizing step.  `gated` (tensor-core GEMV, split-K 1
    only): its epilogue takes silu(gate) * up."""
    from . import triton_mma as tm
    from . import triton_pairs as tp

    m, n, ng = x.shape[0], qweight.shape[0], scales.shape[1]
    codes = unit_codes(bits)
    units = packed_units(qweight.shape[1], bits)
    block_n, vec, split, warps = (tm.ROWS, *config[:3]) if kind == MMA else config
    grid = (triton_cdiv(n, block_n), split, m)
    even = kind == MMA and n % block_n == 0 and units % (warps * 4 * vec) == 0  # gemv_mma's unmasked path
    dequantizing = len(config) > 5 and bool(config[5])
    width = n // 2 if gated else n  # gated: silu(gate) * up, one column per row pair
    if kind == MMA and config[3] >= X_RAW:
        out = _gemv_output(x, width, split)
        if split > 1:
            out.zero_()  # split-K adds into it (otherwise the activation pass zeroes it)
        words = x.view(torch.int32)  # x is contiguous with an even K (`candidates`): two float16 per word
        even = even and in_features == units * codes
        pdl = len(config) > 4 and bool(config[4])
        tm.gemv_mma[grid](words, words, qweight, scales, zeros_arg, out, n, units, ng, out.stride(0), words.stride(0),
                          words.shape[1], VEC=vec, SPLIT_K=split, EVEN=even, X_LOAD=config[3], PDL=pdl, launch_pdl=pdl,
                          DEQUANTIZE=dequantizing or real_zeros, GATED=gated, num_warps=warps, **common)
        return out.to(x.dtype)
    out = _gemv_output(x, width, split)
    xp = torch.empty(m, codes // 2, units, device=x.device, dtype=torch.int32)
    offsets = kind == MMA and not dequantizing  # the MMAs on unpacked pairs take the chunks' sums of M x too
    xs = torch.empty(m, (1 + offsets) * triton_cdiv(units, vec), device=x.device, dtype=torch.float32)
    tp.arrange_pairs[(triton_cdiv(units, ARRANGE_BLOCK), m)](x, xp, xs, out, in_features, units, n, x.stride(0),
                                                              out.stride(0), CODES=codes, TILE=vec,
                                                              ZERO_OUT=split > 1, BLOCK=ARRANGE_BLOCK, OFFSETS=offsets)
    if kind == MMA:
        tm.gemv_mma[grid](xp, xs, qweight, scales, zeros_arg, out, n, units, ng, out.stride(0), xp.stride(0), 0,
                          VEC=vec, SPLIT_K=split, EVEN=even, X_LOAD=config[3], DEQUANTIZE=dequantizing,
                          GATED=gated, num_warps=warps, **common)
    else:
        tp.gemv_pairs[grid](xp, xs, qweight, scales, zeros_arg, out, n, units, ng, out.stride(0), BLOCK_N=block_n,
                            VEC=vec, SPLIT_K=split, num_warps=warps, **common)
    return out.to(x.dtype)


def dequantize(qweight, scales, zeros, bits: int, group: int, in_features: int, dtype: torch.dtype,
               tile: tuple[int, int] = DEQUANT_TILE) -> torch.Tensor:
    """The stored codes as a dense [N, K] weight in `dtype`, by one Triton pass."""
    from . import triton_kernels as tk

    n, kw, ng = qweight.shape[0], qweight.shape[1], scales.shape[1]
    weight = torch.empty(n, in_features, device=qweight.device, dtype=dtype)
    block_n, block_k = tile
    grid = (triton_cdiv(n, block_n), triton_cdiv(in_features, block_k))
    tk.dequantize_codes[grid](qweight, scales, zeros if zeros is not None else scales, weight, n, in_features, kw,
                              ng, BITS=bits, GROUP=group, HAS_ZEROS=zeros is not None, BLOCK_N=block_n,
                              BLOCK_K=block_k, num_warps=4)
    return weight


def dense_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """`layer.dequantize_codes(dtype)`, bit-identical, by the Triton pass where it covers the layer.

    The profiler rebuilds each candidate's dense weight for every calibration batch; on a GPU one
    pass over the codes replaces a dozen torch operations per slice of rows.
    """
    opt = layer.option
    covered = opt.quantized and opt.fmt == "int" and opt.bits in BITS
    if not covered or available() is not None or not (layer.qweight.is_cuda or tuner.interpreting()):
        return layer.dequantize_codes(dtype)
    weight = dequantize(layer.qweight, layer.scales, layer.zeros, opt.bits, kernel_group(opt.group_size,
                        layer.in_features), layer.in_features, dtype)
    if layer.outlier_idx is not None:
        weight[:, layer.outlier_idx.long()] = layer.outlier_weight.to(dtype)
    return weight


def unit_codes(bits: int) -> int:
    """Codes per unit of the stored layout: one word, or the 3 words of 32 three-bit codes."""
    return 32 // bits if 32 % bits == 0 else 32


def packed_units(words: int, bits: int) -> int:
    """Units in a row of `words` stored words."""
    return words * 32 // (unit_codes(bits) * bits)


def pair_configs(bits: int) -> list[tuple]:
    return PAIR_CONFIGS_3BIT if bits == 3 else PAIR_CONFIGS


def kernel_group(group_size: int, in_features: int) -> int:
    """The kernels' group size: per-channel scales (no group, or one as wide as the row) are one group."""
    return group_size if 0 < group_size < in_features else ONE_GROUP


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def candidates(m: int, group: int, bits: int, dtype: torch.dtype, in_features: int) -> tuple[tuple[str, tuple], ...]:
    """(kernel, launch parameters) worth trying for a batch of m rows; the float16-pair GEMV first (the
    choice without tuning).  Gluon kernels need triton >= 3.5 and do not run in Triton's CPU interpreter;
    the tensor-core GEMV reads x itself (X_LOAD 2) as words of two float16, so only for an even K.
    Every call of a layer asks, so the list is kept per shape (filtering it took ~25 us of Python)."""
    gluon = dtype == torch.float16 and _gluon() and not tuner.interpreting()
    return _candidates(m <= GEMV_ROWS, gluon, group, bits, in_features)


@functools.cache
def _candidates(gemv: bool, gluon: bool, group: int, bits: int, in_features: int) -> tuple[tuple[str, tuple], ...]:
    configs = []
    if gemv and gluon:
        configs += [(PAIRS, c) for c in pair_configs(bits)] + [(MMA, c) for c in MMA_CONFIGS]
    if gemv:
        configs += [(GEMV, c) for c in GEMV_CONFIGS]
    configs = [(kind, c) for kind, c in configs if unfit(kind, c, bits, group, in_features) is None]
    return tuple(configs + [(DEQUANT, DEQUANT_TILE)])


def unfit(kind: str, config: tuple, bits: int, group: int, in_features: int) -> str | None:
    """Why a GEMV launch choice cannot compute a layer (None when it can): a lane's chunk of units must lie
    in one group, and the tensor-core GEMV reads x itself as words of two float16."""
    if kind in (PAIRS, MMA):
        chunk = config[1 if kind == PAIRS else 0] * unit_codes(bits)
        if group % chunk:
            return f"its chunks of {chunk} codes straddle groups of {group}"
    if kind == MMA and config[3] >= X_RAW and in_features % 2:
        return f"reading x itself needs an even number of inputs, not {in_features}"
    if kind == GEMV and group % 32:
        return f"it needs groups of a multiple of 32 codes, not {group}"
    return None


@functools.cache
def _gluon() -> bool:
    try:
        return importlib.util.find_spec("triton.experimental.gluon") is not None
    except ImportError:  # no triton, or one without its experimental package
        return False


def zero_points(zeros: torch.Tensor | None) -> str:
    """"none" (symmetric), "integer" (RTN, GPTQ, AWQ) or "real" (HQQ optimises them as real numbers): the
    kernels' fastest step is exact for the first two only."""
    if zeros is None:
        return "none"
    return "integer" if torch.equal(zeros, zeros.round()) else "real"


def tuner_key(bits: int, group: int, zeros: str, packed_shape, rows: int, dtype) -> tuple:
    """What the tuner keys a launch choice on (`zeros` as `zero_points` says): batches above GEMV_ROWS
    share one bucket."""
    return ("triton", bits, group, zeros, tuple(packed_shape), min(rows, GEMV_ROWS + 1), dtype)


def quant_matmul(x: torch.Tensor, qweight, scales, zeros, bits: int, group_size: int, in_features: int,
                 real_zeros: bool = False, gated: bool = False):
    """x [M, K] (contiguous) @ dequantized(qweight)^T -> [M, N] in x's dtype; `real_zeros`: the zero points
    are not all integers (`zero_points`, found once when the layer is built); `gated`: silu(gate) * up of
    a gated layer, [M, N / 2] (`gated_matmul`)."""
    group = kernel_group(group_size, in_features)
    configs = candidates(x.shape[0], group, bits, x.dtype, in_features)
    kind = ("none" if zeros is None else "real" if real_zeros else "integer") + (" gated" if gated else "")
    key = tuner_key(bits, group, kind, qweight.shape, x.shape[0], x.dtype)
    launch = functools.partial(_launch, x=x, qweight=qweight, scales=scales, zeros=zeros, bits=bits, group=group,
                               in_features=in_features, real_zeros=real_zeros, gated=gated)
    choice = tuner.choose(key, configs, lambda c: launch(*c), reference=(DEQUANT, DEQUANT_TILE))
    return launch(*choice)


@torch.library.custom_op("bitalloc::quant_matmul", mutates_args=())
def quant_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    bits: int, group_size: int, in_features: int, real_zeros: bool,
                    gated: bool = False) -> torch.Tensor:
    """`quant_matmul` as one opaque operator for torch.compile: a compiled decode step keeps the packed
    layers inside its graph (no graph break) and fuses the operations between them."""
    return quant_matmul(x, qweight, scales, zeros, bits, group_size, in_features, real_zeros, gated)


@quant_matmul_op.register_fake
def _(x, qweight, scales, zeros, bits, group_size, in_features, real_zeros, gated=False):
    return x.new_empty(x.shape[0], qweight.shape[0] // 2 if gated else qweight.shape[0])


def gates_in_kernel(layer) -> bool:
    """Whether `gated_matmul` can compute this gated layer: built on this backend, and nothing added to the
    product before the gate (bias, outlier columns) or taken from x first (activation scales)."""
    state = layer.kernel_state
    return (layer.kernel == "triton" and state is not None and state["correction"] is None and layer.bias is None
            and layer.act_scale is None)


def gated_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a layer whose gate and up rows alternate (`layout.gated_order`; `gates_in_kernel`):
    the tensor-core GEMV takes it in its epilogue, so no kernel of its own follows the layer."""
    out = _packed_product(layer, x.reshape(-1, x.shape[-1]).contiguous(), layer.kernel_state["real_zeros"], True)
    return out.reshape(*x.shape[:-1], layer.out_features // 2)


def _packed_product(layer, flat: torch.Tensor, real_zeros: bool, gated: bool = False) -> torch.Tensor:
    """`quant_matmul` of flat x [M, K] by `layer`'s codes, one opaque operator when torch.compile traces it."""
    opt = layer.option
    matmul = quant_matmul_op if torch.compiler.is_compiling() else quant_matmul
    return matmul(flat, layer.qweight, layer.scales, layer.zeros, opt.bits, opt.group_size, layer.in_features,
                  real_zeros, gated)


@register_backend("triton")
class TritonBackend(Fallback):
    traceable = True  # run() may be traced by torch.compile once the layer's kernel state is built

    def unsupported(self, layer) -> str | None:
        opt = layer.option
        if not opt.quantized:
            return "unquantized layer"
        if opt.fmt != "int" or opt.bits not in BITS:
            return f"kernels cover int{'/int'.join(map(str, BITS))}, not {opt.format_name}"
        if opt.act_bits < 16:
            return "activation quantization (use int8 or mixed-outlier)"
        return available()

    def build(self, layer) -> dict:
        correction = None
        if layer.outlier_idx is not None:
            idx = layer.outlier_idx.long()
            stored = layer.quantized_weight()
            stored.outlier_idx = None
            codes_part = stored.dequantize_codes()[:, idx.cpu()].to(layer.outlier_weight.device)
            correction = (idx, (layer.outlier_weight.float() - codes_part))
        return {"correction": correction, "real_zeros": zero_points(layer.zeros) == "real"}

    def run(self, layer, state: dict, x: torch.Tensor) -> torch.Tensor:
        x = divide_act_scale(layer, x)
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).contiguous()
        out = _packed_product(layer, flat, state["real_zeros"])
        if state["correction"] is not None:
            idx, weight = state["correction"]
            out = out + flat[:, idx] @ weight.to(flat.dtype).T
        return add_bias(layer, out.reshape(*shape[:-1], layer.out_features))
