"""Batch evaluation -> results files -> one summary table; the Markdown report of a search run."""
import json
from pathlib import Path

import pytest

from bitalloc import batch, data, pipeline, report
from bitalloc.results import LM_EVAL_FILE, PPL_FIELDS, PPL_FILE, read_rows
from conftest import all_files, load_script, run_cli

SPACE = "rtn:int2:g32:asym,rtn:int4:g32:asym,rtn:int8:g32:asym"
QUICK = ["--seqlen", "32", "--eval-windows", "4", "--quiet"]


def script(name):
    return load_script(f"scripts/{name}.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, corpus_dir):
    """One offline working directory (cache, data, cwd) shared by this module's tests."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BITALLOC_CACHE", str(root / "cache"))
        patch.setenv("BITALLOC_DATA", str(corpus_dir))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.chdir(root)
        data.hub_reachable.cache_clear()
        yield root
    data.hub_reachable.cache_clear()


@pytest.fixture(scope="module")
def search_run(workdir, tiny_dir):
    argv = ["--model", str(tiny_dir), "--space", SPACE, "--budget", "4.5", "--out", "run", "--nsamples", "4",
            "--calib-seqlen", "32", *QUICK]
    assert pipeline.main(argv) == 0
    return workdir / "run"


def test_batch_writes_results_and_summary_makes_one_table(search_run, tiny_dir, capsys, caplog):
    task = search_run.parent / "mc.jsonl"
    task.write_text('{"query": "The river", "choices": ["is", "north"], "gold": 0}\n'
                    '{"query": "A city of", "choices": ["the", "song"], "gold": 1}\n')
    argv = ["--model", str(tiny_dir), "--plans", "fp16", "rtn:int4:g32:asym", str(search_run / "plan.json"),
            "--eval", "wikitext2,ptb,c4", "--task-file", str(task), "--results", "results", *QUICK]
    code, out, err = run_cli(batch.main, argv, capsys)
    assert code == 0, err
    skipped = [r.getMessage() for r in caplog.records if "skipping c4" in r.getMessage()]
    assert len(skipped) == 1 and "\n" not in skipped[0]  # said once, in one line, and the run goes on
    rows = read_rows(search_run.parent / "results" / PPL_FILE, PPL_FIELDS)
    assert {(r["plan"], r["corpus"]) for r in rows} == {
        (p, c) for p in ("fp16", "rtn:int4:g32:asym", str(search_run / "plan.json")) for c in ("wikitext2", "ptb", "c4")}
    c4 = [r for r in rows if r["corpus"] == "c4"]
    assert all(r["status"] == "not available" and r["ppl"] == "" for r in c4)
    mixed = next(r for r in rows if r["plan"].endswith("plan.json") and r["corpus"] == "wikitext2")
    plan = json.loads((search_run / "plan.json").read_text())
    assert float(mixed["ppl"]) == pytest.approx(plan["measured"]["ppl"], rel=1e-4)  # same protocol, same number
    int4 = next(r for r in rows if r["plan"] == "rtn:int4:g32:asym" and r["corpus"] == "ptb")
    assert float(int4["kl_mean"]) > 0 and 0 < float(int4["top1"]) <= 1 and float(int4["avg_bits"]) == 5.0
    lm = (search_run.parent / "results" / LM_EVAL_FILE).read_text().splitlines()
    assert lm[0].startswith("model\tplan") and sum("local_mc\t" in line for line in lm) == 6  # 3 plans x acc, acc_norm

    code, out, err = run_cli(script("summarize").main, ["--results", "results", "--format", "markdown"], capsys)
    assert code == 0, err
    table = out.strip().splitlines()
    assert table[0].startswith("| model | plan | avg bits | PPL wikitext2@32 (4w) | PPL ptb@32 (4w) | PPL c4@32 |")
    assert "local_mc acc" in table[0] and len(table) == 2 + 3
    assert all("| n/a |" in line for line in table[2:])  # C4 marked not available in every row

    code, out, err = run_cli(script("plot_results").main, ["--results", "results"], capsys)
    assert code == 0, err
    assert [Path(p).name for p in out.split()] == ["ppl_wikitext2_32_4w.png", "ppl_ptb_32_4w.png"]

    code, _, _ = run_cli(batch.main, argv[:4] + ["--eval", "wikitext2", "--results", "results", *QUICK], capsys)
    assert code == 0
    assert len(read_rows(search_run.parent / "results" / PPL_FILE, PPL_FIELDS)) == 9  # re-measured rows replaced


def test_report_shows_predicted_vs_measured_and_the_figures(search_run, capsys):
    (search_run / "pareto.json").write_text(json.dumps({"kind": "bytes", "points": [
        {"size": 60000, "loss": 0.3}, {"size": 90000, "loss": 0.02}, {"size": 160000, "loss": 1e-4}]}))
    code, out, err = run_cli(report.main, [str(search_run), "--measure", "--quiet"], capsys)
    assert code == 0, err
    text = (search_run / "report" / "report.md").read_text()
    for heading in ("## Results", "## Predicted vs measured loss", "## Size vs loss", "## Bits per layer",
                    "## Sensitivity", "## Per-window perplexity"):
        assert heading in text
    assert "Pareto front from `pareto.json` (3 points)" in text
    assert "Spearman" in text and "uniform rtn:int2:g32:asym" in text and "mixed (ilp)" in text
    for name in ("predicted_vs_measured", "pareto_front", "bits_per_layer", "sensitivity_heatmap", "per_window"):
        png = (search_run / "report" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, name
    measured = json.loads((search_run / "report_measured.json").read_text())
    assert set(measured) == {"uniform rtn:int4:g32:asym", "uniform rtn:int8:g32:asym"}  # int2 was the run's uniform
    before = all_files(search_run)
    code, _, _ = run_cli(report.main, [str(search_run), "--measure", "--quiet"], capsys)
    assert code == 0 and all_files(search_run) == before  # measurements reused, nothing new


def test_report_of_a_missing_run_is_one_line(workdir, capsys):
    code, _, err = run_cli(report.main, ["nowhere"], capsys)
    assert code == 2 and err.strip() == "error: run directory not found: nowhere"


def test_the_printed_table_has_a_ppl_column_per_corpus():
    from bitalloc.summary import header, render, result_row

    one = {"ppl": 30.0, "kl": {"mean": 0.1, "p99": 1.0}, "top1": 0.9}
    measured = {**one, "corpora": {"wikitext2": one, "ptb": {**one, "ppl": 50.0},
                                   "c4": {"available": False, "reason": "no file"}}}
    text = render([result_row("plan", 1_000_000, 4.5, 0.1, measured, 28.0)], header(measured))
    assert text.splitlines()[0].split()[-2:] == ["PPL", "ptb"] and text.splitlines()[2].endswith("50.000")
    assert header(one) == header(None)  # one corpus: the usual columns


def test_the_printed_table_shows_non_size_budgets_and_a_weighted_objective():
    from bitalloc.summary import extra_kinds, header, render, result_row

    extras = extra_kinds({"bytes": 1e6, "bops": 2e9}, "params")
    assert extras == ["bops", "objective"]
    assert extra_kinds({"bytes": 1e6}) == []  # the usual columns
    totals = {"bops": 1.5e9, "objective": 0.25}
    text = render([result_row("plan", 1_000_000, 4.5, 0.1, None, None, extras, totals)],
                  header(None, extras, "params"))
    head, _, row = text.splitlines()
    assert head.split()[6:9] == ["GBOPs", "objective", "(params)"] and row.split()[4:6] == ["1.500", "0.25"]
