"""The batch results files and the one table made from them.

`results/ppl_results.txt` and `results/lm_eval_results.txt` are tab-separated
tables with a header line, one row per measurement.  A new batch run replaces
the rows it measured again (same key) and keeps every other row, so several
runs, machines or models accumulate into one file.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from . import atomic
from .errors import BitallocError
from .summary import render

PPL_FILE = "ppl_results.txt"
LM_EVAL_FILE = "lm_eval_results.txt"
PPL_FIELDS = ("model", "plan", "avg_bits", "bytes", "corpus", "seqlen", "windows", "ppl", "dppl", "kl_mean",
              "kl_median", "kl_p99", "top1", "status", "date")
PPL_KEY = ("model", "plan", "corpus", "seqlen", "windows")
LM_FIELDS = ("model", "plan", "avg_bits", "task", "num_fewshot", "limit", "metric", "value", "stderr", "status",
             "date")
LM_KEY = ("model", "plan", "task", "num_fewshot", "limit", "metric")
NOT_AVAILABLE = "not available"


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("\t", " ").replace("\n", " ")


def read_rows(path: Path, fields: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        return []
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")), delimiter="\t")
    if tuple(reader.fieldnames or ()) != fields:
        raise BitallocError(f"{path}: unexpected columns {reader.fieldnames} (expected {list(fields)})")
    return list(reader)


def merge_rows(path: Path, fields: tuple[str, ...], key: tuple[str, ...], new: list[dict]) -> list[dict]:
    """Write `path` with `new` rows replacing any old row of the same key (under a lock: runs sharing the file
    take turns); returns all rows."""
    with atomic.locked(path):
        rows = {tuple(r[k] for k in key): r for r in read_rows(path, fields)}
        for row in new:
            cells = {f: _cell(row.get(f)) for f in fields}
            rows[tuple(cells[k] for k in key)] = cells
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows.values())
        atomic.write_text(path, buffer.getvalue())
    return list(rows.values())


def ppl_rows(model: str, plan: str, avg_bits, bytes_, protocol: dict, measured: dict, date: str) -> list[dict]:
    """One row per corpus of an evaluation result (see evaluate.Evaluation), unavailable ones marked."""
    by_corpus = measured.get("corpora") or {protocol["corpus"]: measured}
    rows = []
    for corpus, result in by_corpus.items():
        base = {"model": model, "plan": plan, "avg_bits": avg_bits, "bytes": bytes_, "corpus": corpus,
                "seqlen": protocol["seqlen"], "date": date}
        if result.get("available") is False:
            rows.append({**base, "windows": "", "status": NOT_AVAILABLE})
            continue
        kl = result.get("kl", {})
        rows.append({**base, "windows": result["windows"], "ppl": result["ppl"], "dppl": result.get("dppl"),
                     "kl_mean": kl.get("mean"), "kl_median": kl.get("median"), "kl_p99": kl.get("p99"),
                     "top1": result.get("top1"), "status": "ok"})
    return rows


def lm_eval_rows(model: str, plan: str, avg_bits, harness: dict, num_fewshot, limit, date: str) -> list[dict]:
    base = {"model": model, "plan": plan, "avg_bits": avg_bits, "num_fewshot": num_fewshot, "limit": limit,
            "date": date}
    rows = [{**base, "task": task, "metric": metric, "value": m["value"], "stderr": m["stderr"], "status": "ok"}
            for task, entry in harness["tasks"].items() for metric, m in entry["metrics"].items()]
    rows += [{**base, "task": task, "metric": "", "status": NOT_AVAILABLE} for task in harness["unavailable"]]
    return rows


def _float(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _column(row: dict) -> tuple[str, str, str]:
    return row["corpus"], row["seqlen"], row["windows"]


def _label(column: tuple[str, str, str]) -> str:
    corpus, seqlen, windows = column
    return f"{corpus}@{seqlen}" + (f" ({windows}w)" if windows else "")


def summary_table(ppl: list[dict], lm: list[dict], metric: str = "acc") -> tuple[list[str], list[list[str]]]:
    """One row per (model, plan): bits, PPL per protocol (corpus, seqlen, windows), dPPL / KL / top-1 on the
    first protocol that has a reference, and task accuracies."""
    variants = list(dict.fromkeys((r["model"], r["plan"]) for r in [*ppl, *lm]))
    columns = list(dict.fromkeys(_column(r) for r in ppl))
    tasks = list(dict.fromkeys(r["task"] for r in lm))
    compared = next((c for c in columns if any(_column(r) == c and r["kl_mean"] for r in ppl)), None)
    header = ["model", "plan", "avg bits"] + [f"PPL {_label(c)}" for c in columns]
    header += [f"dPPL {_label(compared)}", "KL mean", "top-1"] if compared else []
    header += [f"{t} {metric}" for t in tasks] + (["mean acc"] if tasks else [])
    rows = []
    for model, plan in variants:
        mine = [r for r in ppl if (r["model"], r["plan"]) == (model, plan)]
        bits = next((r["avg_bits"] for r in [*mine, *lm] if (r["model"], r["plan"]) == (model, plan)
                     and r["avg_bits"]), "")
        row = [model, plan, f"{float(bits):.3f}" if _float(bits) is not None else "-"]
        cells = {_column(r): r for r in mine}
        for column in columns:
            r = cells.get(column)
            row.append("n/a" if r and r["status"] == NOT_AVAILABLE else
                       f"{float(r['ppl']):.3f}" if r and _float(r["ppl"]) is not None else "-")
        if compared:
            r = cells.get(compared, {})
            row += [f"{v:{spec}}" if v is not None else "-" for v, spec in
                    ((_float(r.get("dppl")), "+.3f"), (_float(r.get("kl_mean")), ".4f"), (_float(r.get("top1")), ".4f"))]
        scores = []
        for task in tasks:
            hit = [r for r in lm if (r["model"], r["plan"], r["task"]) == (model, plan, task)]
            value = next((_float(r["value"]) for r in hit if r["metric"] == metric), None)
            if value is not None:
                scores.append(value)
            row.append("n/a" if hit and hit[0]["status"] == NOT_AVAILABLE else
                       f"{value:.4f}" if value is not None else "-")
        if tasks:
            row.append(f"{sum(scores) / len(scores):.4f}" if scores else "-")
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def summarize(results_dir: Path, fmt: str = "text", metric: str = "acc") -> str:
    ppl = read_rows(results_dir / PPL_FILE, PPL_FIELDS)
    lm = read_rows(results_dir / LM_EVAL_FILE, LM_FIELDS)
    if not ppl and not lm:
        raise BitallocError(f"no results in {results_dir} (expected {PPL_FILE} or {LM_EVAL_FILE})")
    header, rows = summary_table(ppl, lm, metric)
    return markdown(header, rows) if fmt == "markdown" else render(rows, header=header)
