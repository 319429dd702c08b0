"""Zero/few-shot tasks through the lm-evaluation-harness, on the (quantized) model in memory.

Tasks are named as lm-eval names them (arc_easy, hellaswag, piqa, winogrande,
boolq, or any other), or given as local files so it runs offline:
  *.jsonl      a multiple-choice task, one question a line:
               {"query": "...", "choices": ["...", "..."], "gold": 0}
               ("question" is accepted for "query", "answer" for "gold", and
               "gold" may also be the text of the right choice); the task is
               named after the file ("local_<stem>"), accuracy and
               length-normalised accuracy are reported
  *.yaml       an lm-eval task config of your own (its `task:` is its name)
A task whose data cannot be reached (no hub, no local copy) is reported in
one line and skipped; the others still run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

from .data import hub_reachable
from .errors import BitallocError
from .progress import libraries_quiet

log = logging.getLogger(__name__)

def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise BitallocError("lm-eval tasks need the lm-evaluation-harness: pip install 'bitalloc[eval]'") from None


def _gold(row: dict, where: str) -> int:
    gold = row.get("gold", row.get("answer"))
    if isinstance(gold, str) and gold in row["choices"]:
        return row["choices"].index(gold)
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(row["choices"]):
        raise BitallocError(f"{where}: 'gold' must index 'choices' (or be one of them), got {gold!r}")
    return gold


def read_local_task(path: Path) -> list[dict]:
    """Rows of a local multiple-choice JSONL task, checked, as {"query", "choices", "gold"}."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BitallocError(f"cannot read task file {path}: {err}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError:
            raise BitallocError(f"{where}: not valid JSON") from None
        query = row.get("query", row.get("question")) if isinstance(row, dict) else None
        choices = row.get("choices") if isinstance(row, dict) else None
        if not isinstance(query, str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) for c in choices):
            raise BitallocError(f"{where}: expected {{\"query\": str, \"choices\": [str, str, ...], \"gold\": int}}")
        rows.append({"query": query, "choices": choices, "gold": _gold(row, where)})
    if not rows:
        raise BitallocError(f"task file {path} has no questions")
    return rows


def local_task_config(path: Path) -> dict:
    """An lm-eval task config (a dict, as its Python API takes) for a local JSONL task."""
    read_local_task(path)
    return {
        "task": f"local_{path.stem}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": lambda doc: doc.get("query", doc.get("question")),
        "doc_to_choice": lambda doc: doc["choices"],
        "doc_to_target": lambda doc: _gold(doc, "task row"),
        "target_delimiter": " ",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }


@contextlib.contextmanager
def _offline_unless_reachable():
    """With no hub, make `datasets` fail at once instead of retrying for minutes (restored afterwards)."""
    if hub_reachable():
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _task_specs(tasks: list[str], task_files: list[str]) -> tuple[list, list[str]]:
    """lm-eval task specs (names or config dicts) and the include paths their YAML files need."""
    specs, include = list(tasks), []
    for file in task_files:
        path = Path(file)
        if not path.is_file():
            raise BitallocError(f"task file not found: {path}")
        if path.suffix == ".jsonl":
            specs.append(local_task_config(path))
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                name = yaml.safe_load(path.read_text()).get("task")
            except (yaml.YAMLError, AttributeError):
                name = None
            if not isinstance(name, str):
                raise BitallocError(f"task file {path}: an lm-eval YAML config needs a 'task:' name")
            include.append(str(path.parent.resolve()))
            specs.append(name)
        else:
            raise BitallocError(f"task file {path}: expected .jsonl (multiple choice) or an lm-eval .yaml config")
    if not specs:
        raise BitallocError("no lm-eval task given (name tasks, e.g. arc_easy,piqa, or give a local task file)")
    return specs, include


def _task_name(spec) -> str:
    return spec["task"] if isinstance(spec, dict) else spec


def _metrics(entry: dict) -> dict[str, dict]:
    """{"acc": {"value": .., "stderr": ..}, ...} from one task's lm-eval result."""
    out = {}
    for key, value in entry.items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, filt = key.split(",", 1)
        stderr = entry.get(f"{metric}_stderr,{filt}")
        name = metric if filt == "none" else f"{metric}[{filt}]"
        out[name] = {"value": float(value),
                     "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None}
    return out


def run_tasks(loaded, tasks: list[str], task_files: list[str] = (), num_fewshot: int | None = None,
              limit: int | float | None = None, batch_size: int = 4, device="cpu", seed: int = 0,
              progress: bool = True) -> dict:
    """Run lm-eval tasks on `loaded.model` as it is now (quantized or not); `progress` False silences
    the bars of lm-eval and datasets too.

    Returns {"tasks": {name: {"metrics": {...}, "samples": n, "num_fewshot": k}},
             "unavailable": {name: reason}}.
    """
    _require_lm_eval()
    logging.getLogger("lm_eval").setLevel(max(logging.ERROR, log.getEffectiveLevel()))  # its notes on our use
    specs, include = _task_specs(list(tasks), list(task_files))
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    named = [s for s in specs if isinstance(s, str)]
    manager = TaskManager(include_path=include or None, include_defaults=len(named) > len(include))
    for name in named:
        if name not in manager.all_tasks:
            raise BitallocError(f"unknown lm-eval task '{name}' (see `lm-eval ls tasks`, or give a local task file)")
    reachable, unavailable = [], {}
    with _offline_unless_reachable(), libraries_quiet(not progress):
        for spec in specs:
            try:
                get_task_dict([spec], manager)
                reachable.append(spec)
            except Exception as err:  # datasets raises many kinds (ConnectionError, DatasetNotFoundError, ...)
                reason = " ".join(str(err).split()) or type(err).__name__
                unavailable[_task_name(spec)] = f"data cannot be reached ({reason[:200]})"
                log.warning("lm-eval task %s skipped: its data cannot be reached (%s); use a local task file "
                            "or make the Hugging Face hub reachable", _task_name(spec), reason[:200])
        if not reachable:
            return {"tasks": {}, "unavailable": unavailable}
        model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, device=str(device), batch_size=batch_size)
        output = simple_evaluate(model=model, tasks=reachable, num_fewshot=num_fewshot, limit=limit,
                                 task_manager=manager, log_samples=False, bootstrap_iters=1000,
                                 random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                 fewshot_random_seed=seed)
    results = {}
    for spec in reachable:
        name = _task_name(spec)
        entry = output["results"].get(name, {})
        results[name] = {"metrics": _metrics(entry), "samples": output.get("n-samples", {}).get(name, {}).get("effective"),
                         "num_fewshot": output.get("n-shot", {}).get(name, num_fewshot)}
    return {"tasks": results, "unavailable": unavailable}
