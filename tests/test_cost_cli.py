"""python flops/cal_flops.py end to end on a tiny model: the table, the JSON, and bad input."""
import json

import pytest

from bitalloc import cost_cli
from bitalloc.arch import architecture
from bitalloc.cost import assignment_bops, assignment_bytes, average_bits, kv_cache_bytes, layer_shapes
from bitalloc.macs import Workload, analytic_macs
from bitalloc.quant import parse
from conftest import all_files, run_cli


@pytest.fixture
def tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    return model, layer_shapes(model)


def test_table_and_json_with_a_plan(cli_env, tiny_dir, tiny, capsys):
    model, shapes = tiny
    options = [parse(o) for o in ("rtn:int3:g64:asym", "rtn:int4:g32:sym:a8", "rtn:int8:pc:sym")]
    assignment = {s.name: options[i % 3] for i, s in enumerate(shapes)}
    (cli_env / "plan.json").write_text(json.dumps({"format": "bitalloc-plan", "version": 1, "model": str(tiny_dir),
                                                   "layers": {k: str(v) for k, v in assignment.items()}}))
    argv = ["--model", str(tiny_dir), "--seqlen", "24", "--batch", "2", "--plan", "plan.json", "--json", "out.json"]
    code, out, err = run_cli(cost_cli.main, argv, capsys)
    assert code == 0, err
    for text in ("model.layers.0", "model.layers.1", "total", "MACs = multiply-accumulates", "FLOPs = 2 x MACs",
                 "fvcore - formula = +0.000 %", "unquantized (fp16)", "plan plan.json", "avg bits"):
        assert text in out, text
    report = json.loads((cli_env / "out.json").read_text())
    workload = Workload(2, 24)
    assert report["macs"] == report["analytic_macs"] == analytic_macs(architecture(model.config), workload)["total"]
    assert report["flops"] == 2 * report["macs"]
    assert report["macs"] == sum(b["macs"] for b in report["blocks"]) + report["macs_outside_blocks"]
    plan = report["variants"]["plan"]
    assert plan["bytes"]["linears"] == assignment_bytes(shapes, assignment)
    assert plan["avg_bits"] == pytest.approx(average_bits(shapes, assignment))
    assert plan["bops_linears"] == assignment_bops(shapes, assignment, workload.tokens)
    assert report["variants"]["unquantized"]["bops_linears"] > plan["bops_linears"]
    assert plan["kv_cache_bytes"] == kv_cache_bytes(architecture(model.config), 24, 2)


def test_decode_counts_one_token_against_the_cache(cli_env, tiny_dir, tiny, capsys):
    model, _ = tiny
    argv = ["--model", str(tiny_dir), "--seqlen", "40", "--decode", "--json", "out.json"]
    code, out, err = run_cli(cost_cli.main, argv, capsys)
    assert code == 0, err
    assert "decode: 1 x 1 new token after 40 cached" in out
    report = json.loads((cli_env / "out.json").read_text())
    assert report["macs"] == analytic_macs(architecture(model.config), Workload(1, 40, decode=True))["total"]
    assert report["variants"]["unquantized"]["kv_cache_bytes"] == kv_cache_bytes(architecture(model.config), 41)


@pytest.mark.parametrize("argv, message", [
    (["--seqlen", "0"], "at least 1"),
    (["--seqlen", "1000"], "needs 1000 positions; the model has 256"),
    (["--plan", "missing.json"], "plan file not found"),
    (["--embeddings", "rtn:int9:g64"], "--embeddings: option 'rtn:int9:g64'"),
])
def test_bad_input_stops_with_one_line(argv, message, cli_env, tiny_dir, capsys):
    before = all_files(cli_env)
    code, _, err = run_cli(cost_cli.main, ["--model", str(tiny_dir), "--json", "out.json", *argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert all_files(cli_env) == before
