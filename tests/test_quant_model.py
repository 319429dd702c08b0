"""Whole-model quantization: true-sequential calibration, modes, restore."""
import pytest
import torch

import bitalloc.quantize_model as qm
from bitalloc.blocks import capture_inputs, collect_calibration
from bitalloc.errors import BitallocError
from bitalloc.models import find_blocks, from_module, linear_layers
from bitalloc.quant import parse
from conftest import tiny_llama


@pytest.fixture
def setup():
    loaded = from_module(tiny_llama(seed=5))
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    return loaded, ids


def logits(loaded, ids):
    with torch.no_grad():
        return loaded.model(input_ids=ids, use_cache=False).logits


def uniform(loaded, text):
    return {name: parse(text) for name in linear_layers(loaded.model)}


def test_layers_are_grouped_in_call_order_by_shared_input(setup):
    loaded, ids = setup
    batch = capture_inputs(loaded.model, ids, 2)[0]
    groups = qm.execution_groups(find_blocks(loaded.model)[1][0], batch)
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_later_groups_calibrate_on_the_partly_quantized_block(setup, monkeypatch):
    loaded, ids = setup
    seen = {}
    real = qm.quantize

    def spy(weight, option, calib, layer):
        seen[layer] = calib.hessian().clone()
        return real(weight, option, calib, layer=layer)

    block = find_blocks(loaded.model)[1][0]
    unquantized = collect_calibration(block, capture_inputs(loaded.model, ids, 2), ["self_attn.q_proj",
                                                                                   "self_attn.o_proj"])
    monkeypatch.setattr(qm, "quantize", spy)
    qm.quantize_model(loaded, uniform(loaded, "gptq:int2:g32:asym"), ids, batch_size=2, progress=False)
    first = "model.layers.0."
    assert torch.allclose(seen[first + "self_attn.q_proj"], unquantized["self_attn.q_proj"].hessian(), atol=1e-5)
    assert not torch.allclose(seen[first + "self_attn.o_proj"], unquantized["self_attn.o_proj"].hessian(), atol=1e-5)
    assert seen[first + "self_attn.q_proj"] is not None and len(seen) == 14


def test_gptq_model_is_closer_to_the_unquantized_one_than_rtn(setup):
    loaded, ids = setup
    reference = logits(loaded, ids)
    errors = {}
    for text in ("rtn:int3:g32:asym", "gptq:int3:g32:asym"):
        originals = qm.quantize_model(loaded, uniform(loaded, text), ids, batch_size=2, progress=False)
        errors[text] = float((logits(loaded, ids) - reference).pow(2).mean())
        qm.restore(loaded.model, originals)
    assert errors["gptq:int3:g32:asym"] < errors["rtn:int3:g32:asym"]
    assert torch.equal(logits(loaded, ids), reference)  # restore puts the very same layers back


def test_fake_mode_computes_what_real_mode_computes(setup):
    loaded, ids = setup
    assignment = uniform(loaded, "awq:int4:g32:asym")
    originals = qm.quantize_model(loaded, assignment, ids, batch_size=2, progress=False)
    real = logits(loaded, ids)
    qm.restore(loaded.model, originals)
    originals = qm.quantize_model(loaded, assignment, ids, batch_size=2, progress=False, mode="fake")
    fake = logits(loaded, ids)
    qm.restore(loaded.model, originals)
    assert torch.allclose(real, fake, atol=1e-3 * real.abs().max().item())
    with pytest.raises(BitallocError, match="weights only"):
        qm.quantize_model(loaded, uniform(loaded, "rtn:int8:pc:sym:a8"), ids, progress=False, mode="fake")


def test_scale_mode_is_the_same_function_with_scaled_weights(setup):
    loaded, ids = setup
    reference = logits(loaded, ids)
    originals = qm.quantize_model(loaded, uniform(loaded, "smoothquant:int8:pc:sym"), ids, batch_size=2,
                                  progress=False, mode="scale")
    layer = loaded.model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer, qm.InputScaled) and not torch.equal(layer.act_scale, torch.ones_like(layer.act_scale))
    assert torch.allclose(logits(loaded, ids), reference, atol=1e-4 * reference.abs().max().item())
    qm.restore(loaded.model, originals)


def test_outlier_options_collect_calibration_for_uncalibrated_methods(setup):
    loaded, ids = setup
    assignment = uniform(loaded, "rtn:int4:g32:asym:a4:outliers=4")
    assert qm.needs_calibration(assignment)
    qm.quantize_model(loaded, assignment, ids, batch_size=2, progress=False)
    layer = loaded.model.get_submodule("model.layers.1.self_attn.q_proj")
    assert layer.outlier_idx.shape == (4,) and layer.outlier_weight.shape == (96, 4)
