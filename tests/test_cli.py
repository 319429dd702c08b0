"""The command-line entry points end to end on a tiny model, and how they treat bad input."""
import json

import pytest

from bitalloc import apply, pipeline
from conftest import all_files, load_script, run_cli

SPACE = "rtn:int2:g32:asym,rtn:int3:g32:asym,rtn:int4:g32:asym,rtn:int8:g32:asym"
QUICK = ["--nsamples", "4", "--calib-seqlen", "32", "--seqlen", "32", "--eval-windows", "6", "--quiet"]


@pytest.fixture
def search_run(cli_env, tiny_dir, capsys):
    argv = ["--model", str(tiny_dir), "--space", SPACE, "--budget", "rtn:int3:g32:asym", "--out", "run", *QUICK]
    code, out, err = run_cli(pipeline.main, argv, capsys)
    assert code == 0, err
    return cli_env / "run", out


def test_search_writes_a_complete_run_directory(search_run):
    run, out = search_run
    for name in ("plan.json", "sensitivity.json", "sensitivity.csv", "results.json", "summary.txt",
                 "sensitivity_heatmap.png", "bits_per_layer.png"):
        assert (run / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    assert "unquantized" in out and "uniform rtn:int3:g32:asym" in out and "mixed (ilp)" in out
    results = json.loads((run / "results.json").read_text())["variants"]
    uniform, mixed = results["uniform rtn:int3:g32:asym"], results["mixed (ilp)"]
    assert mixed["bytes"] <= uniform["bytes"]
    assert mixed["predicted_loss"] <= uniform["predicted_loss"]


def test_apply_reproduces_the_searched_perplexity(search_run, capsys, tmp_path):
    run, _ = search_run
    plan = json.loads((run / "plan.json").read_text())
    code, out, err = run_cli(apply.main, ["--plan", str(run / "plan.json"), "--quiet", "--json", "applied.json"],
                             capsys)
    assert code == 0, err
    applied = json.loads((run.parent / "applied.json").read_text())
    assert applied["quantized"]["ppl"] == pytest.approx(plan["measured"]["ppl"], abs=0.01)
    assert applied["bytes"] == plan["predicted"]["bytes"]


def test_apply_reads_the_corpora_its_search_read_without_being_told(search_run, corpus_dir, capsys, monkeypatch,
                                                                   offline_hub):
    run, _ = search_run
    plan = json.loads((run / "plan.json").read_text())
    assert plan["calibration"]["data_dir"] == str(corpus_dir.resolve())
    monkeypatch.delenv("BITALLOC_DATA")
    code, out, err = run_cli(apply.main, ["--plan", str(run / "plan.json"), "--quiet"], capsys)
    assert code == 0, err
    plan["calibration"]["data_dir"] = str(corpus_dir / "gone")  # moved since: the usual one-line refusal
    (run / "moved.json").write_text(json.dumps(plan))
    code, out, err = run_cli(apply.main, ["--plan", str(run / "moved.json"), "--quiet"], capsys)
    assert code == 2 and "no evaluation corpus is available" in err


def test_rerunning_search_reuses_the_cached_table(search_run, cli_env, tiny_dir, capsys, monkeypatch):
    from bitalloc import profile as profile_module

    monkeypatch.setattr(profile_module, "measure_block", lambda *a, **k: pytest.fail("re-measured a cached block"))
    argv = ["--model", str(tiny_dir), "--space", SPACE, "--budget", "3.2", "--out", "run2", *QUICK]
    code, _, err = run_cli(pipeline.main, argv, capsys)
    assert code == 0, err


def _expect_bad_input(main, argv, capsys, root, message):
    before = all_files(root)
    code, out, err = run_cli(main, argv, capsys)
    assert code == 2
    errors = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert message in errors[0]
    assert "Traceback" not in err
    assert all_files(root) == before, "bad input must write nothing"


def _plan_file(root, tiny_dir, **changes):
    layers = {"model.layers.0.mlp.up_proj": "rtn:int4:g32:asym"}
    data = {"format": "bitalloc-plan", "version": 1, "model": str(tiny_dir), "layers": layers}
    data.update(changes)
    path = root / "bad_plan.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("case, message", [
    ("missing model", "model not found"),
    ("malformed json", "is not valid JSON"),
    ("unknown layer", "layer 'model.layers.7.mlp.up_proj'"),
    ("unsupported bits", "unsupported format 'int9'"),
    ("missing plan", "plan file not found"),
])
def test_apply_rejects_bad_input_with_one_line(case, message, cli_env, tiny_dir, capsys):
    if case == "missing model":
        path = _plan_file(cli_env, tiny_dir, model=str(cli_env / "no-such-model"))
    elif case == "malformed json":
        path = cli_env / "bad_plan.json"
        path.write_text('{"format": "bitalloc-plan", "layers": {')
    elif case == "unknown layer":
        path = _plan_file(cli_env, tiny_dir, layers={"model.layers.7.mlp.up_proj": "rtn:int4:g32:asym"})
    elif case == "unsupported bits":
        path = _plan_file(cli_env, tiny_dir, layers={"model.layers.0.mlp.up_proj": "rtn:int9:g32:asym"})
    else:
        path = cli_env / "nothing.json"
    _expect_bad_input(apply.main, ["--plan", str(path), "--quiet"], capsys, cli_env, message)


