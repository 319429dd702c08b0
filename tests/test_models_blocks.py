import pytest
import torch

from bitalloc.blocks import advance, block_outputs, capture_inputs, run_block
from bitalloc.errors import BitallocError
from bitalloc.models import (block_linears, find_blocks, from_module, linear_layers, load_model, tie_groups,
                             weight_matrix)
from conftest import requires_default_model, tiny_gpt2, tiny_llama, tiny_opt


@pytest.mark.parametrize("make, blocks, linears", [
    (tiny_llama, 2, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    (tiny_opt, 2, ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"]),
    (tiny_gpt2, 2, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
])
def test_blocks_and_linears_are_found_structurally(make, blocks, linears):
    model = make()
    prefix, found = find_blocks(model)
    assert len(found) == blocks
    assert list(block_linears(found[0])) == linears
    assert len(linear_layers(model)) == blocks * len(linears)
    assert all(name.startswith(prefix + ".") for name in linear_layers(model))


def test_conv1d_weight_is_seen_as_out_by_in():
    model = tiny_gpt2()
    c_fc = find_blocks(model)[1][0].mlp.c_fc
    assert weight_matrix(c_fc).shape == (256, 64)  # stored as [in, out]


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt, tiny_gpt2])
def test_streaming_blocks_reproduces_the_full_forward(make):
    model = make()
    ids = torch.randint(0, 300, (3, 24))
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
        batches = capture_inputs(model, ids, batch_size=2)
        for block in find_blocks(model)[1]:
            batches = advance(batches, block_outputs(block, batches))
        hidden = torch.cat([b.hidden for b in batches])
    final_norm = model.model.norm if hasattr(model, "model") and hasattr(model.model, "norm") else None
    if final_norm is not None:  # Llama: hidden_states[-1] is after the final norm
        hidden = final_norm(hidden)
    elif hasattr(model, "transformer"):
        hidden = model.transformer.ln_f(hidden)
    elif model.model.decoder.final_layer_norm is not None:
        hidden = model.model.decoder.final_layer_norm(hidden)
    assert torch.allclose(hidden, expected, atol=1e-5)


def test_tie_groups_find_shared_inputs():
    model = tiny_llama()
    batch = capture_inputs(model, torch.randint(0, 300, (1, 8)), 1)[0]
    block = find_blocks(model)[1][0]
    groups = tie_groups(block, lambda: run_block(block, batch))
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_fingerprint_changes_with_weights():
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    assert from_module(a).fingerprint == from_module(b).fingerprint
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert from_module(a).fingerprint != from_module(b).fingerprint


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(BitallocError, match="model not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(BitallocError, match="model file not found"):
        load_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BitallocError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_local_hf_directory_loads(tiny_dir):
    loaded = load_model(str(tiny_dir))
    assert len(loaded.blocks) == 2 and loaded.tokenizer is not None
    assert loaded.fingerprint == load_model(str(tiny_dir)).fingerprint


@requires_default_model()
def test_default_model_structure():
    loaded = load_model("smollm2-135m")
    assert len(loaded.blocks) == 30
    layers = linear_layers(loaded.model)
    assert len(layers) == 210
    assert weight_matrix(layers["model.layers.0.mlp.down_proj"]).shape == (576, 1536)
