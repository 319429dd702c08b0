"""Number formats and activation/multiplier simulation: error bounds, exact grid values, ragged groups."""
import pytest
import torch

from bitalloc.quant import formats, parse, quantize
from bitalloc.quant.activation import fake_quantize_tokens
from bitalloc.quant.approx import approx_matmul, mean_compensation, mitchell_multiply


def expand_groups(per_group: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """[out, n_groups] -> [out, in]: each group's value over its columns."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :in_features]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [False, True])
def test_integer_round_trip_error_is_at_most_half_a_step(bits, sym):
    torch.manual_seed(bits)
    w = torch.randn(16, 200)  # 200 = 3 groups of 64 + a ragged group of 8
    qw = quantize(w, parse(f"rtn:int{bits}:g64:{'sym' if sym else 'asym'}"))
    assert qw.scales.shape == (16, 4)
    step = expand_groups(qw.scales, 200, 64)
    # asym: the rounded zero point shifts the grid by up to half a step (and the float16 scale by a hair)
    bound = step * (0.5 if sym else 1.05) + 1e-6
    assert ((qw.dequantize() - w).abs() <= bound).all()


@pytest.mark.parametrize("fmt", ["fp4", "nf4", "fp8e4m3", "fp8e5m2"])
def test_codebook_round_trip_error_is_at_most_half_the_widest_gap(fmt):
    torch.manual_seed(0)
    w = torch.randn(16, 200)
    qw = quantize(w, parse(f"rtn:{fmt}:g64"))
    table = formats.codebook(fmt)
    values = table[~torch.isnan(table)].unique().sort().values
    widest = (values[1:] - values[:-1]).max()
    bound = expand_groups(qw.scales, 200, 64) * widest / 2 + 1e-6
    assert ((qw.dequantize() - w).abs() <= bound).all()


@pytest.mark.parametrize("fmt", ["fp4", "nf4", "fp8e4m3"])
def test_gptq_keeps_codebook_values_exact(fmt):
    from bitalloc.quant import LayerCalib

    calib = LayerCalib(64)
    calib.add(torch.randn(256, 64))
    table = formats.codebook(fmt)
    finite = table[~torch.isnan(table)]
    w = finite[torch.randint(0, finite.numel(), (4, 64), generator=torch.Generator().manual_seed(0))] * 2.0
    w[:, 0] = 2.0
    assert torch.equal(quantize(w, parse(f"gptq:{fmt}:g64"), calib).dequantize(), w)


def test_ragged_group_larger_than_the_row_is_one_group():
    w = torch.randn(3, 40)
    qw = quantize(w, parse("rtn:int4:g64:asym"))
    assert qw.scales.shape == (3, 1)
    assert torch.equal(qw.dequantize(), quantize(w, parse("rtn:int4:pc:asym")).dequantize())


@pytest.mark.parametrize("fmt,bits,bound", [("int", 8, 1 / 127), ("int", 4, 1 / 7), ("fp8e4m3", 8, 2**-3),
                                            ("fp8e5m2", 8, 2**-2)])
def test_per_token_activation_error_is_bounded_by_each_tokens_range(fmt, bits, bound):
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64) * torch.logspace(-2, 2, 32)[None, :, None]  # tokens of very different sizes
    y = fake_quantize_tokens(x, bits, fmt)
    absmax = x.abs().amax(-1, keepdim=True)
    if fmt == "int":  # half a step of max|x| / qmax
        assert ((y - x).abs() <= absmax * bound / 2 + 1e-7).all()
    else:  # half an ulp relative to |x| (2^-(mantissa bits + 1)) in the normal range
        finfo = torch.finfo({"fp8e4m3": torch.float8_e4m3fn, "fp8e5m2": torch.float8_e5m2}[fmt])
        normal = x.abs() >= absmax * finfo.smallest_normal / finfo.max
        assert (((y - x).abs() <= x.abs() * bound / 2 + 1e-7) | ~normal).all()
    assert torch.equal(fake_quantize_tokens(x, 16), x)


def test_fp8_activations_option_round_trips_and_reaches_the_layer():
    option = parse("rtn:int4:g64:asym:afp8")
    assert option.act_bits == 8 and option.act_fmt == "fp8e4m3" and str(option) == "rtn:int4:g64:asym:afp8"
    assert parse("rtn:int8:pc:sym:afp8e5m2").act_fmt == "fp8e5m2"
    assert str(parse("rtn:int8:pc:sym:afp8e5m2")) == "rtn:int8:pc:sym:afp8e5m2"


def test_mitchell_multiplier_is_exact_on_powers_of_two_and_bounded_elsewhere():
    a = torch.tensor([0.5, 2.0, -4.0, 0.0, 8.0])
    b = torch.tensor([8.0, 0.25, 2.0, 3.0, -0.125])
    assert torch.equal(mitchell_multiply(a, b), a * b)
    torch.manual_seed(0)
    x, y = torch.randn(20000), torch.randn(20000)
    rel = (mitchell_multiply(x, y) - x * y) / (x * y)
    assert rel.max() <= 1e-6 and rel.min() >= -1 / 9 - 1e-6  # never above, at most 11.1 % below
    compensated = (mitchell_multiply(x, y, mean_compensation()) - x * y) / (x * y)
    assert abs(float(compensated.mean())) < 0.005 < abs(float(rel.mean()))


def test_approximate_matmul_matches_the_elementwise_products():
    torch.manual_seed(1)
    x, w = torch.randn(2, 3, 20), torch.randn(5, 20)
    expected = mitchell_multiply(x[..., None, :], w, mean_compensation()).sum(-1)
    assert torch.allclose(approx_matmul(x, w, chunk=7), expected, atol=1e-5)
    assert (approx_matmul(x, w) - x @ w.T).abs().mean() < 0.1 * (x @ w.T).abs().mean()
