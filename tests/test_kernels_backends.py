"""Every backend computes what `reference` computes, for every bit width, group size and batch size."""
import collections
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitalloc.kernels import approx as approx_module
from bitalloc.kernels.backends import auto_backend
from bitalloc.kernels.layout import gate_rows
from bitalloc.kernels.quant_linear import QuantLinear
from bitalloc.quant import parse, quantize
from conftest import load_script

IN_FEATURES = 200  # with g64 the last group is ragged (8 columns); rows pad to 224 codes
OUT_FEATURES = 48
BATCHES = (1, 5, 33)
WEIGHT_ONLY = [f"rtn:int{b}:{g}:{s}" for b in (2, 3, 4, 8) for g in ("g32", "g64", "pc") for s in ("sym", "asym")]
# bfloat16 activations, scales and outputs (cpu), float32 elsewhere
TOLERANCE = {"cpu": 1e-2, "int8": 1e-5, "mixed-outlier": 1e-5, "triton": 1e-5, "approx": 1e-6}


def make_layer(option: str, backend: str, outliers: int = 0, bias: bool = True, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator)
    qw = quantize(weight, parse(option))
    if outliers:
        qw.outlier_idx = torch.tensor([3, 64, 130, 199][:outliers])
        qw.outlier_weight = torch.randn(OUT_FEATURES, outliers, generator=generator).half().float()
        qw.option = parse(f"{option}:outliers={outliers}")
    b = torch.randn(OUT_FEATURES, generator=generator) if bias else None
    reference = QuantLinear.from_weight(qw, b)
    layer = QuantLinear.from_weight(qw, b)
    layer.set_backend(backend)
    return reference, layer


