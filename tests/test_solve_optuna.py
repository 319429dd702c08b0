"""Optuna refinement: measured loss beats the prediction's plan, budgets hold, workers share a study."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bitalloc.budget import parse_budget
from bitalloc.cost import layer_bytes, layer_shapes
from bitalloc.evaluate import ReferenceCache, evaluate
from bitalloc.models import from_module
from bitalloc.quant import parse
from bitalloc.quantize_model import quantize_model, restore
from bitalloc.solve import build_problem
from bitalloc.solve.measure import HeldKL, LayerBank, bank_measure
from bitalloc.solve.optuna_search import solve_optuna, warm_starts
from bitalloc.table import SensitivityTable
from conftest import tiny_llama
from test_solve_solvers import OPTIONS, random_model

HERE = Path(__file__).resolve().parent


def make_problem(seed=0):
    """A table whose prediction is off: the true loss weighs units by factors the table does not know,
    down projections most (as a metric blind to one layer type would be)."""
    rng = np.random.default_rng(seed)
    shapes, ties, table = random_model(rng)
    problem = build_problem(table, shapes, OPTIONS, ties)
    problem.limits = {"bytes": parse_budget("3.4", shapes).limit}
    hidden = rng.uniform(0.5, 1.5, len(problem.units)) * [3.0 if "down" in u[0] else 1.0 for u in problem.units]
    starts = warm_starts(problem, span=0.25, count=16)

    def measure(choice, report=None):
        per_unit = problem.loss[np.arange(len(choice)), choice] * hidden
        for step, part in enumerate(np.array_split(per_unit, 3)[:-1]):
            if report is not None:
                report(float(per_unit[: (step + 1) * len(part)].sum()), step)
        return float(per_unit.sum())

    return problem, starts, measure


def test_tpe_refinement_beats_the_predicted_optimum_within_the_budget():
    problem, starts, measure = make_problem()
    choice, report = solve_optuna(problem, measure, starts, "tpe", n_trials=40, seed=1)
    assert problem.feasible(choice)
    assert report["free_units"] > 0 and report["trials"] == 40
    assert report["best_measured"] == pytest.approx(measure(choice))
    assert report["best_measured"] < report["start_measured"] == pytest.approx(measure(starts[0]))
    assert report["states"].get("pruned", 0) > 0, "partial windows should stop some hopeless plans"
    assert all(t["size"] <= problem.limits["bytes"] for t in report["measured_trials"])


def test_nsga2_keeps_a_measured_front_and_the_budget():
    problem, starts, measure = make_problem(1)
    choice, report = solve_optuna(problem, measure, starts, "nsga2", n_trials=30, seed=0)
    assert problem.feasible(choice) and report["sampler"] == "nsga2"
    assert report["best_measured"] <= report["start_measured"]
    assert "pruned" not in report["states"]  # multi-objective studies are never pruned


WORKER = """
import sys
sys.path[:0] = [{here!r}, {root!r}]  # works without an installed package too
from test_solve_optuna import make_problem
from bitalloc.solve.optuna_search import solve_optuna, warm_starts
problem, starts, measure = make_problem()
solve_optuna(problem, measure, starts, "tpe", n_trials=10, storage={storage!r}, seed=int(sys.argv[1]))
"""


def run_workers(tmp_path, storage: str, seeds) -> None:
    """One worker process per seed, all at once, each adding 10 trials to the study in `storage`."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(here=str(HERE), root=str(HERE.parent), storage=storage)))
    workers = [subprocess.Popen([sys.executable, str(script), str(seed)], stderr=subprocess.PIPE, text=True)
               for seed in seeds]
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err


def test_two_worker_processes_share_one_study(tmp_path):
    storage = str(tmp_path / "study.db")
    run_workers(tmp_path, storage, (11, 12))
    problem, starts, measure = make_problem()
    shared, report = solve_optuna(problem, measure, starts, "tpe", n_trials=0, storage=storage)
    assert report["trials"] == 20 and report["workers"] == 2
    single, single_report = solve_optuna(problem, measure, starts, "tpe", n_trials=20, seed=11)
    for choice, rep in ((shared, report), (single, single_report)):  # the same kind of plan either way
        assert problem.feasible(choice) and choice.shape == (len(problem.units),)
        assert rep["best_measured"] <= rep["start_measured"]
        assert rep["best_measured"] == pytest.approx(measure(choice))
    assert report["study"] == single_report["study"]  # same table, budget and space: same study name


def test_bank_measures_what_apply_deploys(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer))
    loaded = from_module(model)
    shapes = layer_shapes(model)
    options = [parse("rtn:int2:g32:asym"), parse("rtn:int4:g32:asym")]
    rows = [{"layer": s.name, "option": str(o), "error": 1.0 / o.bits, "bytes": layer_bytes(s, o), "numel": s.numel}
            for s in shapes for o in options]
    problem = build_problem(SensitivityTable({}, rows), shapes, options)
    windows = torch.randint(0, len(tokenizer), (4, 24), generator=torch.Generator().manual_seed(0))
    held = HeldKL(loaded, windows, None, chunk=2, batch_size=2)
    before = evaluate(model, windows, batch_size=2, progress=False)["ppl"]
    bank = LayerBank(loaded, {s.name: options for s in shapes}, progress=False)
    measure = bank_measure(problem, bank, held)
    choice = np.arange(len(problem.units)) % 2
    steps = []
    measured = measure(choice, lambda value, step: steps.append(step))
    assert steps == [0] and measured > 0
    assert measure(np.zeros_like(choice)) > measured  # all at 2 bits hurts more
    bank.restore()
    assert evaluate(model, windows, batch_size=2, progress=False)["ppl"] == pytest.approx(before)
    reference = ReferenceCache(None, loaded.fingerprint, windows, 2)
    evaluate(model, windows, reference, True, 2, progress=False)
    originals = quantize_model(loaded, problem.assignment(choice), progress=False)
    deployed = evaluate(model, windows, reference, False, 2, progress=False)["kl"]["mean"]
    restore(model, originals)
    assert measured == pytest.approx(deployed, rel=1e-4)


def test_refit_recovers_group_factors_the_table_missed():
    from bitalloc.solve.refit import fit_weights, unit_groups

    problem, starts, _ = make_problem()
    groups = unit_groups(problem)
    assert len(set(groups)) == 4 * 3  # units q/k/v, o, gate/up, down x three thirds of the depth
    truth = np.random.default_rng(5).uniform(0.5, 3.0, groups.max() + 1)
    rng = np.random.default_rng(6)
    plans = [rng.integers(0, len(problem.options), len(problem.units)) for _ in range(60)]
    rows = np.arange(len(problem.units))
    measured = [float((problem.objective[rows, p] * truth[groups]).sum()) for p in plans]
    assert np.allclose(fit_weights(problem, groups, plans, measured, prior=1e-9), truth, rtol=1e-3)
