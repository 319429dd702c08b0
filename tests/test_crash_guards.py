"""Runs that must stop: NaN/Inf weights and activations, and scales float16 cannot hold, are reported
with the name of the layer at fault, through the profiler, search, apply and evaluation."""
import json

import pytest
import torch

from bitalloc import apply, pipeline, plots, report
from bitalloc.data import calibration_ids, eval_windows
from bitalloc.errors import BitallocError
from bitalloc.evaluate import Evaluator, evaluate
from bitalloc.models import from_module
from bitalloc.profile import profile
from bitalloc.quant import QUANTIZERS, parse, quantize
from bitalloc.quant.registry import Quantizer
from conftest import all_files, run_cli, tiny_llama

NAN_LAYER = "model.layers.1.mlp.down_proj"
OPTIONS = [parse("rtn:int4:g32:asym"), parse("rtn:int8:g32:asym")]
IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def with_nan(vocab_size=320):
    model = tiny_llama(vocab_size=vocab_size)
    with torch.no_grad():
        model.get_submodule(NAN_LAYER).weight[3, 7] = float("nan")
    return model


def overflowing():
    """Finite weights whose activations overflow float32 in block 0's MLP (gate * up > 3.4e38)."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.fill_(1e20)
    return model


@pytest.fixture
def nan_dir(tmp_path, tokenizer):
    path = tmp_path / "nan-llama"
    with_nan(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_profiler_names_the_nan_weight():
    with pytest.raises(BitallocError, match=f"weight {NAN_LAYER}.weight has 1 NaN/Inf value.*at \\(3, 7\\)"):
        profile(from_module(with_nan()), IDS, OPTIONS, batch_size=2, progress=False)


def expect_one_line(code, err, words):
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and words in lines[-1], err
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in err


def test_search_names_the_nan_weight_and_writes_nothing(nan_dir, cli_env, capsys):
    before = all_files(cli_env)
    argv = ["--model", str(nan_dir), "--space", "rtn:int4:g32:asym,rtn:int8:g32:asym", "--budget", "6",
            "--nsamples", "2", "--calib-seqlen", "16", "--seqlen", "16", "--eval-windows", "2", "--out", "run",
            "--quiet"]
    expect_one_line(*run_cli(pipeline.main, argv, capsys)[::2], f"weight {NAN_LAYER}.weight has 1 NaN/Inf")
    assert all_files(cli_env) == before


def test_apply_names_the_nan_weight_and_writes_nothing(nan_dir, cli_env, capsys):
    plan = cli_env / "plan.json"
    plan.write_text(json.dumps({"format": "bitalloc-plan", "version": 1, "model": str(nan_dir), "layers": {},
                                "default": "rtn:int4:g32:asym"}))
    before = all_files(cli_env)
    code, _, err = run_cli(apply.main, ["--plan", str(plan), "--quiet", "--json", "out.json"], capsys)
    expect_one_line(code, err, f"weight {NAN_LAYER}.weight has 1 NaN/Inf")
    assert all_files(cli_env) == before


def test_overflowing_activations_are_traced_to_their_layer():
    where = "first in the output of model.layers.0.mlp.down_proj"
    with pytest.raises(BitallocError, match=f"block 0 produced NaN/Inf activations, {where}"):
        profile(from_module(overflowing()), IDS, OPTIONS, batch_size=2, progress=False)
    with pytest.raises(BitallocError, match=f"evaluation batch 0 produced NaN/Inf activations, {where}"):
        evaluate(overflowing(), IDS, batch_size=2, progress=False)


def test_scales_beyond_float16_are_an_error_naming_the_layer():
    weight = torch.randn(8, 64) * 1e6  # |w| / 7 > 65504
    with pytest.raises(BitallocError, match="layer model.layers.0.mlp.up_proj: scales overflow float16"):
        quantize(weight, parse("rtn:int4:g32:sym"), layer="model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("option", ["rtn:int4:g32:asym", "rtn:int3:g32:sym", "rtn:nf4:g32", "rtn:fp8e4m3:g32",
                                    "rtn:int2:g32:asym:clip=1"])
def test_zero_and_tiny_range_groups_stay_finite_and_exact(option):
    weight = torch.randn(4, 64) * 0.02
    weight[0, :32] = 0.0  # all zero
    weight[1, :32] = 0.5  # constant
    weight[2, :32] = torch.arange(32) * 1e-10  # a range float16 scales cannot resolve (scale would round to 0)
    qw = quantize(weight, parse(option), layer="tiny")
    restored = qw.dequantize()
    assert torch.isfinite(restored).all() and (qw.scales > 0).all()
    assert torch.equal(restored[0, :32], weight[0, :32])
    assert (restored[1, :32] - 0.5).abs().max() <= 0.5 * 2**-10  # float16 rounding of the scale only
    assert (restored[2, :32] - weight[2, :32]).abs().max() < 1e-7


def test_a_quantizer_returning_nan_scales_is_stopped(monkeypatch):
    rtn = QUANTIZERS["rtn"]

    def broken(weight, option, calib):
        qw = rtn.fn(weight, option, calib)
        qw.scales[0, 0] = float("nan")
        return qw

    monkeypatch.setitem(QUANTIZERS, "broken", Quantizer("broken", broken, "0", False, ("int",), False, {}))
    with pytest.raises(BitallocError, match="layer model.layers.0.mlp.up_proj: quantizing with .* 1 NaN/Inf/zero scales"):
        quantize(torch.randn(4, 64), parse("broken:int4:g32:asym"), layer="model.layers.0.mlp.up_proj")


def warned(caplog, path, words):
    return any(str(path) in r.getMessage() and words in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("content", ["[]", "null", "5", "{bad", '{"format": 2, "rows": 5}',
                                     '{"format": 2, "rows": [5]}', '{"format": 2, "rows": [{"layer": "x"}]}',
                                     '{"format": 2, "rows": [{"layer": "x", "option": "y", "values": {"rel": "z"}}]}'])
def test_a_corrupt_profile_block_file_is_measured_again(content, tmp_path, caplog):
    loaded = from_module(tiny_llama())
    first = profile(loaded, IDS, OPTIONS, cache_dir=tmp_path, batch_size=2, progress=False)
    block = next(tmp_path.glob("*/block_0000.json"))
    block.write_text(content)
    again = profile(loaded, IDS, OPTIONS, cache_dir=tmp_path, batch_size=2, progress=False)
    assert again.rows == first.rows
    assert warned(caplog, block, "block 0 will be measured again")
    assert json.loads(block.read_text())["format"] == 2  # rewritten whole


@pytest.mark.parametrize("content", ["{bad", "[]", '{"ppl": "x"}', "\udcff"])
def test_a_corrupt_reference_result_is_recomputed(content, tmp_path, caplog):
    loaded = from_module(tiny_llama())
    base = Evaluator(loaded, IDS, {"corpus": "wikitext2"}, tmp_path, batch_size=2, progress=False).unquantized()
    evaluator = Evaluator(loaded, IDS, {"corpus": "wikitext2"}, tmp_path, batch_size=2, progress=False)
    result = evaluator.cache.dir / "result.json"
    result.write_bytes(content.encode("utf-8", "surrogateescape"))
    assert evaluator.unquantized()["ppl"] == pytest.approx(base["ppl"])
    assert warned(caplog, result, "recomputing the reference")
    assert json.loads(result.read_text())["ppl"] == pytest.approx(base["ppl"])


def test_an_evaluation_corpus_that_is_not_utf8_is_named(tmp_path, tokenizer):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "test.txt").write_bytes(b"The river \xff\xfe city.")
    with pytest.raises(BitallocError, match="cannot read text file .*wikitext2/test.txt: .*can't decode byte 0xff"):
        eval_windows(tokenizer, "wikitext2", 16, 2, tmp_path)


@pytest.mark.parametrize("line", ['{"text": 5}', '{"text": null}', '{"txt": "a"}', "[1]", '"text"', "{bad"])
def test_calibration_jsonl_lines_without_a_text_string_are_named(line, tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "The river"}\n' + line + "\n")
    with pytest.raises(BitallocError, match="c.jsonl:2: expected a JSON object with a 'text' field holding a string"):
        calibration_ids(tokenizer, str(path), 2, 4)


def test_search_with_a_bad_calibration_jsonl_is_one_line(tiny_dir, cli_env, capsys):
    (cli_env / "c.jsonl").write_text('{"text": 5}\n')
    before = all_files(cli_env)
    argv = ["--model", str(tiny_dir), "--space", "rtn:int4:g32:asym", "--budget", "6", "--calib", "c.jsonl",
            "--nsamples", "2", "--calib-seqlen", "16", "--seqlen", "16", "--eval-windows", "2", "--out", "run",
            "--quiet"]
    expect_one_line(*run_cli(pipeline.main, argv, capsys)[::2], "c.jsonl:1: expected a JSON object")
    assert all_files(cli_env) == before


REPORT_OPTIONS = ("rtn:int4:g32:asym", "rtn:int8:g32:asym")
REPORT_LAYERS = [f"model.layers.{b}.{kind}" for b in range(2) for kind in ("self_attn.q_proj", "mlp.down_proj")]
TABLE_ROWS = [{"layer": l, "option": o, "error": 0.1 / (1 + i), "bytes": 2560 * (1 + i), "numel": 4096}
              for l in REPORT_LAYERS for i, o in enumerate(REPORT_OPTIONS)]
MEASURED = {"ppl": 10.5, "kl": {"mean": 0.01, "median": 0.005, "p99": 0.1}, "top1": 0.97,
            "per_window": {"ppl": [9.4, 11.6]}}
RESULTS = {"evaluation": {"corpus": "wikitext2", "seqlen": 16, "windows": 2, "subset": True}, "variants": {
    "unquantized": {"measured": {"ppl": 10.0, "per_window": {"ppl": [9.0, 11.0]}}},
    "mixed (ilp)": {"bytes": 12000, "avg_bits": 5.9, "predicted_loss": 0.3, "measured": MEASURED,
                    "layers": {l: REPORT_OPTIONS[0] for l in REPORT_LAYERS}}}}


def table_json(rows):
    return json.dumps({"meta": {"metric": "rel"}, "rows": rows})


@pytest.fixture
def report_run(tmp_path):
    """A run directory as bash search.sh leaves it, made by hand: plan, table and results."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.json").write_text(json.dumps({"format": "bitalloc-plan", "version": 1, "model": "tiny",
                                               "layers": {}, "default": REPORT_OPTIONS[0]}))
    (run / "sensitivity.json").write_text(table_json(TABLE_ROWS))
    (run / "results.json").write_text(json.dumps(RESULTS))
    return run


