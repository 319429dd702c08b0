"""Apply, save and reload: the packed model round-trips exactly and weighs what the cost model says."""
import json

import pytest
import torch

import bitalloc
from bitalloc import apply
from bitalloc.cost import assignment_bytes, layer_shapes, other_bytes
from bitalloc.errors import BitallocError
from bitalloc.models import from_module, linear_layers
from bitalloc.quant import parse
from bitalloc.quantize_model import quantize_model, stored_bytes
from bitalloc.saving import save
from conftest import run_cli, tiny_llama

MIX = ["rtn:int4:g32:asym", "rtn:int3:g64:sym", "rtn:int8:pc:sym", "rtn:int2:g32:asym", "rtn:nf4:g64", "fp16",
       "rtn:int8:pc:asym:a8"]


@pytest.fixture
def packed():
    loaded = from_module(tiny_llama(seed=5))
    names = list(linear_layers(loaded.model))
    assignment = {name: parse(MIX[i % len(MIX)]) for i, name in enumerate(names)}
    shapes, other = layer_shapes(loaded.model), other_bytes(loaded.model, dtype=torch.float32)
    quantize_model(loaded, assignment, backend="cpu", progress=False)
    return loaded, assignment, (shapes, other)


def test_saved_model_reloads_with_identical_logits_and_predicted_bytes(packed, tmp_path):
    loaded, assignment, (shapes, other) = packed
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = loaded.model(input_ids=ids).logits
    meta = save(loaded, tmp_path / "saved")
    reloaded = bitalloc.load(tmp_path / "saved")
    with torch.no_grad():
        after = reloaded.model(input_ids=ids).logits
    assert torch.equal(before, after)
    predicted = assignment_bytes(shapes, assignment)
    assert meta["bytes"]["linears"] == predicted == stored_bytes(reloaded.model)
    assert meta["bytes"]["other"] == other
    kernels = {m.kernel for m in reloaded.model.modules() if hasattr(m, "kernel_state")}
    assert "cpu" in kernels and any(k.startswith("reference (cpu:") for k in kernels)


def test_reload_can_switch_backend_and_rejects_a_foreign_directory(packed, tmp_path):
    loaded, _, _ = packed
    save(loaded, tmp_path / "saved")
    reloaded = bitalloc.load(tmp_path / "saved", backend="reference")
    assert all(m.backend == "reference" for m in reloaded.model.modules() if hasattr(m, "kernel_state"))
    with pytest.raises(BitallocError, match="not a saved bitalloc model"):
        bitalloc.load(tmp_path)


def test_apply_saves_a_model_that_loads(cli_env, tiny_dir, capsys):
    layers = {f"model.layers.{i}.mlp.{p}": "rtn:int4:g32:asym" for i in range(2) for p in ("up_proj", "gate_proj")}
    plan = {"format": "bitalloc-plan", "version": 1, "model": str(tiny_dir), "layers": layers}
    (cli_env / "plan.json").write_text(json.dumps(plan))
    argv = ["--plan", "plan.json", "--backend", "auto", "--no-eval", "--save", "out", "--json", "applied.json",
            "--quiet"]
    code, out, err = run_cli(apply.main, argv, capsys)
    assert code == 0, err
    applied = json.loads((cli_env / "applied.json").read_text())
    assert applied["kernels"] == {"cpu": 4, "reference": 10}  # fp16 layers stay dense
    assert applied["saved"]["linears"] == applied["bytes"] and applied["memory"]["peak_rss_bytes"] > 0
    assert "peak process memory" in out
    reloaded = bitalloc.load(cli_env / "out")
    assert reloaded.tokenizer is not None
    assert sum(1 for m in reloaded.model.modules() if getattr(m, "kernel", None) == "cpu") == 4


def test_reload_can_fuse_the_layers_that_share_an_input_and_an_option(tmp_path):
    """q/k/v and gate/up under one option each (a `--tie fused` plan) reload as two wider layers per block
    (gate/up as the gated MLP's one layer), with the logits of the layers apart."""
    from bitalloc.fuse import GatedMLP, SharedSlice

    loaded = from_module(tiny_llama(seed=5))
    tied = {"q_proj": "rtn:int4:g32:asym", "k_proj": "rtn:int4:g32:asym", "v_proj": "rtn:int4:g32:asym",
            "gate_proj": "rtn:int3:g64:sym", "up_proj": "rtn:int3:g64:sym", "o_proj": "rtn:int8:pc:sym",
            "down_proj": "rtn:int2:g32:asym"}
    assignment = {name: parse(tied[name.rsplit(".", 1)[-1]]) for name in linear_layers(loaded.model)}
    quantize_model(loaded, assignment, backend="reference", progress=False)
    save(loaded, tmp_path / "saved")
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    apart, fused = (bitalloc.load(tmp_path / "saved", fuse=fuse).model for fuse in (False, True))
    slices = [name.rsplit(".", 1)[-1] for name, m in fused.named_modules() if isinstance(m, SharedSlice)]
    assert sorted(slices) == sorted(["q_proj", "k_proj", "v_proj"] * 2)
    assert sum(isinstance(m, GatedMLP) for m in fused.modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, apart(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_save_replaces_only_a_new_empty_or_earlier_saved_directory(tmp_path):
    from bitalloc.errors import BitallocError
    from bitalloc.saving import META, check_target

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "plan.json").write_text("{}")
    (tmp_path / "file").write_text("x")
    for target, message in (("run", "holds other files"), ("file", "is a file")):
        with pytest.raises(BitallocError, match=message):
            check_target(tmp_path / target)
    (tmp_path / "empty").mkdir()
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / META).write_text("{}")
    for target in ("new", "empty", "saved"):
        assert check_target(tmp_path / target) == (tmp_path / target).resolve()