def inputs(batch: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(batch, IN_FEATURES, generator=torch.Generator().manual_seed(seed))
    x[:, 64] *= 20  # an outlier channel
    return x


def relative_error(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("option", WEIGHT_ONLY)
def test_cpu_matches_reference(option):
    reference, layer = make_layer(option, "cpu")
    packed = parse(option).bits <= 4 or option.endswith(("pc:sym", "pc:asym"))
    assert (layer.kernel == "cpu") == packed, layer.kernel
    for batch in BATCHES:
        x = inputs(batch)
        assert relative_error(layer(x), reference(x)) < TOLERANCE["cpu"]


def test_cpu_takes_out_outlier_columns_whose_zero_points_are_not_integers():
    reference, layer = make_layer("hqq:int4:g32:asym", "cpu", outliers=2)  # HQQ zero points are real numbers
    assert layer.kernel == "cpu" and not torch.equal(layer.zeros, layer.zeros.round())
    for batch in BATCHES:
        x = inputs(batch)
        assert relative_error(layer(x), reference(x)) < TOLERANCE["cpu"]


@pytest.mark.parametrize("backend", ["int8", "mixed-outlier"])
@pytest.mark.parametrize("option", ["rtn:int8:pc:sym:a8", "rtn:int8:pc:asym:a8", "rtn:int4:pc:sym:a8",
                                    "rtn:int4:pc:asym:a4", "rtn:int2:pc:asym:a8"])
def test_integer_activation_backends_match_reference(backend, option):
    outliers = 2 if backend == "mixed-outlier" else 0
    reference, layer = make_layer(option, backend, outliers=outliers)
    assert layer.kernel == backend
    for batch in BATCHES:
        x = inputs(batch)
        assert relative_error(layer(x), reference(x)) < TOLERANCE[backend]


def test_layers_a_backend_cannot_compute_run_on_reference_and_say_so():
    cases = [("cpu", "rtn:nf4:g64", 0), ("cpu", "rtn:int8:g64:sym", 0), ("int8", "rtn:int8:g64:sym:a8", 0),
             ("int8", "rtn:int8:pc:sym:a8", 2), ("mixed-outlier", "rtn:int4:g64:asym", 0),
             ("triton", "rtn:fp4:g32", 0), ("int8", "rtn:int8:pc:sym:afp8", 0),
             ("mixed-outlier", "rtn:int8:pc:sym:afp8", 2)]  # float8 activations: the integer kernels would round
    for backend, option, outliers in cases:
        reference, layer = make_layer(option, backend, outliers=outliers)
        assert layer.kernel.startswith(f"reference ({backend}: "), (backend, option, layer.kernel)
        x = inputs(3)
        assert torch.equal(layer(x), reference(x))


def test_auto_picks_the_kernel_for_the_device():
    _, w4 = make_layer("rtn:int4:g64:asym", "reference")
    _, w8a8 = make_layer("rtn:int8:pc:sym:a8", "reference")
    _, mixq = make_layer("rtn:int8:pc:sym:a8", "reference", outliers=2)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [auto_backend(layer, cpu) for layer in (w4, w8a8, mixq)] == ["cpu"] * 3
    assert [auto_backend(layer, cuda) for layer in (w4, w8a8, mixq)] == ["triton", "int8", "mixed-outlier"]
    _, w8afp8 = make_layer("rtn:int8:pc:sym:afp8", "reference")
    assert auto_backend(w8afp8, cuda) == "reference"
    w4.set_backend("auto")
    assert w4.backend == "cpu" and w4.kernel == "cpu"


def test_the_approx_simulation_answers_in_the_inputs_dtype():
    reference, layer = make_layer("rtn:int4:g64:asym", "approx")
    x = inputs(3).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == reference(x).shape
    assert relative_error(out.float(), reference(x).float()) < 0.1  # approximate products, a few % off


def test_approx_backend_feeds_the_simulation_the_effective_weight(monkeypatch):
    calls = []

    def exact(x, weight):
        calls.append(weight.shape)
        return x @ weight.T

    monkeypatch.setattr(approx_module, "approx_matmul", exact)
    reference, layer = make_layer("rtn:int4:g64:asym:a8", "approx", outliers=1)
    assert layer.kernel == "approx"
    x = inputs(5)
    assert relative_error(layer(x), reference(x)) < TOLERANCE["approx"]
    assert calls == [(OUT_FEATURES, IN_FEATURES)]


def test_moving_a_layer_rebuilds_its_kernel():
    reference, layer = make_layer("rtn:int4:g64:asym", "cpu")
    assert layer.kernel_state is not None
    layer.to(torch.float32)
    assert layer.kernel is None and layer.kernel_state is None
    x = inputs(2)
    assert relative_error(layer(x), reference(x)) < TOLERANCE["cpu"] and layer.kernel == "cpu"


TRITON_CHECK = """
import sys, numpy, torch, triton
import triton.language as tl
sys.path.insert(0, {tests!r})
from test_kernels_backends import WEIGHT_ONLY, BATCHES, inputs, make_layer, relative_error


@triton.jit
def loop_over_an_argument(x_ptr, n, STEP: tl.constexpr):
    for start in range(0, n, STEP):
        tl.store(x_ptr + start // STEP, start)


try:  # some interpreter/numpy pairs cannot run such loops (int() of a 1-element array): nothing to check then
    loop_over_an_argument[(1,)](torch.zeros(2, dtype=torch.int32), 2, STEP=1)
except Exception as err:
    print(f"SKIP triton {{triton.__version__}}'s interpreter with numpy {{numpy.__version__}}: {{str(err)[:150]}}")
    raise SystemExit(0)
worst = 0.0
for option in WEIGHT_ONLY + ["rtn:int4:g100:asym", "rtn:int2:g128:sym"]:
    reference, layer = make_layer(option, "triton", outliers=1 if "g100" in option else 0)
    assert layer.kernel == "triton", (option, layer.kernel)
    for batch in BATCHES:
        x = inputs(batch)
        worst = max(worst, relative_error(layer(x), reference(x)))
print(worst)
"""


DENSE_CHECK = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_kernels_backends import WEIGHT_ONLY, make_layer
from bitalloc.kernels.triton_backend import dense_weight

checked = 0
for option in WEIGHT_ONLY + ["rtn:int4:g100:asym", "rtn:int3:g64:asym"]:
    _, layer = make_layer(option, "reference", outliers=1 if "g100" in option else 0)
    if layer.zeros is not None and option.endswith("g64:asym") and "int3" in option:
        layer.zeros.add_(0.3)  # fractional zero-points (HQQ's) are reproduced exactly too
    for dtype in (torch.float16, torch.float32):  # the interpreter truncates to bfloat16 (GPUs round: GPU test)
        assert torch.equal(dense_weight(layer, dtype), layer.dequantize_codes(dtype)), (option, dtype)
        checked += 1
print(checked)
"""


READ_FLOOR_CHECK = """
import functools, operator, sys, torch
sys.path.insert(0, {tests!r} + "/../inference")
import read_floor

words = torch.randint(0, 1 << 30, (5001,), dtype=torch.int32)
out = torch.empty(2, dtype=torch.int32)
read_floor.stream_read[(2,)](words, out, 5001, BLOCK=1024, TILES=4)
xor = lambda values: functools.reduce(operator.xor, values.flatten().tolist(), 0)
assert out.tolist() == [xor(words[:4096]), xor(words[4096:])]
matrix = words[:32 * 150].reshape(32, 150)
out = torch.empty(4, dtype=torch.int32)
read_floor.row_tiles_read[(2, 2)](matrix, out, 150, ROWS=16, CHUNK=32, TILES=3)
assert out.tolist() == [xor(matrix[16 * i:16 * (i + 1), 96 * j:96 * (j + 1)]) for i in range(2) for j in range(2)]
print("ok")
"""


ARRANGE_CHECK = """
import torch
from bitalloc.kernels import triton_pairs as tp
from bitalloc.kernels.triton_backend import packed_units, triton_cdiv, unit_codes

checked = 0
for bits in (2, 3, 4, 8):
    codes, tile, k = unit_codes(bits), 2, 1000
    units = packed_units(triton_cdiv(k, 32) * bits, bits)
    x = torch.randn(2, k, dtype=torch.float16)
    xp = torch.empty(2, codes // 2, units, dtype=torch.int32)
    xs = torch.empty(2, 2 * triton_cdiv(units, tile))
    tp.arrange_pairs[(triton_cdiv(units, 128), 2)](x, xp, xs, xs, k, units, 0, k, 0, CODES=codes, TILE=tile,
                                                    ZERO_OUT=False, BLOCK=128, OFFSETS=True)
    padded = torch.nn.functional.pad(x.float(), (0, units * codes - k)).reshape(2, units, codes)
    offsets = torch.tensor([float(tp.code_offset(j % (codes // 2), bits)) for j in range(codes)])
    per_unit = torch.stack([padded.sum(-1), (padded * offsets).sum(-1)], 1)  # [2, 2, units]
    chunks = torch.nn.functional.pad(per_unit, (0, -units % tile)).reshape(2, 2, -1, tile).sum(-1)
    assert torch.allclose(xs.reshape(2, 2, -1), chunks, rtol=1e-5, atol=1e-3), bits
    checked += 1
print(checked)
"""


def _interpreted(tmp_path, text: str) -> str:
    """The last line a script printed when run by Triton's CPU interpreter (skips when it says SKIP)."""
    script = tmp_path / "check_triton.py"  # a file, not -c: triton.jit reads its kernels' source
    script.write_text(text.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    if last.startswith("SKIP "):
        pytest.skip(last.removeprefix("SKIP "))
    return last


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@needs_triton
def test_triton_kernels_match_reference_in_the_interpreter(tmp_path):
    """The Triton kernels' logic, run by Triton's CPU interpreter (the GPU run is test_kernels_gpu.py)."""
    assert float(_interpreted(tmp_path, TRITON_CHECK)) < TOLERANCE["triton"]


@needs_triton
def test_triton_dequantization_is_bit_identical_to_the_reference_in_the_interpreter(tmp_path):
    """The profiler's candidates use it in place of `dequantize_codes`: the same bits, every dtype."""
    assert int(_interpreted(tmp_path, DENSE_CHECK)) == (len(WEIGHT_ONLY) + 2) * 2


@needs_triton
def test_arranged_activations_carry_the_chunk_sums_of_x_and_of_the_code_offsets_in_the_interpreter(tmp_path):
    """`arrange_pairs` with OFFSETS: per chunk of TILE units, the sum of x and the sum of M_j x (M_j the float16
    offset `_pair_codes` leaves on pair j), which the tensor-core GEMV takes out once per chunk."""
    assert int(_interpreted(tmp_path, ARRANGE_CHECK)) == 4


@needs_triton
def test_read_floor_kernels_read_every_word_once_in_the_interpreter(tmp_path):
    """inference/read_floor.py: the streaming and the row-tile read each fold every word of their tile into
    their program's xor (so no load is dead, and none is read twice)."""
    assert _interpreted(tmp_path, READ_FLOOR_CHECK) == "ok"


def _gemv_sass():
    return load_script("inference/gemv_sass.py")


@needs_triton
def test_gemv_loop_is_counted_from_sass_compiled_without_a_gpu():
    """inference/gemv_sass.py: each code's AND-OR stays one LOP3 (two when ptxas sees two immediates)."""
    gemv_sass = _gemv_sass()
    config = (64, 128, 16, 4)
    body = gemv_sass.loop_body(gemv_sass.sass_of(4, config))
    codes_per_thread = gemv_sass.codes_per_thread("units", 4, config)
    assert sum(t.startswith("LOP3") for t in body) == codes_per_thread
    assert len(body) / codes_per_thread < 4.5


@needs_triton
def test_pair_gemv_spends_one_float16_pair_instruction_per_code():
    """gemv_pairs (Gluon, compiled for sm_90 here): per pair of codes one LOP3 builds both floats and two
    HFMA2 dequantize and accumulate both, so per code about one HFMA2 (a few more move constants) and half a
    LOP3; 3-bit codes add a PRMT per pair, which merges the stream's two windows."""
    gemv_sass = _gemv_sass()
    for bits in (2, 3, 4, 8):
        config = (4, 1, 1, 2) if bits == 3 else (4, 4, 1, 2)
        body = gemv_sass.loop_body(gemv_sass.sass_of(bits, config, kernel="pairs"))
        codes = gemv_sass.codes_per_thread("pairs", bits, config)
        hfma2 = sum(t.startswith("HFMA2") for t in body)
        lop3 = sum(t.startswith("LOP3") for t in body)
        prmt = sum(t.startswith("PRMT") for t in body)
        assert codes <= hfma2 <= 1.15 * codes and lop3 <= 0.65 * codes, (bits, hfma2, lop3, codes)
        assert bits != 3 or prmt <= codes / 2, prmt


@needs_triton
def test_tensor_core_gemv_spends_one_mma_per_eight_codes_of_a_lane():
    """gemv_mma (compiled for sm_90 here) on arranged activations: each lane unpacks its pairs M + q (one
    LOP3 each) and a warp's m16n8k16 MMA sums four pairs of every lane as they are, so per code half a
    LOP3 and an eighth of an HMMA, no HFMA2 (the offsets M x and the zero points leave once per chunk,
    from the activation pass's sums) and no float16 partial sums.  The older step (DEQUANTIZE, sixth
    element 1) spends an HFMA2 per pair on top, so more instructions at the same configuration."""
    gemv_sass = _gemv_sass()
    for bits in (2, 3, 4, 8):
        config = (4, 1, 4)
        body = gemv_sass.loop_body(gemv_sass.sass_of(bits, config, kernel="mma"))
        dequantizing = gemv_sass.loop_body(gemv_sass.sass_of(bits, config + (1, 0, 1), kernel="mma"))
        codes = gemv_sass.codes_per_thread("mma", bits, config)
        count = lambda name: sum(t.startswith(name) for t in body)  # noqa: E731
        assert count("HMMA") == codes / 8 and count("HFMA2") == 0, (bits, count("HMMA"), count("HFMA2"))
        assert sum(t.startswith("HFMA2") for t in dequantizing) == codes / 2, bits
        assert len(body) < len(dequantizing), (bits, len(body), len(dequantizing))
        assert count("HADD2") <= 4  # only the rows' scales and zeros to float32, once per step
        assert bits != 4 or len(body) / codes < 2.4  # the float16-pair GEMV on CUDA cores: 3.6


@needs_triton
def test_gemv_sass_default_configurations_are_the_kernels_own():
    gemv_sass = _gemv_sass()
    for kernel in ("units", "pairs", "mma"):
        first = tuple(int(v) for v in gemv_sass.default_configs(kernel)[0].split("/"))
        assert gemv_sass.loop_body(gemv_sass.sass_of(4, first, kernel=kernel)), kernel


@needs_triton
def test_tensor_core_gemv_reads_three_bit_units_with_wide_loads():
    """A lane's units of three words are consecutive words: read as 16-byte vectors, not word by word
    (the 4-byte loads left int3 at ~20 % of the HBM roofline on the H200)."""
    gemv_sass = _gemv_sass()
    body = gemv_sass.loop_body(gemv_sass.sass_of(3, (4, 1, 4, 2), kernel="mma"))
    loads = collections.Counter(re.search(r"LDG\.E[.\w]*", t).group(0) for t in body if "LDG" in t)
    assert set(loads) == {"LDG.E.128", "LDG.E.U16"}, loads  # codes and x; scales and zeros
    assert loads["LDG.E.128"] == 2 * 3 + 4 * 16 // 4, loads  # rows g and g + 8 x 3 words; 64 words of x


@needs_triton
def test_tensor_core_gemv_loading_activations_in_the_step_frees_registers():
    """X_LOAD 0 keeps only the words, scales and zeros a step ahead: the 2-bit loop (~170 registers with
    everything ahead, too many for four programs per SM) fits in 128, and the arithmetic stays the same."""
    gemv_sass = _gemv_sass()
    for bits in (2, 4):
        ahead, in_step = (gemv_sass.sass_of(bits, (8, 1, 4, x_load), kernel="mma") for x_load in (1, 0))
        assert bits != 2 or gemv_sass.registers(in_step) <= min(128, gemv_sass.registers(ahead) - 32)
        hmma = [sum(t.startswith("HMMA") for t in gemv_sass.loop_body(sass)) for sass in (ahead, in_step)]
        assert hmma[0] == hmma[1], (bits, hmma)


@needs_triton
def test_tensor_core_gemv_reading_x_itself_pairs_its_halves_and_mmas_the_zero_point():
    """X_LOAD 2 reads float16 x as words instead of arranged pairs: one PRMT builds each activation pair, and
    a second MMA per MMA adds -(M + z) times the same pairs to the unpacked pairs' M + q (so no sums of x are
    loaded, and no HFMA2 per pair; the older step, DEQUANTIZE, spends one and adds -z s), at most 128
    registers (four programs of 4 warps per SM) even at VEC 8."""
    gemv_sass = _gemv_sass()
    for bits in (2, 3, 4, 8):
        config = (4, 1, 4)
        raw, arranged = (gemv_sass.sass_of(bits, (*config, x_load), kernel="mma") for x_load in (2, 0))
        dequantizing = gemv_sass.sass_of(bits, (*config, 2, 0, 1), kernel="mma")
        codes = gemv_sass.codes_per_thread("mma", bits, config)
        pairs = codes / 4  # a lane's activation pairs serve rows g and g + 8
        count = lambda sass, name: sum(t.startswith(name) for t in gemv_sass.loop_body(sass))  # noqa: E731
        assert count(raw, "HMMA") == codes / 4 and count(raw, "HFMA2") == 0, (bits, count(raw, "HMMA"))
        assert count(dequantizing, "HMMA") == codes / 4 and count(dequantizing, "HFMA2") == codes / 2, bits
        assert len(gemv_sass.loop_body(raw)) < len(gemv_sass.loop_body(dequantizing)), bits
        merges = count(raw, "PRMT") - count(arranged, "PRMT")  # beyond the 3-bit window merges both have
        assert 0.5 * pairs <= merges <= 1.3 * pairs, (bits, merges, pairs)  # give or take what ptxas shares
        assert gemv_sass.registers(gemv_sass.sass_of(bits, (8 if bits != 3 else 4, 1, 4, 2), kernel="mma")) <= 128


@needs_triton
def test_tensor_core_gemv_as_a_programmatic_dependent_waits_once_before_its_loop():
    """PDL (config 8/1/4/2/1): one grid-dependency wait (SASS ACQBULK) after the first step's weight loads are
    issued and before the loop, one early-launch hint (PREEXIT) after it; the loop's MMAs unchanged."""
    gemv_sass = _gemv_sass()
    plain, pdl = (gemv_sass.sass_of(4, (8, 1, 4, 2, flag), kernel="mma") for flag in (0, 1))
    code = {name: [text for _, text in gemv_sass.ADDRESS.findall(sass)]
            for name, sass in (("plain", plain), ("pdl", pdl))}
    count = lambda name, op: sum(t.startswith(op) for t in code[name])  # noqa: E731
    assert (count("pdl", "ACQBULK"), count("pdl", "PREEXIT")) == (1, 1)
    assert (count("plain", "ACQBULK"), count("plain", "PREEXIT")) == (0, 0)
    body = gemv_sass.loop_body(pdl)
    assert not any(t.startswith(("ACQBULK", "PREEXIT")) for t in body)
    assert sum(t.startswith("HMMA") for t in body) == sum(t.startswith("HMMA") for t in gemv_sass.loop_body(plain))
    wait = next(i for i, t in enumerate(code["pdl"]) if t.startswith("ACQBULK"))
    assert any(t.startswith("LDG") for t in code["pdl"][:wait])  # weights requested before the wait


def test_a_compiled_caller_keeps_triton_layers_in_its_graph(monkeypatch):
    """Traced by torch.compile after its kernel state is built, a `triton` layer is the opaque operator
    bitalloc::quant_matmul: no graph break (fullgraph), and the same output as the eager call.  No GPU here,
    so the operator computes through a stand-in for the Triton launch."""
    from torch import nn

    from bitalloc.kernels import triton_backend as tb

    reference, layer = make_layer("rtn:int4:g64:asym", "reference", outliers=1)
    layer.backend, layer.kernel = "triton", "triton"
    layer.kernel_state = tb.TritonBackend().build(layer)
    codes_only = layer.quantized_weight()
    codes_only.outlier_idx = None  # what the kernel multiplies by; the backend adds the outlier correction
    dense = codes_only.dequantize_codes()
    calls = []

    def stand_in(x, qweight, scales, zeros, bits, group_size, in_features, real_zeros, gated=False):
        calls.append(gated)
        out = x @ dense.to(x.dtype).T
        return gate_rows(out) if gated else out

    monkeypatch.setattr(tb, "quant_matmul", stand_in)
    model = nn.Sequential(nn.LayerNorm(IN_FEATURES), layer, nn.ReLU()).requires_grad_(False)
    x = inputs(5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert relative_error(compiled(x), nn.Sequential(model[0], reference, model[2])(x)) < 1e-5
    assert calls  # the operator ran, inside the compiled graph

    # a gated layer (`bitalloc.fuse`): the operator returns silu(gate) * up, half as many columns
    from bitalloc.fuse import GatedLinear

    _, gated = make_layer("rtn:int4:g64:asym", "reference", bias=False)
    gated.backend, gated.kernel = "triton", "triton"
    gated.kernel_state = tb.TritonBackend().build(gated)
    dense = gated.dequantize_codes()
    calls.clear()
    module = GatedLinear(gated).requires_grad_(False)
    out = torch.compile(module, fullgraph=True, backend="aot_eager")(x)
    assert out.shape == (5, OUT_FEATURES // 2) and calls and all(calls)  # gated by the operator itself
    assert relative_error(out, gate_rows(x @ dense.T)) < 1e-5


def test_gemv_launch_choices_that_cannot_compute_a_layer_say_why():
    """The tuner never offers them, and the configuration sweep skips them with the reason (a three-bit
    unit is 32 codes, so 8 units per lane straddle groups of 128)."""
    from bitalloc.kernels import triton_backend as tb

    assert "straddle groups of 128" in tb.unfit(tb.MMA, (8, 1, 4, 1), 3, 128, 4096)
    assert tb.unfit(tb.MMA, (8, 1, 4, 1), 4, 128, 4096) is None
    for reads_x in (tb.X_RAW, tb.X_RAW_AHEAD):
        assert "even number of inputs" in tb.unfit(tb.MMA, (4, 1, 4, reads_x), 4, 128, 4095)
    assert "multiple of 32" in tb.unfit(tb.GEMV, tb.GEMV_CONFIGS[0], 4, 100, 4096)
    for bits in (2, 3, 4, 8):
        for group in (32, 64, 100, 128):
            chosen = tb.candidates(1, group, bits, torch.float16, 4095)
            assert all(tb.unfit(kind, c, bits, group, 4095) is None for kind, c in chosen)


def test_real_zero_points_take_the_dequantizing_step_when_the_gemv_reads_x_itself(monkeypatch):
    """The tensor-core GEMV reading x itself (in the step or ahead) MMAs -(M + z) in float16: exact for
    integer zero points (RTN), not for HQQ's real ones, whose layers are built to launch its dequantizing
    step instead (and are tuned under their own key).  The kernel is stubbed: only its launch parameters
    are checked here."""
    from bitalloc.kernels import triton_backend as tb
    from bitalloc.kernels import triton_mma as tm

    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((kwargs["X_LOAD"], kwargs["DEQUANTIZE"]))

    monkeypatch.setattr(tm, "gemv_mma", Recorder())
    for option, real in (("rtn:int4:g64:asym", False), ("hqq:int4:g64:asym", True), ("rtn:int4:g64:sym", False)):
        _, layer = make_layer(option, "reference")
        state = tb.TritonBackend().build(layer)
        assert state["real_zeros"] is real, option
        x = torch.randn(1, IN_FEATURES, dtype=torch.float16)
        for x_load, dequantize in ((tb.X_RAW, 0), (tb.X_RAW, 1), (tb.X_RAW_AHEAD, 0)):
            tb._launch(tb.MMA, (4, 1, 4, x_load, 0, dequantize), x, layer.qweight, layer.scales, layer.zeros, 4,
                       64, IN_FEATURES, state["real_zeros"])
        assert launched[-3:] == [(tb.X_RAW, real), (tb.X_RAW, True), (tb.X_RAW_AHEAD, real)], (option, launched)
    assert tb.zero_points(None) == "none"