@pytest.mark.parametrize("argv, message", [
    (["--budget", "1.5"], "below the smallest plan"),
    (["--model", "/no/such/dir"], "model not found"),
    (["--space", "rtn:int4:g32:asym,rtn:int11:g32:asym"], "unsupported format 'int11'"),
    (["--solver", "magic"], "unknown solver 'magic'"),
    (["--eval", "c5"], "unknown corpus 'c5'"),
])
def test_search_rejects_bad_input_with_one_line(argv, message, cli_env, tiny_dir, capsys):
    base = ["--model", str(tiny_dir), "--space", SPACE, "--out", "run", *QUICK]
    _expect_bad_input(pipeline.main, base + argv, capsys, cli_env, message)


@pytest.mark.parametrize("module", [pipeline, apply])
def test_help_states_each_default_once(module, capsys):
    from bitalloc.help_format import from_docstring

    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    epilog = from_docstring(module.__doc__)["epilog"]
    assert epilog in text  # the docstring's prose and examples
    text = text.replace(epilog, "")
    assert "(default: None)" not in text
    options = text.split("\n  -")
    assert all(option.lower().count("default") <= 1 for option in options)
    assert "(default: " in text  # defaults the help does not state are still appended


def test_help_shows_a_default_of_zero_and_keeps_the_epilogs_lines():
    import argparse

    from bitalloc.help_format import HelpFormatter
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, epilog="example:\n    run --seed 3")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    text = parser.format_help()
    assert "random seed (default: 0)" in text
    assert "example:\n    run --seed 3" in text


def _command_lines():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    files = [*root.glob("bitalloc/**/*.py"), *root.glob("scripts/*.py"), *root.glob("inference/*.py")]
    return [f for f in files if "ArgumentParser(" in f.read_text() or "script_parser(__file__" in f.read_text()]


@pytest.mark.parametrize("path", _command_lines(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_option_of_every_command_line_is_explained(path):
    """Read from the source (importing ~30 scripts would cost minutes): each parser uses the shared help
    format and each option has a help text."""
    import ast

    tree = ast.parse(path.read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)]
    parsers = [c for c in calls if c.func.attr == "ArgumentParser"]
    shared = [node for node in ast.walk(tree)
              if isinstance(node, ast.Call) and ast.unparse(node.func) == "script_parser"]
    assert parsers or shared  # script_parser (help_format) builds its parser with HelpFormatter
    assert all(any(k.arg == "formatter_class" and ast.unparse(k.value) == "HelpFormatter" for k in c.keywords)
               for c in parsers)
    unexplained = [ast.unparse(c.args[0]) for c in calls
                   if c.func.attr == "add_argument" and not any(k.arg == "help" for k in c.keywords)]
    assert not unexplained, f"options without help: {unexplained}"


def _no_model_work(monkeypatch, *modules):
    """Bad numbers must stop the run before a model is loaded (or profiled), so nothing is lost."""
    for module in modules:
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("loaded the model"))


