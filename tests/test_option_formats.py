import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.quant import formats, parse, quantize
from bitalloc.quant.option import FP16, Option


@pytest.mark.parametrize("text", [
    "rtn:int4:g64:asym", "rtn:int3:g128:sym", "rtn:int8:pc:sym:a8", "rtn:nf4:g64", "rtn:fp4:g32",
    "rtn:fp8e4m3:pc", "rtn:fp8e5m2:g128", "rtn:int2:g64:asym:clip=1", "fp16",
    "gptq:int3:g32:asym:act_order=0:static_groups=1",
])
def test_option_string_round_trips(text):
    option = parse(text)
    assert str(option) == text
    assert parse(str(option)) == option


@pytest.mark.parametrize("text", ["rtn:int9:g64", "rtn:int4:g0", "rtn:int4", "RTN:int4:g64", "rtn:int4:g64:a5",
                                  "rtn:int4:g64:x=1:x=2", "rtn:fp5:g64", 7, "rtn:int4:g64:wat",
                                  "rtn:int4:g64:asym:afp8:a4", "rtn:int4:g64:sym:asym"])
def test_bad_options_are_rejected_with_a_message(text):
    with pytest.raises(BitallocError, match="option"):
        parse(text)


def test_unknown_method_is_named():
    with pytest.raises(BitallocError, match="unknown quantization method 'nope'"):
        quantize(torch.randn(4, 64), parse("nope:int4:g64:asym"))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_values_already_on_the_grid_are_reproduced_exactly(bits, sym):
    torch.manual_seed(bits)
    option = Option("rtn", "int", bits, 32, sym)
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (8, 96))
    codes[:, ::32] = 0  # every group spans the full code range, so min/max recover the grid
    codes[:, 1::32] = maxq
    scales = torch.rand(8, 3) * 0.1 + 0.01
    scales = scales.half().float()
    zero = torch.full((8, 3), 2 ** (bits - 1)) if sym else torch.randint(0, maxq + 1, (8, 3)).float()
    if sym:  # restricted symmetric range: codes 1..maxq, symmetric about the zero point
        codes = codes.clamp_min(1)
        codes[:, ::32] = 1
    w = (codes.float() - zero.repeat_interleave(32, 1)) * scales.repeat_interleave(32, 1)
    q = quantize(w, option)
    assert torch.allclose(q.dequantize(), w, atol=1e-6 * w.abs().max().item()), "grid values must survive"


def test_ragged_last_group_uses_only_its_own_columns():
    w = torch.randn(4, 100)
    w[:, 64:] *= 0.01  # a small last group (36 columns)
    q = quantize(w, parse("rtn:int4:g64:asym"))
    assert q.scales.shape == (4, 2)
    last = w[:, 64:]
    assert torch.allclose(q.scales[:, 1], ((last.amax(1) - last.amin(1)) / 15).half().float())
    err = (q.dequantize() - w)[:, 64:].abs().max()
    assert err <= q.scales[:, 1].max() / 2 + 1e-7


