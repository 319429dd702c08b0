
import pytest

from bitalloc.cost import LayerShape, layer_bytes
from bitalloc.errors import BitallocError
from bitalloc.plan import Plan
from bitalloc.quant import parse

SHAPES = [LayerShape(f"model.layers.0.{n}", 64, 128, False) for n in ("q", "k", "v", "o")]


def plan(**changes):
    data = {"format": "bitalloc-plan", "version": 1, "model": "tiny", "fingerprint": "abc",
            "layers": {s.name: "rtn:int4:g64:asym" for s in SHAPES}, "default": "fp16"}
    data.update(changes)
    return data


def test_plan_round_trips_through_json(tmp_path):
    original = Plan.from_json(plan(tie_groups=[[s.name for s in SHAPES[:3]]], budget={"kind": "bytes", "limit": 9e9}))
    original.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded == original
    assert loaded.check_against(SHAPES, "abc")[SHAPES[0].name] == parse("rtn:int4:g64:asym")


def test_same_plan_gives_byte_identical_files(tmp_path):
    Plan.from_json(plan()).save(tmp_path / "a.json")
    Plan.from_json(plan()).save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


@pytest.mark.parametrize("data, message", [
    ([], "JSON object"),
    (plan(version=2), "unsupported plan version"),
    (plan(format="other"), "'format'"),
    (plan(extra=1), "unknown key 'extra'"),
    ({"format": "bitalloc-plan", "version": 1, "model": "tiny"}, "missing key 'layers'"),
    (plan(layers=["x"]), "'layers' must map"),
    (plan(layers={"model.layers.0.q": "rtn:int9:g64:asym"}), "layer 'model.layers.0.q': .*unsupported format"),
    (plan(layers={"model.layers.0.q": 4}), "option must be a string"),
    (plan(layers={"model.layers.0.q": "gptx:int4:g64:asym"}), "unknown quantization method 'gptx'"),
    (plan(default=3), "'default'"),
    (plan(tie_groups="q,k"), "tie_groups"),
])
def test_malformed_plans_are_named(data, message):
    with pytest.raises(BitallocError, match=message):
        Plan.from_json(data)


def test_plan_checks_against_the_model():
    with pytest.raises(BitallocError, match="layer 'model.layers.9.q'"):
        Plan.from_json(plan(layers={"model.layers.9.q": "rtn:int4:g64:asym"})).check_against(SHAPES)
    ties = [[s.name for s in SHAPES[:3]]]
    mixed = plan(tie_groups=ties, layers={SHAPES[0].name: "rtn:int3:g64:asym"})
    with pytest.raises(BitallocError, match="tie group .* must share"):
        Plan.from_json(mixed).check_against(SHAPES)
    with pytest.raises(BitallocError, match="made for model weights abc"):
        Plan.from_json(plan()).check_against(SHAPES, "def")
    over = plan(budget={"kind": "bytes", "limit": 10})
    with pytest.raises(BitallocError, match="over its own budget"):
        Plan.from_json(over).check_against(SHAPES)


def test_unlisted_layers_take_the_default():
    p = Plan.from_json(plan(layers={}, default="rtn:int3:g64:asym"))
    assignment = p.check_against(SHAPES)
    assert set(map(str, assignment.values())) == {"rtn:int3:g64:asym"}
    assert sum(layer_bytes(s, assignment[s.name]) for s in SHAPES) == 4 * layer_bytes(SHAPES[0], parse("rtn:int3:g64:asym"))


@pytest.mark.parametrize("text", ["{", '{"format": NaN}', "[" * 100000, "\udcff"])
def test_unreadable_plan_files_are_named(tmp_path, text):
    path = tmp_path / "plan.json"
    path.write_text(text, errors="surrogateescape")
    with pytest.raises(BitallocError, match="plan"):
        Plan.load(path)
