"""fvcore's MAC count against the analytic formula, prefill and decode, and the op handles behind it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitalloc.arch import architecture
from bitalloc.cost import layer_shapes
from bitalloc.errors import BitallocError
from bitalloc.macs import Workload, analytic_macs, count_macs, mac_analysis
from conftest import requires_default_model, tiny_gpt2, tiny_llama, tiny_opt

WORKLOADS = [Workload(batch=2, seqlen=16), Workload(batch=2, seqlen=10, decode=True)]


def _llama_like(config_class, model_class, **extra):
    def make():
        torch.manual_seed(0)
        config = config_class(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
        return model_class(config).eval()
    return make


def tiny_opt_projected():
    """OPT whose embeddings are narrower than its blocks: project_in / project_out run outside the blocks."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=320, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=256, word_embed_proj_dim=48)
    return OPTForCausalLM(config).eval()


def _families():
    from transformers import (MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    return {
        "llama": tiny_llama, "opt": tiny_opt, "gpt2": tiny_gpt2, "opt-projected": tiny_opt_projected,
        "mistral": _llama_like(MistralConfig, MistralForCausalLM, sliding_window=None),
        "qwen2": _llama_like(Qwen2Config, Qwen2ForCausalLM),
        "qwen3": _llama_like(Qwen3Config, Qwen3ForCausalLM, head_dim=32),  # head_dim != hidden / heads
    }


def _assert_matches_formula(model, workload):
    count = count_macs(model, workload)
    formula = analytic_macs(architecture(model.config), workload)
    assert abs(count.total - formula["total"]) <= 0.005 * formula["total"]
    assert count.blocks == [formula["block"]] * len(count.blocks)
    assert count.block_attention == [formula["block_attention"]] * len(count.blocks)
    assert count.outside_blocks == formula["outside_blocks"]
    return count


@pytest.mark.parametrize("workload", WORKLOADS, ids=["prefill", "decode"])
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "opt-projected", "mistral", "qwen2", "qwen3"])
def test_fvcore_equals_the_formula(family, workload):
    model = _families()[family]()
    count = _assert_matches_formula(model, workload)
    assert count.total == count.by_module[""] and 2 * count.total > 0
    # every decoder linear multiplies each new token once: the basis of BOPs
    for shape in layer_shapes(model):
        assert count.linear(shape.name) == workload.tokens * shape.numel


@pytest.mark.parametrize("workload", WORKLOADS, ids=["prefill", "decode"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_opt, tiny_gpt2], ids=["llama", "opt", "gpt2"])
def test_eager_attention_counts_as_much_as_sdpa(make, workload):
    """Eager attention is matmuls, sdpa one fused op: both are counted, and the same."""
    model = make()
    model.set_attn_implementation("eager")
    count = _assert_matches_formula(model, workload)
    assert "matmul" in count.by_operator and "scaled_dot_product_attention" not in count.by_operator


def test_decode_attends_to_the_cache_and_itself():
    model = tiny_llama()
    short, long = (count_macs(model, Workload(1, n, decode=True)) for n in (10, 20))
    arch = architecture(model.config)
    per_key = arch.layers * arch.heads * 2 * arch.head_dim  # Q K^T and A V, one query per sequence
    assert long.total - short.total == 10 * per_key
    assert sum(short.block_attention) == 11 * per_key


class Products(nn.Module):
    def forward(self, a, b, bias, b1, b2, q, k, v):
        return (torch.matmul(a, b).sum() + torch.baddbmm(bias, b1, b2).sum()
                + F.scaled_dot_product_attention(q, k, v, enable_gqa=True).sum() + F.layer_norm(bias, (6,)).sum())


def test_handles_count_broadcast_matmul_baddbmm_and_grouped_attention():
    inputs = (torch.randn(3, 1, 4, 5), torch.randn(2, 5, 6), torch.randn(2, 4, 6), torch.randn(2, 4, 5),
              torch.randn(2, 5, 6), torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8))
    analysis = mac_analysis(Products(), inputs)
    assert dict(analysis.by_operator()) | {"layer_norm": 0} == {
        "matmul": 3 * 2 * 4 * 6 * 5,  # broadcast batch 3 x 2: fvcore's own handle counts half of it
        "baddbmm": 2 * 4 * 6 * 5,
        "scaled_dot_product_attention": 4 * 7 * 7 * (8 + 8),  # every query head, though K/V have 2
        "layer_norm": 0,  # not a matrix product
    }


def test_unknown_architectures_and_bad_workloads_are_named():
    config = type("Config", (), {"model_type": "mamba"})()
    with pytest.raises(BitallocError, match="model type 'mamba'"):
        architecture(config)
    with pytest.raises(BitallocError, match="at least 1"):
        Workload(batch=0)


@requires_default_model()
def test_smollm2_architecture_matches_the_formula():
    """SmolLM2-135M's config (read from the embedded GGUF) with random weights: MACs depend on shapes only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bitalloc.models import embedded_path

    path = embedded_path("smollm2-135m")
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config).eval()
    for workload in (Workload(1, 128), Workload(2, 128, decode=True)):
        _assert_matches_formula(model, workload)