def test_a_report_of_a_hand_made_run_has_every_section(report_run, capsys):
    code, _, err = run_cli(report.main, [str(report_run)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (report_run / "report").iterdir()) == [
        "bits_per_layer.png", "pareto_front.png", "per_window.png", "predicted_vs_measured.png", "report.md",
        "sensitivity_heatmap.png"]


@pytest.mark.parametrize("name, content, words", [
    ("results.json", "[]", "results.json is a list, expected a JSON object"),
    ("results.json", '{"variants": []}', 'results.json["variants"] is a list, expected a JSON object'),
    ("results.json", '{"variants": {"x": 5}}', 'results.json["variants"]["x"] is 5, expected a JSON object'),
    ("results.json", '{"variants": {"x": {"measured": {"ppl": "x"}}}}', '["ppl"] is "x", expected a positive number'),
    ("results.json", '{"evaluation": 5}', 'results.json["evaluation"] is 5, expected a JSON object'),
    ("results.json", json.dumps({"variants": {"mixed": {"layers": {"a": REPORT_OPTIONS[0]}}}}),
     'the layers recorded for variant "mixed"'),
    ("pareto.json", "5", "pareto.json is 5, expected a list of points"),
    ("report_measured.json", "[]", "report_measured.json is a list, expected a JSON object"),
    ("sensitivity.json", table_json([]), "sensitivity.json has no rows"),
    ("sensitivity.json", table_json([{**TABLE_ROWS[0], "numel": 0}, *TABLE_ROWS[1:]]),
     'row 0["numel"] is 0, expected a positive number'),
    ("sensitivity.json", table_json([{**TABLE_ROWS[0], "error": "abc"}, *TABLE_ROWS[1:]]),
     'row 0["error"] is "abc", expected a number'),
    ("sensitivity.json", table_json([{**TABLE_ROWS[0], "error": None}, *TABLE_ROWS[1:]]),
     'row 0["error"] is null, expected a number'),
    ("sensitivity.json", table_json(TABLE_ROWS[:-1]),
     f"has no row for layer {REPORT_LAYERS[-1]} at option {REPORT_OPTIONS[-1]}"),
])
def test_a_report_of_malformed_run_files_is_one_line_and_writes_nothing(report_run, capsys, name, content, words):
    (report_run / name).write_text(content)
    before = all_files(report_run)
    expect_one_line(*run_cli(report.main, [str(report_run)], capsys)[::2], words)
    assert all_files(report_run) == before


def test_a_report_that_fails_half_way_leaves_no_figure(report_run, capsys, monkeypatch):
    def failing(*args):
        raise BitallocError("the heatmap could not be drawn")

    monkeypatch.setattr(plots, "sensitivity_figure", failing)  # after three figures are made
    before = all_files(report_run)
    expect_one_line(*run_cli(report.main, [str(report_run)], capsys)[::2], "the heatmap could not be drawn")
    assert all_files(report_run) == before
