"""Optuna refinement: search per-unit options by *measured* loss, starting from the predicted optimum.

Sensitivities are not perfectly additive, so the table's optimum is not the
model's.  This search asks the model: each trial picks an option per unit,
`measure(choice, report)` returns its real loss (the pipeline passes the KL
divergence on held calibration windows, computed from a bank of pre-quantized
layers so a trial costs one forward pass), and the best feasible trial wins.

- Search space: per unit (layer or tie group), the options that the warm-start
  plans (the ILP plan and the predicted Pareto front around the budget) use;
  units they all agree on stay fixed.  The search explores where the prediction
  is uncertain instead of the whole, mostly hopeless, product space.
- Warm start: those plans are enqueued first (once per study, however many workers).
- Budgets: every limit is an Optuna constraint (`trial.set_constraint`, value
  <= 0 is feasible); an infeasible trial is not measured.  With `repair`, a
  sampled plan is first moved onto the budget by the prediction (`project`);
  queued plans (warm starts, re-fitted proposals) are measured as given.
- Proposals: after each trial, the ILP on the table re-weighted by all
  measurements so far (`refit`) queues its plan, unless already measured.
- Samplers: `tpe` (single objective, pruning on partial windows through the
  `report(value, step)` callback; queued plans always run to the end) and `nsga2` (objectives: loss and size, so the
  study also holds a measured front).
- Storage: in memory, a SQLite file, or any RDB URL (PostgreSQL, MySQL): several
  processes or machines given the same storage and study name share one study.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import warnings
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ..errors import BitallocError, first_line
from .problem import Problem
from .refit import refit_plan

log = logging.getLogger(__name__)
SAMPLERS = ("tpe", "nsga2")
# measure(choice, report) -> loss; report(partial loss, step) may raise optuna.TrialPruned
Measure = Callable[[np.ndarray, Callable[[float, int], None] | None], float]


def storage_url(spec: str | None) -> str | None:
    """A storage spec as an RDB URL: None stays in memory; a plain path is a SQLite file."""
    if spec is None or "://" in spec:
        return spec
    return f"sqlite:///{os.path.abspath(spec)}"


def shown_url(url: str | None) -> str | None:
    """The URL without its password, for reports and logs."""
    if url is None:
        return None
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_storage(url: str | None, attempts: int = 5):
    """The storage behind `url`; retried because workers starting together race to create the schema."""
    import optuna

    if url is None:
        return optuna.storages.InMemoryStorage()
    extra = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(attempts):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=extra)
            if url.startswith("sqlite"):
                _serialise_sqlite(storage.engine)
            return storage
        except Exception as err:  # bad URL, server down, missing driver, schema race: one clear line at the end
            racing = any(sign in type(err).__name__ + str(err) for sign in ("IntegrityError", "already exists"))
            if attempt + 1 == attempts or not racing:
                raise BitallocError(f"cannot open Optuna storage {shown_url(url)}: {first_line(err)}") from None
            time.sleep(0.5 * (attempt + 1))


def _serialise_sqlite(engine) -> None:
    """Make every SQLite transaction take the write lock at BEGIN.

    SQLite ignores SELECT ... FOR UPDATE, so two workers could both read the
    same queued trial as waiting and both run it; with BEGIN IMMEDIATE the
    second one waits and then sees it taken (SQLAlchemy's recipe for SQLite).
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(connection, _record):
        connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()


def warm_starts(problem: Problem, span: float = 0.1, count: int = 16) -> list[np.ndarray]:
    """The ILP plan, then `count` plans of the exact predicted front with sizes within `span` of the budget.

    Plans over the budget are not tried as they are, but their options widen the
    search space upwards: trading bits between units needs both directions.
    """
    from .ilp import solve_ilp
    from .pareto import ExactFront

    starts = [solve_ilp(problem)[0]]
    if set(problem.limits) == {problem.size_kind} and span > 0:
        front = ExactFront(problem.with_limits({}))
        limit = problem.limits[problem.size_kind]
        for budget in np.linspace(max(limit * (1 - span), front.sizes[0]), limit * (1 + span), count):
            choice = front.choice(budget)
            if not any(np.array_equal(choice, s) for s in starts):
                starts.append(choice)
    return starts


def project(problem: Problem, choice: np.ndarray) -> np.ndarray | None:
    """The sampled plan moved onto the budget by the prediction: while over, downgrade the unit that
    loses least objective per cost saved; then upgrade greedily into what is left.  None if it cannot fit."""
    from .baselines import _trade_kind, greedy_fill

    trade = problem.costs[_trade_kind(problem)]
    rows = np.arange(len(problem.units))
    choice = np.array(choice)
    for _ in range(trade.size):
        if problem.feasible(choice):
            return greedy_fill(problem, choice)[0]
        saved = trade[rows, choice][:, None] - trade
        worse = problem.objective - problem.objective[rows, choice][:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(saved > 0, worse / saved, np.inf)
        if not np.isfinite(ratio).any():
            break
        unit, option = np.unravel_index(int(ratio.argmin()), ratio.shape)
        choice[unit] = option
    return None


def search_space(problem: Problem, starts: list[np.ndarray]) -> list[list[int]]:
    """Per unit, the sorted option indices any warm-start plan uses."""
    return [sorted({int(c[u]) for c in starts}) for u in range(len(problem.units))]


def default_study_name(problem: Problem, space: list[list[int]], sampler: str) -> str:
    """Same table, budget, space and sampler -> same name, so workers find each other."""
    digest = hashlib.sha256()
    for array in (problem.objective, *(problem.costs[k] for k in sorted(problem.costs))):
        digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    digest.update(repr((sorted(problem.limits.items()), space, sampler, [str(o) for o in problem.options])).encode())
    return f"bitalloc-{sampler}-{digest.hexdigest()[:12]}"


def _sampler(name: str, seed: int, starts: int):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(starts, 1))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, min(starts, 24)))
    raise BitallocError(f"unknown Optuna sampler '{name}' (known: {', '.join(SAMPLERS)})")