@pytest.mark.parametrize("argv, message", [
    (["--solver", "optuna", "--held-windows", "0"], "--held-windows must be at least 1"),
    (["--held-seqlen", "0"], "--held-seqlen must be at least 1"),
    (["--time-limit", "-1"], "--time-limit must be above 0"),
    (["--time-limit", "nan"], "--time-limit must be above 0, got nan"),
    (["--front-points", "0"], "--front-points must be at least 1"),
    (["--front-points", "-5"], "--front-points must be at least 1, got -5"),
    (["--latency-batch", "0"], "--latency-batch must be at least 1"),
    (["--span", "-1"], "--span must be 0 or more"),
    (["--seed", "-1"], "--seed must be 0 or more"),
    (["--seed", "9" * 400], "--seed must be 0 or more"),  # beyond a float: refused, not an OverflowError later
    (["--eval-windows", "-1"], "--eval-windows must be 0 or more"),
    (["--budget", "3.5xyz"], "cannot read budget '3.5xyz'"),
    (["--budget", "0.9ms"], "a latency budget needs a latency table"),
    (["--budget", "3.5", "--budget", "5GBOPs", "--compare", "pareto"], "the pareto solver takes one budget"),
])
def test_search_rejects_bad_numbers_before_any_work(argv, message, cli_env, tiny_dir, capsys, monkeypatch):
    _no_model_work(monkeypatch, pipeline)
    base = ["--model", str(tiny_dir), "--space", SPACE, "--out", "run", *QUICK]
    _expect_bad_input(pipeline.main, base + argv, capsys, cli_env, message)


PROFILE_NUMBERS = [
    (["--metrics", "kl", "--kl-windows", "0"], "--kl-windows must be at least 1"),
    (["--kl-windows", "-2"], "--kl-windows must be at least 1"),
    (["--metrics", "kl", "--kl-stride", "0"], "--kl-stride must be at least 1"),
    (["--metrics", "fisher", "--fisher-samples", "0"], "--fisher-samples must be at least 1"),
    (["--metrics", "fisher", "--fisher-samples", "-1"], "--fisher-samples must be at least 1"),
]


@pytest.mark.parametrize("argv, message", PROFILE_NUMBERS)
def test_profile_rejects_bad_numbers_before_any_work(argv, message, cli_env, tiny_dir, capsys, monkeypatch):
    from bitalloc import models, profile

    _no_model_work(monkeypatch, models)
    base = ["--model", str(tiny_dir), "--space", SPACE, "--out", "prof", "--quiet"]
    _expect_bad_input(profile.main, base + argv, capsys, cli_env, message)


@pytest.mark.parametrize("argv, message", PROFILE_NUMBERS + [
    (["--plans", "0"], "--plans must be at least 2"),
    (["--plans", "-3"], "--plans must be at least 2"),
    (["--bits", "5:3"], "needs 0 < LOW <= HIGH"),
    (["--bits", "nan:nan"], "needs 0 < LOW <= HIGH"),
    (["--bits", "4"], "--bits must be LOW:HIGH"),
    (["--profile-batch-size", "0"], "--profile-batch-size must be at least 1"),
    (["--plan-seed", "-1"], "--plan-seed must be 0 or more"),
])
def test_fidelity_rejects_bad_numbers_before_any_work(argv, message, cli_env, tiny_dir, capsys, monkeypatch):
    from bitalloc import fidelity

    _no_model_work(monkeypatch, fidelity)
    base = ["--model", str(tiny_dir), "--space", SPACE, "--out", "fid", *QUICK]
    _expect_bad_input(fidelity.main, base + argv, capsys, cli_env, message)


def test_fidelity_refuses_an_unreachable_bits_range_before_profiling(cli_env, tiny_dir, capsys, monkeypatch):
    from bitalloc import fidelity

    monkeypatch.setattr(fidelity, "profile", lambda *a, **k: pytest.fail("profiled"))
    argv = ["--model", str(tiny_dir), "--space", SPACE, "--out", "fid", "--bits", "20:30", *QUICK]
    _expect_bad_input(fidelity.main, argv, capsys, cli_env, "cannot make plans between 20.0 and 30.0 bits")


@pytest.mark.parametrize("case, message", [
    ("negative limit", "--limit must be above 0"),
    ("malformed json", "is not valid JSON"),
    ("missing plan", "plan file not found"),
    ("not a plan", "plan 'nonsense' is not fp16"),
    ("unknown layer", "layer 'model.layers.7.mlp.up_proj'"),
])
def test_batch_stops_on_a_bad_plan_before_evaluating(case, message, cli_env, tiny_dir, capsys, monkeypatch):
    from bitalloc import batch

    monkeypatch.setattr(batch, "evaluator", lambda *a, **k: pytest.fail("evaluated"))
    (cli_env / "results").mkdir()
    (cli_env / "results" / "ppl_results.txt").write_text("rows from an earlier run\n")
    plans, extra = ["fp16"], []
    if case == "negative limit":
        extra = ["--limit", "-1"]
    elif case == "malformed json":
        (cli_env / "bad_plan.json").write_text('{"format": "bitalloc-plan", "layers": {')
        plans.append("bad_plan.json")
    elif case == "missing plan":
        plans.append("nothing.json")
    elif case == "not a plan":
        plans.append("nonsense")
    else:
        layers = {"model.layers.7.mlp.up_proj": "rtn:int4:g32:asym"}
        plans.append(str(_plan_file(cli_env, tiny_dir, layers=layers)))
    argv = ["--model", str(tiny_dir), "--results", "results", "--quiet", *extra, "--plans", *plans]
    _expect_bad_input(batch.main, argv, capsys, cli_env, message)


