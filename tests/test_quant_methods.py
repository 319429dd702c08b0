"""The quantization methods: each beats (or ties) the baseline it refines, on tiny tensors, in seconds."""
import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.quant import LayerCalib, parse, quantize
from bitalloc.quant.activation import fake_quantize_tokens
from bitalloc.quant.calib import output_error
from bitalloc.quant.registry import outlier_channels

METHODS = ["rtn", "gptq", "awq", "smoothquant", "lwc", "hqq"]


@pytest.fixture(scope="module")
def layer():
    """Correlated inputs with a few outlier channels, as LLM activations have, and a weight matrix."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(96, 96, generator=g) / 96**0.5
    x = torch.randn(2048, 96, generator=g) @ mix + 0.1 * torch.randn(2048, 96, generator=g)
    x[:, [3, 40, 77]] *= 25
    calib = LayerCalib(96)
    for part in x.split(512):
        calib.add(part)
    w = torch.randn(64, 96, generator=g) * 0.05
    return x, w, calib


def rel_output_error(x, w, qw, act_bits=16):
    x_in = x if act_bits >= 16 else None
    y = x @ w.T
    if x_in is None:  # the layer quantizes x / s per token, outlier channels excepted
        s = qw.act_scale if qw.act_scale is not None else torch.ones(x.shape[1])
        scaled = x / s
        kept = torch.zeros(x.shape[1], dtype=torch.bool)
        if qw.outlier_idx is not None:
            kept[qw.outlier_idx] = True
        quantized = fake_quantize_tokens(scaled.masked_fill(kept, 0), act_bits).where(~kept, scaled)
        return float(((quantized @ (qw.dequantize() * s).T - y) ** 2).mean() / (y**2).mean())
    return float(((x @ qw.dequantize().T - y) ** 2).mean() / (y**2).mean())


def test_layer_calib_hessian_matches_the_activations(layer):
    x, w, calib = layer
    assert torch.allclose(calib.hessian(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-4)
    dw = torch.randn_like(w) * 1e-2
    assert torch.allclose(output_error(dw, calib.hessian()).sum() / 2, ((x @ dw.T) ** 2).sum(1).mean(), rtol=1e-3)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_the_layer_output(layer, bits):
    x, w, calib = layer
    rtn = rel_output_error(x, w, quantize(w, parse(f"rtn:int{bits}:g32:asym")))
    for params in ("", ":act_order=0", ":act_order=0:static_groups=1"):
        gptq = rel_output_error(x, w, quantize(w, parse(f"gptq:int{bits}:g32:asym{params}"), calib))
        assert gptq < 0.85 * rtn, params


@pytest.mark.parametrize("option", ["gptq:int4:g32:asym", "gptq:int4:g32:asym:act_order=0", "gptq:int3:pc:sym"])
def test_gptq_reproduces_weights_already_on_the_grid(layer, option):
    _, _, calib = layer
    opt = parse(option)
    group = opt.group_size or 96
    g = torch.Generator().manual_seed(0)
    maxq, low = 2**opt.bits - 1, 1 if opt.sym else 0  # symmetric grids use codes 1..maxq
    codes = torch.randint(low, maxq + 1, (16, 96), generator=g)
    codes[:, ::group], codes[:, 1::group] = low, maxq  # every group spans its whole grid
    zeros = torch.full((16, 96 // group), 2 ** (opt.bits - 1)) if opt.sym else torch.randint(0, maxq + 1, (16, 96 // group), generator=g)
    scales = (torch.rand(16, 96 // group, generator=g) * 0.1 + 0.01).half().float()
    grid = (codes - zeros.repeat_interleave(group, 1)) * scales.repeat_interleave(group, 1)
    assert torch.equal(quantize(grid, opt, calib).dequantize(), grid)


def test_gptq_handles_ragged_groups_and_dead_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 100, generator=g)
    x[:, 5] = 0  # an input that never fires
    calib = LayerCalib(100)
    calib.add(x)
    w = torch.randn(8, 100, generator=g)
    for params in ("", ":act_order=0"):
        qw = quantize(w, parse(f"gptq:int4:g64:asym{params}"), calib)
        assert qw.scales.shape == (8, 2) and qw.codes.shape == (8, 100)
        deq = qw.dequantize()
        assert deq[:, 5].abs().max() <= qw.scales.max()  # the dead column is pinned near 0
        assert rel_output_error(x, w, qw) < rel_output_error(x, w, quantize(w, parse("rtn:int4:g64:asym")))


def test_awq_and_lwc_never_lose_to_the_rtn_they_start_from(layer):
    x, w, calib = layer
    h = calib.hessian()

    def objective(option):
        return float(output_error(quantize(w, parse(option), calib).dequantize() - w, h).sum())

    assert objective("awq:int4:g32:asym") < objective("rtn:int4:g32:asym")
    assert objective("awq:int3:g32:sym:clip=0") <= objective("rtn:int3:g32:sym") * 1.0001
    assert objective("lwc:int3:g32:asym") <= objective("rtn:int3:g32:asym:clip=1") * 1.0001
    assert objective("lwc:int3:g32:asym") < objective("rtn:int3:g32:asym")
    assert objective("lwc:nf4:g32") < objective("rtn:nf4:g32")
    for bits in (3, 8):  # at 8 bits nothing beats the unclipped grid, which the sigmoid alone never reaches
        assert objective(f"lwc:int{bits}:g32:asym") <= objective(f"rtn:int{bits}:g32:asym:clip=2") * 1.0001


def test_hqq_lowers_the_weight_error_without_calibration():
    torch.manual_seed(2)
    w = torch.randn(64, 256) * 0.02
    w[:, ::17] *= 6  # heavy tails, where min/max zeros are poor
    rtn = (quantize(w, parse("rtn:int3:g64:asym")).dequantize() - w).abs().pow(0.7).mean()
    hqq = quantize(w, parse("hqq:int3:g64:asym"))
    assert (hqq.dequantize() - w).abs().pow(0.7).mean() < rtn
    assert not torch.equal(hqq.zeros, hqq.zeros.round())  # real-valued zeros, stored as float16
    assert torch.equal(hqq.zeros, hqq.zeros.half().float())
    with pytest.raises(BitallocError, match="asymmetric"):
        quantize(w, parse("hqq:int4:g64:sym"))


@pytest.mark.parametrize("method", ["rtn:int3:{g}:asym:clip=1", "hqq:int3:{g}:asym"])
def test_a_ragged_last_group_is_fitted_on_its_real_columns_only(method):
    """136 inputs at g128: the last group has 8 real columns and 120 of padding; its scales and zeros are
    those of the 8 columns quantized alone (one group of 8)."""
    torch.manual_seed(3)
    w = torch.randn(32, 136) * 0.02
    w[:, -1] *= 8  # the padding repeats this column: counted 121 times, it would decide the fit
    whole = quantize(w, parse(method.format(g="g128")))
    alone = quantize(w[:, 128:], parse(method.format(g="g128")))
    assert torch.equal(whole.scales[:, -1:], alone.scales)
    assert torch.equal(whole.zeros[:, -1:], alone.zeros)
    assert torch.equal(whole.codes[:, 128:], alone.codes)


def test_smoothquant_helps_w8a8_when_activations_have_outlier_channels(layer):
    x, w, calib = layer
    plain = rel_output_error(x, w, quantize(w, parse("rtn:int8:pc:sym:a8"), calib), act_bits=8)
    smooth_q = quantize(w, parse("smoothquant:int8:pc:sym:a8"), calib)
    assert rel_output_error(x, w, smooth_q, act_bits=8) < 0.5 * plain
    assert smooth_q.act_scale is not None and torch.equal(smooth_q.act_scale, smooth_q.act_scale.half().float())


def test_outlier_channels_are_the_largest_inputs_and_lower_the_error(layer):
    x, w, calib = layer
    assert outlier_channels(calib, None, 3).tolist() == [3, 40, 77]
    plain = rel_output_error(x, w, quantize(w, parse("rtn:int4:g32:asym:a4"), calib), act_bits=4)
    kept = quantize(w, parse("rtn:int4:g32:asym:a4:outliers=3"), calib)
    assert kept.outlier_idx.tolist() == [3, 40, 77]
    assert torch.equal(kept.outlier_weight, w[:, [3, 40, 77]].half().float())
    assert rel_output_error(x, w, kept, act_bits=4) < 0.5 * plain
    with pytest.raises(BitallocError, match="outlier selection.*calibration"):
        quantize(w, parse("rtn:int4:g32:asym:outliers=3"))


def test_gptq_outlier_channels_take_the_error_feedback_instead_of_giving_theirs(layer):
    """The float16 channels go last: GPTQ with them beats RTN with them (it did not when they were rounded
    first, their error pushed onto the rest, and only then put back)."""
    x, w, calib = layer
    h = calib.hessian()

    def objective(qw):
        return float(output_error(qw.dequantize() - w, h).sum())

    for bits in (3, 4):
        gptq = quantize(w, parse(f"gptq:int{bits}:g32:asym:outliers=3"), calib)
        assert gptq.outlier_idx.tolist() == [3, 40, 77]
        assert not torch.equal(gptq.outlier_weight, w[:, [3, 40, 77]].half().float())  # moved by the feedback
        assert objective(gptq) < objective(quantize(w, parse(f"rtn:int{bits}:g32:asym:outliers=3"), calib))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_deterministic(layer, method):
    _, w, calib = layer
    option = parse(f"{method}:int4:g32:asym")
    a, b = quantize(w, option, calib), quantize(w.clone(), option, calib)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    assert (a.zeros is None and b.zeros is None) or torch.equal(a.zeros, b.zeros)
    assert (a.act_scale is None) == (method not in ("awq", "smoothquant"))


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant", "lwc"])
def test_calibrated_methods_say_they_need_calibration(method):
    with pytest.raises(BitallocError, match=f"method '{method}' needs calibration inputs for layer L"):
        quantize(torch.randn(4, 32), parse(f"{method}:int4:g32:asym"), layer="L")
