"""Linears that read one input computed as one wider linear (bitalloc.fuse), on a tiny random Llama."""
import pytest
import torch

from bitalloc.benchmarks import pack_in_place
from bitalloc.errors import BitallocError
from bitalloc.fuse import (GatedMLP, SharedSlice, fusable, fuse_layers, fuse_packed, options_after_fusing,
                           shared_input_groups)
from bitalloc.models import linear_layers
from bitalloc.quant import parse


def tiny_llama(intermediate_size=96, hidden_act="silu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         hidden_act=hidden_act)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def groups_of(model, ids):
    return shared_input_groups(model, lambda: model(input_ids=ids))


def test_groups_are_the_linears_reading_one_input():
    model, ids = tiny_llama(), torch.randint(0, 128, (1, 8))
    names = [[n.rsplit(".", 1)[-1] for n in group] for group in groups_of(model, ids)]
    assert names == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]] * 2


def test_fused_model_computes_the_same_logits_and_each_wider_linear_once_per_input():
    model, ids = tiny_llama(), torch.randint(0, 128, (2, 8))
    expected = model(input_ids=ids).logits
    fused = fuse_layers(model, groups_of(model, ids))
    assert sorted(fused) == sorted([f"model.layers.{i}.self_attn.q_proj.shared.fused" for i in range(2)]
                                   + [f"model.layers.{i}.mlp.gated.layer" for i in range(2)])  # gate/up: GatedMLP
    calls = []
    for name in fused:
        model.get_submodule(name).register_forward_hook(lambda *_: calls.append(1))
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 4  # four groups, one wider product each
    slices = [m for m in model.modules() if isinstance(m, SharedSlice)]
    assert len(slices) == 6 and all(m.shared._input is None for m in slices)  # nothing held after a pass


@pytest.mark.parametrize("intermediate_size, hidden_act", [(100, "silu"), (96, "gelu")])
def test_gate_and_up_stay_slices_unless_the_mlp_is_silu_gated_with_rows_in_blocks_of_eight(intermediate_size,
                                                                                          hidden_act):
    model, ids = tiny_llama(intermediate_size, hidden_act), torch.randint(0, 128, (1, 8))
    expected = model(input_ids=ids).logits
    fused = fuse_layers(model, groups_of(model, ids))
    assert sorted(n.split(".")[-3] for n in fused) == ["gate_proj", "gate_proj", "q_proj", "q_proj"]
    assert not any(isinstance(m, GatedMLP) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_packed_wider_linear_equals_its_members_packed_apart():
    """Per-row quantizers: packing the stacked rows gives each member's codes; so fusing after choosing one
    option per group changes no output."""
    model, ids = tiny_llama(), torch.randint(0, 128, (1, 8))
    options = {n: parse("rtn:int4:g32:asym") for n in linear_layers(model)}
    options.update({n: parse("rtn:int3:g32:asym") for n in options if n.endswith(("k_proj", "up_proj"))})
    groups = fusable(groups_of(model, ids), options)
    assert [[n.rsplit(".", 1)[-1] for n in g] for g in groups] == [["q_proj", "v_proj"]] * 2  # k differs; up too
    apart = tiny_llama()
    pack_in_place(apart, options, "reference", progress=False)
    pack_in_place(model, options_after_fusing(options, fuse_layers(model, groups)), "reference", progress=False)
    torch.testing.assert_close(model(input_ids=ids).logits, apart(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_packed_gated_layer_equals_gate_and_up_packed_apart():
    """Gate and up rows interleaved before packing (as decode.py --fuse packs a built model): per-row
    quantizers give each row its own codes, so the gated MLP's output is unchanged."""
    model, ids = tiny_llama(), torch.randint(0, 128, (1, 8))
    options = {n: parse("rtn:int4:g32:asym") for n in linear_layers(model)}
    apart = tiny_llama()
    pack_in_place(apart, options, "reference", progress=False)
    fused = fuse_layers(model, fusable(groups_of(model, ids), options))
    pack_in_place(model, options_after_fusing(options, fused), "reference", progress=False)
    assert sum(isinstance(m, GatedMLP) for m in model.modules()) == 2
    torch.testing.assert_close(model(input_ids=ids).logits, apart(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_compiled_step_keeps_one_graph_with_fused_groups():
    """The slices hand out state that is cleared within each pass, so torch.compile traces one graph (no
    graph break with fullgraph) and does not recompile from call to call."""
    model, ids = tiny_llama(), torch.randint(0, 128, (1, 8))
    fuse_layers(model, groups_of(model, ids))
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # graphs compiled by tests that ran before count too
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    expected = model(input_ids=ids).logits
    for _ in range(3):
        out = compiled(input_ids=ids).logits
    torch.testing.assert_close(out, expected)
    assert counters["stats"]["unique_graphs"] == 1


def test_members_of_different_widths_are_refused():
    model = tiny_llama()
    with pytest.raises(BitallocError, match="one input width"):
        fuse_layers(model, [["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]])


def test_the_tied_mix_fuses_every_group_and_mixed4_only_q_with_k():
    from bitalloc.benchmarks import mix_assignment

    model, ids = tiny_llama(), torch.randint(0, 128, (1, 8))
    groups = groups_of(model, ids)
    short = lambda found: [[n.rsplit(".", 1)[-1] for n in g] for g in found]  # noqa: E731
    assert short(fusable(groups, mix_assignment(model, "mixed4-tied"))) == short(groups)
    assert short(fusable(groups, mix_assignment(model, "mixed4"))) == [["q_proj", "k_proj"]] * 2


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_packed_layers_sharing_an_input_and_an_option_fuse_after_loading(backend):
    """A saved model's packed layers are fused as stored (rows stacked, codes untouched): same logits."""
    model, ids = tiny_llama(), torch.randint(0, 128, (1, 8))
    options = {n: parse("rtn:int4:g32:asym") for n in linear_layers(model)}
    options.update({n: parse("rtn:int8:pc:sym") for n in options if n.endswith("v_proj")})
    pack_in_place(model, options, backend, progress=False)
    expected = model(input_ids=ids).logits
    fused = fuse_packed(model, lambda: model(input_ids=ids))
    assert sorted(n.split(".")[-3] for n in fused) == ["mlp", "mlp", "q_proj", "q_proj"]
    layer = model.get_submodule(next(iter(fused)))
    assert layer.out_features == 64 + 32 and layer.backend == backend and layer.qweight.device.type == "cpu"
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_packed_layers_with_different_outlier_channels_are_refused():
    from bitalloc.blocks import replace_module
    from bitalloc.kernels.quant_linear import QuantLinear

    model = tiny_llama()
    names = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    for name in names:  # stored tensors all zero but the outlier channels' indices
        replace_module(model, name, QuantLinear(parse("rtn:int4:g32:asym:outliers=2"), 64, 96))
    model.get_submodule(names[1]).outlier_idx[0] = 1
    with pytest.raises(BitallocError, match="outlier_idx differ"):
        fuse_layers(model, [names])