def test_error_falls_as_bits_rise():
    torch.manual_seed(0)
    w = torch.randn(64, 576)
    errors = [float((quantize(w, Option("rtn", "int", b, 64)).dequantize() - w).pow(2).mean()) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < errors[0] / 1000


@pytest.mark.parametrize("fmt", ["fp4", "nf4", "fp8e4m3", "fp8e5m2"])
def test_codebook_values_are_exact_and_error_bounded(fmt):
    table = formats.codebook(fmt)
    finite = table[~torch.isnan(table)]
    assert finite.abs().max() == 1.0 and (finite == 0).any()
    torch.manual_seed(1)
    # a row holding codebook values (times 3) with its absmax present comes back exactly
    w = (finite[torch.randint(0, finite.numel(), (4, 64))] * 3.0)
    w[:, 0] = 3.0
    q = quantize(w, parse(f"rtn:{fmt}:g64"))
    assert torch.equal(q.dequantize(), w)
    noisy = torch.randn(16, 128)
    rel = (quantize(noisy, parse(f"rtn:{fmt}:g64")).dequantize() - noisy).pow(2).mean() / noisy.pow(2).mean()
    assert rel < {"fp4": 0.02, "nf4": 0.02, "fp8e4m3": 0.002, "fp8e5m2": 0.005}[fmt]


def test_nf4_has_sixteen_levels_from_minus_one_to_one():
    table = formats.codebook("nf4")
    assert table.numel() == 16 and table.min() == -1 and table.max() == 1 and (table == 0).sum() == 1


def test_zero_range_groups_keep_their_value():
    w = torch.zeros(2, 64)
    w[1] = 0.5
    for option in ("rtn:int4:g64:asym", "rtn:int4:g64:sym", "rtn:nf4:g64"):
        q = quantize(w, parse(option))
        assert torch.isfinite(q.scales).all()
        assert torch.allclose(q.dequantize(), w, atol=5e-4)  # up to the float16 rounding of the scale


def test_nan_weight_is_reported_with_the_layer_name():
    w = torch.randn(4, 64)
    w[2, 5] = float("nan")
    with pytest.raises(BitallocError, match=r"layer blocks\.3\.mlp.*NaN"):
        quantize(w, parse("rtn:int4:g64:asym"), layer="blocks.3.mlp")


def test_scale_overflow_in_float16_is_an_error():
    w = torch.full((1, 64), 1e6)
    w[0, 0] = -1e6
    with pytest.raises(BitallocError, match="float16"):
        quantize(w, parse("rtn:int2:g64:asym"))


def test_quantization_is_deterministic():
    w = torch.randn(32, 200)
    a, b = quantize(w, parse("rtn:int3:g64:asym:clip=1")), quantize(w, parse("rtn:int3:g64:asym:clip=1"))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


def test_clipping_search_never_increases_weight_error():
    torch.manual_seed(3)
    w = torch.randn(32, 256)
    w[:, 7] *= 8  # outliers make clipping worthwhile
    plain = (quantize(w, parse("rtn:int3:g64:asym")).dequantize() - w).pow(2).sum()
    clipped = (quantize(w, parse("rtn:int3:g64:asym:clip=1")).dequantize() - w).pow(2).sum()
    assert clipped <= plain


def test_fp16_option_is_unquantized():
    assert not FP16.quantized and str(FP16) == "fp16"


def test_output_weighted_clip_search_needs_calibration_and_weight_mse_ignores_it():
    from bitalloc.quant import LayerCalib
    from bitalloc.quant.registry import needs_calibration
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    x = torch.randn(256, 64) * torch.linspace(0.1, 10, 64)
    calib = LayerCalib(64)
    calib.add(x)
    weight_mse, output = parse("rtn:int3:g32:asym:clip=1"), parse("rtn:int3:g32:asym:clip=2")
    assert not needs_calibration(weight_mse) and needs_calibration(output)
    with pytest.raises(BitallocError, match="needs calibration"):
        quantize(w, output, layer="L")
    plain = quantize(w, weight_mse).dequantize()
    assert torch.equal(plain, quantize(w, weight_mse, calib).dequantize())  # same result wherever it runs
    out_error = lambda q: float((x @ (q - w).T).pow(2).sum())
    assert out_error(quantize(w, output, calib).dequantize()) <= out_error(plain)


@pytest.mark.parametrize("text, message", [
    ("rtn:int4:g32:asym:foo=1", "has no parameter 'foo'"),
    ("rtn:int4:g32:asym:outliers=-5", "outliers must be at least 0"),
    ("gptq:int4:g32:asym:damp=-1", "damp must be above 0"),
    ("gptq:int4:g32:asym:damp=nan", "damp must be above 0"),
    ("rtn:int4:g32:asym:clip=3", "clip must be 0, 1 or 2"),
    ("hqq:int4:g64:asym:iters=0", "iters must be at least 1"),
    ("smoothquant:int8:pc:sym:a8:alpha=2", "alpha must be in"),
])
def test_each_method_checks_the_parameters_it_reads(text, message):
    """Before any work: a misspelt parameter was silently ignored, an impossible one failed deep inside."""
    from bitalloc.quant import check_option

    with pytest.raises(BitallocError, match=message):
        check_option(parse(text))