def test_batch_skips_a_plan_only_on_the_other_models_of_several(cli_env, tiny_dir):
    from bitalloc import batch
    from bitalloc.cost import layer_shapes
    from bitalloc.errors import BitallocError
    from bitalloc.models import load_model

    loaded = load_model(str(tiny_dir))
    shapes = layer_shapes(loaded.model)
    plans = {"fp16": None, "other.json": batch.read_plan(str(_plan_file(cli_env, tiny_dir, fingerprint="other")))}
    assert list(batch.resolve_plans(plans, loaded, shapes, several=True)) == ["fp16"]
    with pytest.raises(BitallocError, match="plan other.json on .*made for model weights other"):
        batch.resolve_plans(plans, loaded, shapes, several=False)


def test_batch_stops_before_loading_when_a_plan_fits_none_of_several_models(cli_env, tiny_dir, capsys, monkeypatch):
    import shutil

    from bitalloc import batch
    from bitalloc.models import fingerprint_path

    monkeypatch.setattr(batch, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    twin = cli_env / "twin"
    shutil.copytree(tiny_dir, twin)  # the same weights under another name: a fingerprinted plan fits both
    models = ["--models", str(tiny_dir), str(twin)]
    fits = _plan_file(cli_env, tiny_dir, fingerprint=fingerprint_path(tiny_dir))  # what loading records
    batch.check_each_plan_fits_a_model({"fits.json": batch.read_plan(str(fits))}, models[1:])
    stray = _plan_file(cli_env, tiny_dir, fingerprint="other")
    argv = [*models, "--results", "results", "--quiet", "--plans", "fp16", str(stray)]
    _expect_bad_input(batch.main, argv, capsys, cli_env, "was made for")


def _script(name: str):
    return load_script(f"scripts/{name}").main


def test_bench_gptq_times_stages_quantize_model_still_calls():
    from bitalloc import quantize_model

    timed = load_script("scripts/bench_gptq.py").TIMED
    assert all(callable(getattr(quantize_model, name, None)) for name in timed)


@pytest.mark.parametrize("script, argv, message", [
    ("solver_table.py", ["nope"], "results file not found: nope/results.json"),
    ("make_cloze_task.py", ["text.txt", "--out", "task.jsonl", "--questions", "-1"], "--questions must be at least 1"),
    ("make_cloze_task.py", ["text.txt", "--out", "task.jsonl", "--questions", "0"], "--questions must be at least 1"),
    ("make_cloze_task.py", ["text.txt", "--out", "task.jsonl", "--questions", "4"], "only 1 distinct last words"),
    ("bench_solvers.py", ["--budgets", "abc"], "--budgets: 'abc' is not average bits"),
    ("bench_solvers.py", ["--budgets", "4,-1"], "--budgets: '-1' is not average bits"),
])
def test_scripts_reject_bad_input_with_one_line(script, argv, message, cli_env, capsys):
    (cli_env / "text.txt").write_text("The old river runs past the stone bridge near the town. " * 6)
    _expect_bad_input(_script(script), argv, capsys, cli_env, message)


def test_cloze_task_reads_wikitext_and_ptb_layouts(cli_env, capsys):
    words = ["bridge", "river", "meadow", "garden", "castle"]
    wikitext = "\n = Heading = \n\n" + " ".join(f"The old road runs past the quiet stone {w} ." for w in words)
    ptb = "\n".join(f"the old road runs past the quiet stone {w}" for w in words)
    for name, text in (("wiki.txt", wikitext), ("ptb.txt", ptb)):
        (cli_env / name).write_text(text)
        code, _, err = run_cli(_script("make_cloze_task.py"), [name, "--out", "task.jsonl", "--questions", "5"],
                               capsys)
        assert code == 0, err
        rows = [json.loads(line) for line in (cli_env / "task.jsonl").read_text().splitlines()]
        assert sorted(r["choices"][r["gold"]] for r in rows) == sorted(words)
        assert all(not r["query"].endswith(("=", ".")) for r in rows)


def test_profile_interaction_plan_is_checked_against_the_model(cli_env, tiny_dir, capsys):
    from bitalloc import profile

    plan = _plan_file(cli_env, tiny_dir, layers={"model.layers.9.mlp.up_proj": "rtn:int4:g32:asym"})
    argv = ["--model", str(tiny_dir), "--space", SPACE, "--interaction", str(plan), "--nsamples", "2",
            "--calib-seqlen", "16", "--out", "prof", "--quiet"]
    _expect_bad_input(profile.main, argv, capsys, cli_env, "which the model does not have")


def test_search_finds_its_preset_spaces_and_plans_find_their_model_from_any_folder(search_run, tmp_path,
                                                                                    monkeypatch):
    from bitalloc.pipeline import load_space

    monkeypatch.chdir(tmp_path)
    assert [str(o) for o in load_space("rtn-g64", pipeline.build_parser().get_default("space_dir"), None)][0] \
        == "rtn:int2:g64:asym"
    run, _ = search_run
    assert json.loads((run / "plan.json").read_text())["model"].startswith("/")


def test_quant_table_refuses_to_resume_rows_measured_another_way(cli_env, tiny_dir, capsys):
    earlier = {"protocol": {"model": str(tiny_dir), "corpus": "wikitext2", "seqlen": 16, "windows": 2,
                            "calibration": {"source": "wiki", "nsamples": 2, "seqlen": 16, "seed": 0}},
               "rows": {"rtn:int4:g32:asym": {"label": "rtn", "ppl": 9.0}}}
    (cli_env / "table.json").write_text(json.dumps(earlier))
    argv = ["--model", str(tiny_dir), "--json", "table.json", "--markdown", "table.md", "--only", "rtn:int4:g32:asym",
            "--seqlen", "16", "--eval-windows", "3", "--nsamples", "2", "--calib-seqlen", "16", "--quiet"]
    _expect_bad_input(_script("quant_table.py"), argv, capsys, cli_env, "measured with other settings (windows: 2)")


def test_search_and_apply_show_a_bops_budget_and_the_weighted_objective(cli_env, tiny_dir, capsys):
    argv = ["--model", str(tiny_dir), "--space", SPACE, "--budget", "rtn:int3:g32:asym@bops", "--weighting", "params",
            "--out", "run", *QUICK]
    code, out, err = run_cli(pipeline.main, argv, capsys)
    assert code == 0, err
    table_head = next(line for line in out.splitlines() if line.startswith("variant"))
    assert "GBOPs" in table_head and "objective (params)" in table_head
    code, out, err = run_cli(apply.main, ["--plan", "run/plan.json", "--quiet"], capsys)
    assert code == 0, err
    assert "GBOPs" in next(line for line in out.splitlines() if line.startswith("variant"))


def test_an_unreachable_optuna_storage_stops_search_before_loading(cli_env, capsys):
    argv = ["--model", "no-such-model", "--solver", "optuna", "--storage", "sqlite:////no/such/dir/study.db", *QUICK]
    _expect_bad_input(pipeline.main, argv, capsys, cli_env,
                      "cannot open Optuna storage sqlite:////no/such/dir/study.db")


def test_bars_in_logs_are_paced_and_quiet_silences_the_libraries_bars():
    import io

    from tqdm.auto import tqdm

    from bitalloc import progress

    with progress.libraries_quiet(True):
        assert tqdm(range(3), disable=False, file=io.StringIO()).disable  # lm-eval passes disable itself
    assert not tqdm(range(3), disable=False, file=io.StringIO()).disable
    progress.pace_for_logs()  # under pytest stderr is captured: not a terminal
    assert tqdm(range(3), file=io.StringIO()).mininterval == progress.LOG_INTERVAL
    assert tqdm(range(3), file=io.StringIO(), mininterval=0.5).mininterval == 0.5
    log = io.StringIO()
    bar = tqdm(total=3, file=log)
    drawn = log.getvalue()
    bar.set_postfix_str("block 1")
    assert log.getvalue() == drawn  # a postfix waits for the next paced redraw


def test_the_bitalloc_command_names_itself_in_usage_and_errors(capsys):
    from bitalloc.__main__ import main as bitalloc_main

    with pytest.raises(SystemExit):
        bitalloc_main(["report", "--help"])
    assert capsys.readouterr().out.startswith("usage: bitalloc report ")
    with pytest.raises(SystemExit):
        bitalloc_main(["apply"])
    assert "bitalloc apply: error: the following arguments are required: --plan" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        apply.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m bitalloc.apply ")
