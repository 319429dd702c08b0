"""Runs that must stop: NaN/Inf weights and activations, and scales float16 cannot hold, are reported
with the name of the layer at fault, through the profiler, search, apply and evaluation."""
import json

import pytest
import torch

from bitalloc import apply, pipeline
from bitalloc.errors import BitallocError
from bitalloc.evaluate import evaluate
from bitalloc.models import from_module
from bitalloc.profile import profile
from bitalloc.quant import QUANTIZERS, parse, quantize
from bitalloc.quant.registry import Quantizer
from conftest import all_files, run_cli, tiny_llama

NAN_LAYER = "model.layers.1.mlp.down_proj"
OPTIONS = [parse("rtn:int4:g32:asym"), parse("rtn:int8:g32:asym")]
IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def with_nan(vocab_size=320):
    model = tiny_llama(vocab_size=vocab_size)
    with torch.no_grad():
        model.get_submodule(NAN_LAYER).weight[3, 7] = float("nan")
    return model


def overflowing():
    """Finite weights whose activations overflow float32 in block 0's MLP (gate * up > 3.4e38)."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.fill_(1e20)
    return model


@pytest.fixture
def nan_dir(tmp_path, tokenizer):
    path = tmp_path / "nan-llama"
    with_nan(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_profiler_names_the_nan_weight():
    with pytest.raises(BitallocError, match=f"weight {NAN_LAYER}.weight has 1 NaN/Inf value.*at \\(3, 7\\)"):
        profile(from_module(with_nan()), IDS, OPTIONS, batch_size=2, progress=False)


def expect_one_line(code, err, words):
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and words in lines[-1], err
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in err


def test_search_names_the_nan_weight_and_writes_nothing(nan_dir, cli_env, capsys):
    before = all_files(cli_env)
    argv = ["--model", str(nan_dir), "--space", "rtn:int4:g32:asym,rtn:int8:g32:asym", "--budget", "6",
            "--nsamples", "2", "--calib-seqlen", "16", "--seqlen", "16", "--eval-windows", "2", "--out", "run",
            "--quiet"]
    expect_one_line(*run_cli(pipeline.main, argv, capsys)[::2], f"weight {NAN_LAYER}.weight has 1 NaN/Inf")
    assert all_files(cli_env) == before


def test_apply_names_the_nan_weight_and_writes_nothing(nan_dir, cli_env, capsys):
    plan = cli_env / "plan.json"
    plan.write_text(json.dumps({"format": "bitalloc-plan", "version": 1, "model": str(nan_dir), "layers": {},
                                "default": "rtn:int4:g32:asym"}))
    before = all_files(cli_env)
    code, _, err = run_cli(apply.main, ["--plan", str(plan), "--quiet", "--json", "out.json"], capsys)
    expect_one_line(code, err, f"weight {NAN_LAYER}.weight has 1 NaN/Inf")
    assert all_files(cli_env) == before


def test_overflowing_activations_are_traced_to_their_layer():
    where = "first in the output of model.layers.0.mlp.down_proj"
    with pytest.raises(BitallocError, match=f"block 0 produced NaN/Inf activations, {where}"):
        profile(from_module(overflowing()), IDS, OPTIONS, batch_size=2, progress=False)
    with pytest.raises(BitallocError, match=f"evaluation batch 0 produced NaN/Inf activations, {where}"):
        evaluate(overflowing(), IDS, batch_size=2, progress=False)


def test_scales_beyond_float16_are_an_error_naming_the_layer():
    weight = torch.randn(8, 64) * 1e6  # |w| / 7 > 65504
    with pytest.raises(BitallocError, match="layer model.layers.0.mlp.up_proj: scales overflow float16"):
        quantize(weight, parse("rtn:int4:g32:sym"), layer="model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("option", ["rtn:int4:g32:asym", "rtn:int3:g32:sym", "rtn:nf4:g32", "rtn:fp8e4m3:g32",
                                    "rtn:int2:g32:asym:clip=1"])
def test_zero_and_tiny_range_groups_stay_finite_and_exact(option):
    weight = torch.randn(4, 64) * 0.02
    weight[0, :32] = 0.0  # all zero
    weight[1, :32] = 0.5  # constant
    weight[2, :32] = torch.arange(32) * 1e-10  # a range float16 scales cannot resolve (scale would round to 0)
    qw = quantize(weight, parse(option), layer="tiny")
    restored = qw.dequantize()
    assert torch.isfinite(restored).all() and (qw.scales > 0).all()
    assert torch.equal(restored[0, :32], weight[0, :32])
    assert (restored[1, :32] - 0.5).abs().max() <= 0.5 * 2**-10  # float16 rounding of the scale only
    assert (restored[2, :32] - weight[2, :32]).abs().max() < 1e-7


def test_a_quantizer_returning_nan_scales_is_stopped(monkeypatch):
    rtn = QUANTIZERS["rtn"]

    def broken(weight, option, calib):
        qw = rtn.fn(weight, option, calib)
        qw.scales[0, 0] = float("nan")
        return qw

    monkeypatch.setitem(QUANTIZERS, "broken", Quantizer("broken", broken, "0", False, ("int",), False))
    with pytest.raises(BitallocError, match="layer model.layers.0.mlp.up_proj: quantizing with .* 1 NaN/Inf/zero scales"):
        quantize(torch.randn(4, 64), parse("broken:int4:g32:asym"), layer="model.layers.0.mlp.up_proj")
