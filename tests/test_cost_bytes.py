"""Predicted bytes equal what packed models store; whole-model bytes, KV cache and BOPs."""
import json
import math
import random
from pathlib import Path

import pytest
import torch

from bitalloc import apply
from bitalloc.arch import architecture
from bitalloc.cost import (assignment_bops, assignment_bytes, kv_cache_bytes, layer_bops, layer_shapes,
                           layer_storage, model_bytes, parameter_count)
from bitalloc.errors import BitallocError
from bitalloc.kernels.quant_linear import QuantLinear
from bitalloc.macs import Workload, count_macs
from bitalloc.models import from_module, linear_layers
from bitalloc.quant import parse, quantize
from bitalloc.quant.option import FP16
from bitalloc.quantize_model import quantize_model, stored_bytes
from conftest import run_cli, tiny_gpt2, tiny_llama, tiny_opt

# mixed bits, formats and group sizes; tiny layers have 64, 96 and 160 inputs, so g48/g64/g100/g128 leave
# ragged last groups and pc / g128 > in give one group per row
PLANS = {
    "ints": ["rtn:int2:g64:asym", "rtn:int3:g128:sym", "rtn:int4:g32:asym", "rtn:int8:pc:sym:a8"],
    "formats": ["rtn:nf4:g64", "rtn:fp8e4m3:g128", "rtn:fp4:g32", "fp16", "rtn:int5:g48:asym",
                "rtn:int6:g100:sym", "rtn:int7:pc:asym"],
    "random": [f"rtn:int{b}:g{g}:{s}" for b in (2, 3, 4, 6) for g in (32, 64, 100) for s in ("sym", "asym")],
}


def plan_assignment(model, name: str) -> dict:
    names = list(linear_layers(model))
    options = [parse(o) for o in PLANS[name]]
    if name == "random":
        rng = random.Random(0)
        return {n: rng.choice(options) for n in names}
    return {n: options[i % len(options)] for i, n in enumerate(names)}


@pytest.mark.parametrize("make, plan", [(tiny_llama, "ints"), (tiny_opt, "formats"), (tiny_gpt2, "random"),
                                        (tiny_llama, "formats"), (tiny_gpt2, "ints")])
def test_predicted_bytes_equal_the_stored_tensors(make, plan):
    model = make()
    shapes = {s.name: s for s in layer_shapes(model)}
    assignment = plan_assignment(model, plan)
    assert len({o.bits for o in assignment.values()}) >= 3 and len({o.group_size for o in assignment.values()}) >= 3
    quantize_model(from_module(model), assignment, progress=False)
    for name in shapes:
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        spec = layer_storage(shapes[name], assignment[name])
        assert {k: (tuple(b.shape), b.dtype) for k, b in layer.named_buffers()} == spec, name
    assert stored_bytes(model) == assignment_bytes(list(shapes.values()), assignment)


def _saved_linear_bytes(directory: Path, names) -> int:
    from safetensors import safe_open

    total = 0
    for path in directory.rglob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            for key in handle.keys():
                if any(key.startswith(name + ".") for name in names):
                    tensor = handle.get_tensor(key)
                    total += tensor.numel() * tensor.element_size()
    return total


@pytest.mark.parametrize("plan", list(PLANS))
def test_apply_reports_and_saves_the_predicted_bytes(plan, cli_env, tiny_dir, capsys):
    """apply's measured bytes; once apply can --save (issue 8), the saved linears' tensors too."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    shapes = layer_shapes(model)
    assignment = plan_assignment(model, plan)
    plan_path = cli_env / "plan.json"
    plan_path.write_text(json.dumps({"format": "bitalloc-plan", "version": 1, "model": str(tiny_dir),
                                     "layers": {k: str(v) for k, v in assignment.items()}}))
    can_save = "--save" in apply.build_parser()._option_string_actions
    argv = ["--plan", str(plan_path), "--no-eval", "--quiet", "--json", "applied.json"]
    code, _, err = run_cli(apply.main, argv + (["--save", "saved"] if can_save else []), capsys)
    assert code == 0, err
    predicted = assignment_bytes(shapes, assignment)
    assert json.loads((cli_env / "applied.json").read_text())["bytes"] == predicted
    if can_save:
        assert _saved_linear_bytes(cli_env / "saved", [s.name for s in shapes]) == predicted


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt, tiny_gpt2])
def test_float16_model_bytes_are_two_per_parameter(make):
    model = make()
    sizes = model_bytes(model, {s.name: FP16 for s in layer_shapes(model)})
    assert sizes.total == 2 * parameter_count(model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (sizes.head == 0) == tied


def test_embeddings_and_head_have_options_of_their_own():
    model = tiny_llama()  # untied head
    fp16 = {s.name: FP16 for s in layer_shapes(model)}
    int4, int8 = parse("rtn:int4:g64:asym"), parse("rtn:int8:g32:sym")
    sizes = model_bytes(model, fp16, embeddings=int4, head=int8)
    stored = lambda weight, option: stored_bytes(QuantLinear.from_weight(quantize(weight.detach(), option), None))
    assert sizes.embeddings == stored(model.get_input_embeddings().weight, int4)
    assert sizes.head == stored(model.get_output_embeddings().weight, int8)
    gpt2 = tiny_gpt2()  # head tied to the embeddings: stored once, under the embeddings' option
    fp16 = {s.name: FP16 for s in layer_shapes(gpt2)}
    tied = model_bytes(gpt2, fp16, embeddings=int4)
    assert tied.head == 0 and tied.head_tied and tied.embeddings == stored(gpt2.get_input_embeddings().weight, int4)
    with pytest.raises(BitallocError, match="tied"):
        model_bytes(gpt2, fp16, embeddings=int4, head=int8)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt, tiny_gpt2])
def test_kv_cache_bytes_equal_the_real_cache(make):
    model = make()
    with torch.no_grad():
        out = model(input_ids=torch.zeros(3, 21, dtype=torch.long), use_cache=True, return_dict=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_cache_bytes(architecture(model.config), 21, batch=3, dtype=torch.float32) == real


def test_bops_are_weight_bits_times_activation_bits_per_mac():
    shape = layer_shapes(tiny_llama())[0]
    assert layer_bops(shape, FP16) == 256 * shape.numel
    assert layer_bops(shape, parse("rtn:int4:g64:asym")) == 64 * shape.numel
    assert layer_bops(shape, parse("rtn:int8:pc:sym:a8")) == 64 * shape.numel
    assert layer_bops(shape, parse("rtn:int4:g64:sym:a4")) == 16 * shape.numel
    with_outliers = parse("rtn:int4:g64:sym:a8:outliers=8")  # 8 input columns stay at 16 x 16 bits
    assert layer_bops(shape, with_outliers) == shape.out_features * (32 * (shape.in_features - 8) + 256 * 8)


def test_bops_of_a_plan_scale_the_macs_fvcore_counts():
    model = tiny_llama()
    shapes = layer_shapes(model)
    workload = Workload(2, 16)
    linear_macs = sum(count_macs(model, workload).block_linears)
    fp16 = {s.name: FP16 for s in shapes}
    assert assignment_bops(shapes, fp16, workload.tokens) == 256 * linear_macs
    int4 = {s.name: parse("rtn:int4:g64:asym") for s in shapes}
    assert assignment_bops(shapes, int4, workload.tokens) == 64 * linear_macs
    assert math.isclose(assignment_bops(shapes, int4) * workload.tokens, assignment_bops(shapes, int4, 32))
