"""Partial recompute, granularity, interaction mode, lazy block weights, the CLIs."""
import json

import pytest
import torch

from bitalloc import fidelity, partial
from bitalloc import profile as profile_module
from bitalloc.cost import average_bits, layer_shapes
from bitalloc.models import from_module, load_model
from bitalloc.profile import profile
from bitalloc.quant import parse
from bitalloc.weights import load_lazy
from conftest import run_cli, tiny_gpt2, tiny_llama, tiny_opt

OPTIONS = [parse("rtn:int2:g32:asym"), parse("rtn:int8:g32:asym")]
IDS = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt, tiny_gpt2])
def test_partial_recompute_equals_full_recompute(make, monkeypatch):
    loaded = from_module(make(seed=3))
    fast = profile(loaded, IDS, OPTIONS, None, 2, progress=False, metrics=["rel", "mse"])
    lean = profile(loaded, IDS, OPTIONS, None, 2, progress=False, metrics=["rel", "mse"], lean_memory=True)
    monkeypatch.setattr(partial.BlockTrace, "shortcuts", lambda self, unit, narrow=False: partial.Shortcuts())
    full = profile(loaded, IDS, OPTIONS, None, 2, progress=False, metrics=["rel", "mse"])
    assert fast.rows == full.rows == lean.rows


def test_lean_memory_records_no_tensor_wider_than_the_blocks_input():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from bitalloc.blocks import BlockBatch, run_block

    block = tiny_llama(seed=3).model.layers[0]  # MLP 160 wide, hidden 96
    hidden = torch.randn(2, 8, 96)
    rotary = LlamaRotaryEmbedding(block.self_attn.config)
    cos_sin = rotary(hidden, torch.arange(8)[None].expand(2, -1))
    batch = BlockBatch(hidden, {"position_embeddings": cos_sin, "attention_mask": None})
    trace = partial.BlockTrace(block, lambda: run_block(block, batch))
    for unit in (["mlp.gate_proj"], ["mlp.up_proj"], ["mlp.down_proj"]):
        wide, narrow = trace.shortcuts(unit), trace.shortcuts(unit, narrow=True)
        _, recorded = partial.record(block, lambda: run_block(block, batch), [narrow])
        assert all(partial._first_tensor(v).numel() <= hidden.numel() for v in [*recorded.outputs.values(),
                                                                   *recorded.inputs.values()]), unit
        _, full_recording = partial.record(block, lambda: run_block(block, batch), [wide])
        assert any(partial._first_tensor(v).numel() > hidden.numel() for v in [*full_recording.outputs.values(),
                                                                 *full_recording.inputs.values()]), unit


def test_tie_group_and_block_units_share_one_value_among_their_layers():
    loaded = from_module(tiny_llama(seed=3))
    by_group = profile(loaded, IDS, OPTIONS, None, 2, progress=False, metrics=["rel", "fisher"],
                       granularity="group")
    units = {r["unit"] for r in by_group.rows if "unit" in r}
    assert any(u.endswith("q_proj+model.layers.0.self_attn.k_proj+model.layers.0.self_attn.v_proj") for u in units)
    assert any(u.endswith("gate_proj+model.layers.0.mlp.up_proj") for u in units)
    for unit in units:
        rows = [r for r in by_group.rows if r.get("unit") == unit and r["option"] == str(OPTIONS[0])]
        shares = [r["rel"] / r["numel"] for r in rows]
        assert max(shares) == pytest.approx(min(shares))  # split in proportion to size
    by_block = profile(loaded, IDS, OPTIONS, None, 2, progress=False, metrics=["rel"], granularity="block")
    per_linear = profile(loaded, IDS, OPTIONS, None, 2, progress=False, metrics=["rel"])
    block0 = [r for r in by_block.rows if ".0." in r["layer"] and r["option"] == str(OPTIONS[0])]
    linear0 = [r for r in per_linear.rows if ".0." in r["layer"] and r["option"] == str(OPTIONS[0])]
    assert sum(r["rel"] for r in block0) > max(r["rel"] for r in linear0)  # everything at once hurts more