def solve_optuna(problem: Problem, measure: Measure | None = None, starts: list[np.ndarray] | None = None,
                 sampler: str = "tpe", n_trials: int | None = 50, timeout: float | None = None,
                 storage: str | None = None, study_name: str | None = None, seed: int | None = None,
                 prune: bool = True, repair: bool = True, refit: bool = True,
                 progress: bool = False) -> tuple[np.ndarray, dict]:
    """The best feasible plan by measured loss after this worker's trials (and any other worker's)."""
    import optuna

    if measure is None:
        raise BitallocError("the optuna solver measures plans on the model: run it through search.sh")
    if sampler not in SAMPLERS:
        raise BitallocError(f"unknown Optuna sampler '{sampler}' (known: {', '.join(SAMPLERS)})")
    problem.check_limits()
    starts = warm_starts(problem) if starts is None else starts
    space = search_space(problem, [np.asarray(s) for s in starts])
    starts = [np.asarray(s) for s in starts if problem.feasible(s)]
    if not starts:
        raise BitallocError("optuna: no warm-start plan fits the budget")
    names = [unit[0] for unit in problem.units]
    labels = [str(o) for o in problem.options]
    option_index = {label: i for i, label in enumerate(labels)}
    free = [u for u, cands in enumerate(space) if len(cands) > 1]
    base = np.array([cands[0] for cands in space])
    url = storage_url(storage)
    study_name = study_name or default_study_name(problem, space, sampler)
    directions = ["minimize"] if sampler == "tpe" else ["minimize", "minimize"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        study = optuna.create_study(
            storage=open_storage(url), study_name=study_name, load_if_exists=True, directions=directions,
            sampler=_sampler(sampler, seed if seed is not None else int.from_bytes(os.urandom(4), "little"),
                             len(starts)),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=max(3, len(starts) // 2))
            if prune and sampler == "tpe" else optuna.pruners.NopPruner(),
        )
    except ValueError as err:
        raise BitallocError(f"Optuna study '{study_name}': {err}") from None
    size = problem.size_kind
    for i, start in enumerate(starts):
        study.enqueue_trial({names[u]: labels[start[u]] for u in free}, user_attrs={"start": i},
                            skip_if_exists=True)

    def objective(trial):
        choice = base.copy()
        for u in free:
            choice[u] = option_index[trial.suggest_categorical(names[u], [labels[o] for o in space[u]])]
        queued = "start" in trial.user_attrs or "refit" in trial.user_attrs  # measured as given, never pruned
        if repair and not queued:
            projected = project(problem, choice)
            choice = choice if projected is None else projected
        trial.set_user_attr("plan", [int(o) for o in choice])
        for kind, limit in problem.limits.items():
            trial.set_constraint(kind, problem.total(kind, choice) - limit)
        trial.set_user_attr("predicted", problem.total("loss", choice))
        trial.set_user_attr("size", problem.total(size, choice))
        trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
        key = tuple(int(o) for o in choice)
        if key not in known:
            known.update(_finished(study))
        if not problem.feasible(choice):
            loss = math.inf
        elif key in known:  # measured before (here or by another worker): no forward pass
            loss = known[key]
            trial.set_user_attr("repeat", True)
        else:
            def report(value: float, step: int) -> None:
                if len(directions) == 1 and prune and not queued:
                    trial.report(value, step)
                    if trial.should_prune():
                        raise optuna.TrialPruned()

            loss = float(measure(choice, report))
        return loss if len(directions) == 1 else (loss, problem.total(size, choice))

    def propose(study, trial) -> None:
        """Enqueue the ILP's plan under the table re-weighted by every measurement so far."""
        measured = [(np.array(p), v) for p, v in _finished(study).items() if math.isfinite(v)]
        if len(measured) < 4:
            return
        plans, values = [p for p, _ in measured], [v for _, v in measured]
        rng = np.random.default_rng(trial.number)
        for attempt in range(4):  # the fit itself, then bootstrap resamples until a plan not measured yet
            plan = refit_plan(problem, space, plans, values, rng if attempt else None)
            if tuple(int(o) for o in plan) not in known:
                study.enqueue_trial({names[u]: labels[plan[u]] for u in free}, user_attrs={"refit": trial.number},
                                    skip_if_exists=True)
                return

    known: dict[tuple, float] = {}
    start_time = time.perf_counter()
    done_before = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    bar = tqdm(total=n_trials, desc="optuna trials", unit="trial", disable=not progress)

    def show(study, trial) -> None:
        bar.update()
        values = [v for v in _finished(study).values() if math.isfinite(v)]
        if values:
            bar.set_postfix_str(f"best KL {min(values):.4g}", refresh=False)

    try:
        study.optimize(objective, n_trials=n_trials, timeout=timeout, gc_after_trial=False,
                       callbacks=[*([show] if progress else []), *([propose] if refit else [])])
    except ValueError as err:  # a distribution that clashes with an existing study of that name
        raise BitallocError(f"Optuna study '{study_name}' was made for another search space: {err}") from None
    finally:
        bar.close()
    seconds = time.perf_counter() - start_time
    return _best(problem, study, {
        "solver": "optuna", "sampler": sampler, "study": study_name, "storage": shown_url(url),
        "free_units": len(free), "repair": repair, "refit": refit, "space_size": float(np.prod([len(c) for c in space], dtype=float)),
        "worker_trials": sum(t.state.is_finished() for t in study.get_trials(deepcopy=False)) - done_before, "seconds": round(seconds, 2),
    })


def _finished(study) -> dict[tuple, float]:
    from optuna.trial import TrialState

    return {tuple(t.user_attrs["plan"]): t.values[0]
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "plan" in t.user_attrs}


def _best(problem, study, report) -> tuple[np.ndarray, dict]:
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    finished = [t for t in trials if t.state == TrialState.COMPLETE and math.isfinite(t.values[0])]
    if not finished:
        raise BitallocError(f"Optuna study '{report['study']}' has no finished feasible trial yet")
    best = min(finished, key=lambda t: t.values[0])
    choice = np.array(best.user_attrs["plan"])
    starts = [t for t in finished if "start" in t.user_attrs]
    first = min(starts, key=lambda t: t.user_attrs["start"]) if starts else None
    predicted = [t.user_attrs["predicted"] for t in finished]
    measured = [t.values[0] for t in finished]
    report.update({
        "trials": len(trials),
        "states": {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)},
        "infeasible": sum(t.state == TrialState.COMPLETE and not math.isfinite(t.values[0]) for t in trials),
        "repeats": sum(bool(t.user_attrs.get("repeat")) for t in trials),
        "refit_trials": sum("refit" in t.user_attrs for t in trials),
        "workers": len({t.user_attrs.get("worker") for t in trials if "worker" in t.user_attrs}),
        "best_trial": best.number, "best_measured": best.values[0], "best_predicted": best.user_attrs["predicted"],
        "start_measured": first.values[0] if first else None,
        "start_predicted": first.user_attrs["predicted"] if first else None,
        "spearman_predicted_measured": _spearman(predicted, measured),
        "measured_trials": [{"number": t.number, "size": t.user_attrs["size"], "predicted": t.user_attrs["predicted"],
                             "measured": t.values[0]} for t in finished],
    })
    if not problem.feasible(choice):
        raise BitallocError("optuna's best trial breaks the budget (a study made for another budget?)")
    return choice, report


def _spearman(a, b) -> float | None:
    if len(a) < 3:
        return None
    from scipy.stats import spearmanr

    value = spearmanr(a, b).statistic
    return None if not math.isfinite(value) else float(value)
