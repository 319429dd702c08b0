"""search.sh with every solver on a tiny model: one table compares them, the run directory holds it all."""
import json

from bitalloc import pipeline
from conftest import run_cli
from test_cli import QUICK, SPACE


def test_search_with_optuna_compares_every_solver_and_writes_the_front_and_report(cli_env, tiny_dir, capsys):
    argv = ["--model", str(tiny_dir), "--space", SPACE, "--budget", "rtn:int3:g32:asym", "--out", "run",
            "--solver", "optuna", "--compare", "all", "--n-trials", "6", "--held-windows", "4",
            "--held-seqlen", "32", "--tie", "fused", *QUICK]
    code, out, err = run_cli(pipeline.main, argv, capsys)
    assert code == 0, err
    run = cli_env / "run"
    for name in ("plan.json", "pareto.json", "pareto.png", "report.md", "optuna.db", "optuna_trials.png",
                 "results.json", "bits_per_layer.png"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    variants = results["variants"]
    assert {"uniform rtn:int3:g32:asym", "mixed (rules)", "mixed (greedy)", "mixed (annealing)", "mixed (pareto)",
            "mixed (ilp)", "mixed (optuna)"} <= set(variants)
    for line in ("mixed (rules)", "mixed (optuna)", "uniform rtn:int3:g32:asym"):
        assert line in out
    limit = json.loads((run / "plan.json").read_text())["budget"]["limit"]
    assert all(v["bytes"] <= limit for k, v in variants.items() if k != "unquantized")
    predicted = {k: v["predicted_loss"] for k, v in variants.items() if k != "unquantized"}
    assert predicted["mixed (ilp)"] <= min(predicted.values()) * (1 + 1e-6)
    optuna = results["solvers"]["optuna"]
    assert optuna["trials"] == 6 and optuna["start_measured"] >= optuna["best_measured"]
    plan = json.loads((run / "plan.json").read_text())
    assert plan["solver"]["solver"] == "optuna" and plan["measured"] == variants["mixed (optuna)"]["measured"]
    for group in plan["tie_groups"]:
        assert len({plan["layers"][layer] for layer in group}) == 1
    front = json.loads((run / "pareto.json").read_text())
    assert front["method"] == "exact" and len(front["points"]) > 3 and "mixed (optuna)" in front["variants"]
    report = (run / "report.md").read_text()
    assert "Predicted vs measured" in report and "Held-window KL of the ILP plan" in report