def test_interaction_mode_measures_on_the_quantized_models_inputs(tmp_path):
    loaded = from_module(tiny_llama(seed=3, layers=3))
    names = [s.name for s in layer_shapes(loaded.model)]
    plain = profile(loaded, IDS, OPTIONS, tmp_path, 2, progress=False, metrics=["rel"])
    harsh = profile(loaded, IDS, OPTIONS, tmp_path, 2, progress=False, metrics=["rel"],
                    plan={n: OPTIONS[0] for n in names})
    block0 = [r for r in plain.rows if ".0." in r["layer"]]
    assert block0 == [r for r in harsh.rows if ".0." in r["layer"]]  # block 0 sees the same inputs
    assert [r for r in plain.rows if ".2." in r["layer"]] != [r for r in harsh.rows if ".2." in r["layer"]]
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    with pytest.raises(Exception, match="interaction"):
        profile(loaded, IDS, OPTIONS, None, 2, progress=False, metrics=["fisher"], plan={n: OPTIONS[0] for n in names})


def test_lazy_block_weights_give_the_same_table_and_leave_blocks_unloaded(tiny_dir):
    eager = load_model(str(tiny_dir))
    lazy, weights = load_lazy(tiny_dir)
    assert all(p.is_meta for p in lazy.blocks[0].parameters())
    metrics = ["rel", "kl", "fisher"]
    expected = profile(eager, IDS, OPTIONS, None, 2, progress=False, metrics=metrics)
    table = profile(lazy, IDS, OPTIONS, None, 2, progress=False, metrics=metrics, weights=weights)
    assert table.rows == expected.rows
    assert all(p.is_meta for block in lazy.blocks for p in block.parameters())


def test_random_plans_cover_the_bit_range():
    shapes = layer_shapes(tiny_llama(layers=3))
    options = [parse(f"rtn:int{b}:g32:asym") for b in (2, 3, 4, 8)]
    plans = fidelity.random_plans(shapes, options, 8, 3.0, 5.0, seed=1)
    bits = [average_bits(shapes, p) for p in plans]
    assert all(2.95 <= b <= 5.05 for b in bits) and max(bits) - min(bits) > 0.5
    assert len({tuple(str(o) for o in p.values()) for p in plans}) == 8


def test_profile_and_fidelity_commands_write_their_outputs(cli_env, tiny_dir, capsys):
    quick = ["--model", str(tiny_dir), "--space", "rtn:int2:g32:asym,rtn:int4:g32:asym,rtn:int8:g32:asym",
             "--nsamples", "4", "--calib-seqlen", "32", "--quiet"]
    code, out, err = run_cli(profile_module.main, [*quick, "--metrics", "rel,fisher", "--out", "prof"], capsys)
    assert code == 0, err
    table = json.loads((cli_env / "prof/sensitivity.json").read_text())
    assert table["meta"]["metric"] == "rel" and all("fisher" in r for r in table["rows"])
    assert "fisher" in (cli_env / "prof/sensitivity.csv").read_text().splitlines()[0]
    assert (cli_env / "prof/profile_heatmap_fisher.png").is_file()
    assert (cli_env / "prof/profile_blocks_rel.png").is_file()
    code, out, err = run_cli(fidelity.main, [*quick, "--metrics", "rel,fisher", "--plans", "4", "--bits", "3:6",
                                             "--seqlen", "32", "--eval-windows", "4", "--out", "fid"], capsys)
    assert code == 0, err
    result = json.loads((cli_env / "fid/fidelity.json").read_text())
    assert len(result["plans"]) == 4 and set(result["correlation"]) == {"rel", "fisher"}
    assert all(-1 <= c["kld"] <= 1 for c in result["correlation"].values())
    code, out, err = run_cli(profile_module.main, [*quick, "--metrics", "nonsense"], capsys)
    assert code == 2 and "unknown metric" in err
