"""python -m bitalloc.report RUN_DIR: a Markdown report of a search run, with PNG figures.

Reads what `bash search.sh` left in the run directory (plan.json, results.json,
sensitivity.json, any other plan files and a Pareto front JSON when the solver
wrote one) and writes RUN_DIR/report/report.md with: the results table
(every variant, every corpus), predicted vs measured loss, the size/loss front
with the chosen plan and baselines, bits per layer, the sensitivity of every
layer to every option, and per-window perplexity.

With --measure, each option of the table applied uniformly (and any --plans)
is also quantized and evaluated under the run's protocol, so predicted vs
measured loss has more than two points; those measurements are cached in
RUN_DIR/report_measured.json and reused.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path

from . import atomic, plots, safe_json
from .errors import BitallocError, cli_entry
from .help_format import HelpFormatter, from_docstring, program
from .plan import Plan
from .quant import parse
from .results import markdown
from .table import SensitivityTable

log = logging.getLogger(__name__)

MEASURED_FILE = "report_measured.json"

# What the report reads from a run's JSON files (see `check_shape`): every key optional, each of its kind.
NUMBER, NUMBER_OR_NULL, POSITIVE, TEXT = "a number", "a number or null", "a positive number", "a string"
CORPUS_RESULT = {"ppl": POSITIVE, "top1": NUMBER, "kl": {"mean": NUMBER, "median": NUMBER, "p99": NUMBER},
                 "per_window": {"ppl": [POSITIVE]}}
ASSIGNMENT = {str: TEXT}
VARIANT = {"bytes": NUMBER_OR_NULL, "avg_bits": NUMBER_OR_NULL, "predicted_loss": NUMBER_OR_NULL,
           "measured": {**CORPUS_RESULT, "corpora": {str: CORPUS_RESULT}}, "layers": ASSIGNMENT,
           "assignment": ASSIGNMENT}
RESULTS = {"evaluation": {"corpus": TEXT}, "variants": {str: VARIANT}}
TABLE_ROW = {"layer": TEXT, "error": NUMBER, "bytes": NUMBER, "numel": POSITIVE}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program("python -m bitalloc.report"), formatter_class=HelpFormatter,
                                     **from_docstring(__doc__))
    parser.add_argument("run_dir", help="a run directory written by bash search.sh")
    parser.add_argument("--out", default=None, help="report directory (default RUN_DIR/report)")
    parser.add_argument("--measure", action="store_true",
                        help="also quantize and evaluate each option uniformly (and --plans) under the run's protocol")
    parser.add_argument("--plans", nargs="*", default=[], help="with --measure: more plan.json files or options")
    parser.add_argument("--device", default="auto", help="device for --measure")
    parser.add_argument("--data-dir", default=None, help="local corpora for --measure (default $BITALLOC_DATA, else "
                        "the directory the run's search read, where it still exists)")
    parser.add_argument("--cache-dir", default=None, help="reference/profile caches for --measure")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _read_json(path: Path):
    if not path.exists():
        raise BitallocError(f"{path} not found: is {path.parent} a run directory of bash search.sh?")
    return safe_json.load_json(path, "run file")


def _fits(value, kind: str) -> bool:
    if kind == TEXT:
        return isinstance(value, str)
    if value is None:
        return kind == NUMBER_OR_NULL
    number = safe_json.is_finite_number(value)
    return number and (kind != POSITIVE or value > 0)


def _shown(value) -> str:
    return {dict: "an object", list: "a list"}.get(type(value)) or json.dumps(value)[:60]


def check_shape(value, schema, where: str) -> None:
    """Stop with one line naming the field unless `value` fits `schema`, so no report fails half-way.

    A schema is a kind (NUMBER, TEXT...), [schema] for a list of them, {key: schema} for an object
    whose listed keys are optional, or {str: schema} for an object of any keys.
    """
    if isinstance(schema, str):
        fits, expected = _fits(value, schema), schema
    else:
        fits, expected = isinstance(value, type(schema)), "a list" if isinstance(schema, list) else "a JSON object"
    if not fits:
        raise BitallocError(f"{where} is {_shown(value)}, expected {expected}")
    if isinstance(schema, list):
        for number, item in enumerate(value):
            check_shape(item, schema[0], f"{where}[{number}]")
    elif isinstance(schema, dict):
        for key, item in value.items():
            inner = schema[str] if str in schema else schema.get(key)
            if inner is not None:
                check_shape(item, inner, f"{where}[{json.dumps(key)}]")


def check_table(table: SensitivityTable, path: Path) -> None:
    """Every cell the figures read: a row per (layer, option), a number for each error, a positive size."""
    if not table.rows:
        raise BitallocError(f"sensitivity table {path} has no rows")
    for number, row in enumerate(table.rows):
        check_shape(row, TABLE_ROW, f"sensitivity table {path} row {number}")
    cells = {(r["layer"], r["option"]) for r in table.rows}
    missing = next(((l, str(o)) for l in table.layers for o in table.options if (l, str(o)) not in cells), None)
    if missing:
        raise BitallocError(f"sensitivity table {path} has no row for layer {missing[0]} at option {missing[1]}")
    if not any(o.quantized for o in table.options):
        raise BitallocError(f"sensitivity table {path} has no quantized option")


class Run:
    """Everything a run directory holds, as plain data."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        if not run_dir.is_dir():
            raise BitallocError(f"run directory not found: {run_dir}")
        self.plan = Plan.load(run_dir / "plan.json")
        self.results = _read_json(run_dir / "results.json")
        check_shape(self.results, RESULTS, str(run_dir / "results.json"))
        self.table = SensitivityTable.load(run_dir / "sensitivity.json")
        check_table(self.table, run_dir / "sensitivity.json")
        self.errors = {(r["layer"], r["option"]): float(r["error"]) for r in self.table.rows}
        self.bits = {(r["layer"], r["option"]): 8 * r["bytes"] / r["numel"] for r in self.table.rows}
        self.layers = self.table.layers
        measured = run_dir / MEASURED_FILE
        self.extra = _read_json(measured) if measured.is_file() else {}
        check_shape(self.extra, {str: VARIANT}, str(measured))
        self.variants = self._ordered({**self.results.get("variants", {}), **self.extra})
        self._check_assignments()
        self.front, self.front_file = self._front()

    @staticmethod
    def _ordered(variants: dict[str, dict]) -> dict[str, dict]:
        """Unquantized first, then by size, largest first (a size the run could not state, null, counts as 16)."""
        def largest_first(item):
            name, entry = item
            return name != "unquantized", -(16.0 if entry.get("avg_bits") is None else entry["avg_bits"])

        return dict(sorted(variants.items(), key=largest_first))

    def _check_assignments(self) -> None:
        """Each recorded plan covers the table's layers exactly: bits per layer are drawn on one axis."""
        for name in self.variants:
            assignment = self.assignment(name)
            if assignment is not None and set(assignment) != set(self.layers):
                raise BitallocError(f"the layers recorded for variant {json.dumps(name)} in {self.dir} are not "
                                    f"those of its sensitivity table")

    def assignment(self, name: str) -> dict[str, str] | None:
        """Layer -> option string of a variant, where the run says (plans, uniform variants)."""
        if name in self.extra and "assignment" in self.extra[name]:
            return self.extra[name]["assignment"]
        recorded = self.results.get("variants", {}).get(name, {}).get("layers")
        if recorded:
            return recorded
        if name == f"mixed ({(self.plan.solver or {}).get('solver', 'ilp')})":  # older runs: only the plan's own
            return {l: self.plan.layers.get(l, self.plan.default) for l in self.layers}
        if name.startswith("uniform "):
            return {l: name.split(" ", 1)[1] for l in self.layers}
        return None

    def layer_bits(self, option: str, layer: str) -> float:
        return self.bits.get((layer, option), 16.0 if not parse(option).quantized else float("nan"))

    def predicted(self, assignment: dict[str, str]) -> float:
        return sum(self.errors.get((l, o), 0.0) for l, o in assignment.items())

    def _front(self) -> tuple[list[tuple[float, float]] | None, str | None]:
        """A Pareto front JSON written by the solver: {"kind": "bytes", "points": [{"size", "loss"}, ...]}.

        Points may also give "bytes" or "avg_bits"; a bare list of points is accepted too.
        """
        total = sum(r["numel"] for r in self.table.rows if r["option"] == self.table.rows[0]["option"])
        for path in sorted(self.dir.glob("*pareto*.json")):
            data = _read_json(path)
            if not isinstance(data, (list, dict)):
                raise BitallocError(f"Pareto front {path} is {_shown(data)}, expected a list of points or an "
                                    f"object with \"points\"")
            points = data if isinstance(data, list) else data.get("points", [])
            by_bytes = isinstance(data, list) or data.get("kind", "bytes") == "bytes"
            front = [point for p in (points if isinstance(points, list) else [])
                     if (point := _front_point(p, by_bytes, total)) is not None]
            if front:
                return front, path.name
        return None, None


def _front_point(point, by_bytes: bool, total_numel: int) -> tuple[float, float] | None:
    """(average bits, loss) of one front point; None for a point that does not give both as numbers."""
    if not isinstance(point, dict) or not _fits(point.get("loss"), NUMBER):
        return None
    size = point.get("bytes", point.get("size") if by_bytes else None)
    bits = point.get("avg_bits", 8 * size / total_numel if _fits(size, NUMBER) else None)
    return (float(bits), float(point["loss"])) if _fits(bits, NUMBER) else None


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_section(run: Run) -> list[str]:
    variants = run.variants
    base = variants.get("unquantized", {}).get("measured", {})
    corpora = run.results.get("evaluation", {}).get("corpus", "eval").split(",")
    header = ["variant", "MB", "avg bits", "predicted loss"] + [f"PPL {c}" for c in corpora] + \
        ["dPPL", "KL mean", "KL median", "KL p99", "top-1"]
    rows = []
    for name, entry in variants.items():
        m = entry.get("measured", {})
        by_corpus = m.get("corpora") or {corpora[0]: m}
        ppl_cells = []
        for corpus in corpora:
            r = by_corpus.get(corpus, {})
            ppl_cells.append("not available" if r.get("available") is False else _cell(r.get("ppl"), ".3f"))
        kl = m.get("kl", {})
        dppl = m["ppl"] - base["ppl"] if "ppl" in m and "ppl" in base else None
        rows.append([name, _cell(entry.get("bytes", 0) / 1e6 if entry.get("bytes") else None, ".3f"),
                     _cell(entry.get("avg_bits", 16.0 if name == "unquantized" else None), ".3f"),
                     _cell(entry.get("predicted_loss", 0.0 if name == "unquantized" else None), ".4g"), *ppl_cells,
                     _cell(dppl, "+.3f"), _cell(kl.get("mean"), ".4f"), _cell(kl.get("median"), ".4f"),
                     _cell(kl.get("p99"), ".3f"), _cell(m.get("top1"), ".4f")])
    protocol = run.results.get("evaluation", {})
    note = (f"Protocol (GPTQ): {protocol.get('corpus')}, windows of "
            f"{protocol.get('seqlen')} tokens, {protocol.get('windows')} windows"
            f"{' (evenly spaced subset)' if protocol.get('subset') else ' (full set)'}; KL and top-1 against the "
            f"unquantized model on the same tokens; dPPL on the first corpus.")
    return ["## Results", "", note, "", markdown(header, rows), ""]


def predicted_points(run: Run) -> dict[str, dict]:
    base = run.variants.get("unquantized", {}).get("measured", {})
    points = {}
    for name, entry in run.variants.items():
        m = entry.get("measured", {})
        if name == "unquantized" or entry.get("predicted_loss") is None or "mean" not in m.get("kl", {}) \
                or "ppl" not in m:
            continue
        points[name] = {"predicted": entry["predicted_loss"], "kl": m["kl"]["mean"],
                        "dppl": m["ppl"] - base.get("ppl", m["ppl"]), "avg_bits": entry.get("avg_bits")}
    return points


def write_report(run: Run, out: Path) -> Path:
    """Write report.md and its figures into `out`; they are made aside and moved in only once all are done."""
    with atomic.atomic_files(out) as staging:
        atomic.write_text(staging / "report.md", "\n".join(report_lines(run, staging)))
    return out / "report.md"


def report_lines(run: Run, out: Path) -> list[str]:
    """The report's Markdown lines; its figures are saved into `out` on the way."""
    lines = [f"# bitalloc report: {run.plan.model}", "",
             f"Run directory `{run.dir}`; report written {datetime.date.today().isoformat()}.", "",
             f"- model: `{run.plan.model}` (weights {run.plan.fingerprint})",
             f"- budget: {json.dumps(run.plan.budget)}",
             f"- solver: {json.dumps(run.plan.solver)}",
             f"- calibration: {json.dumps(run.plan.calibration)}",
             f"- options: {', '.join(str(o) for o in run.table.options)}", ""]
    lines += results_section(run)

    points = predicted_points(run)
    lines += ["## Predicted vs measured loss", "",
              "The predicted loss is the sum of the per-layer sensitivities the solver minimised; the measured "
              "losses are the mean KL divergence to the unquantized model and the perplexity increase.", ""]
    if points:
        ranked = sorted(points, key=lambda n: points[n]["predicted"])
        rows = [[n, f"{points[n]['predicted']:.4g}", f"{points[n]['kl']:.4f}", f"{points[n]['dppl']:+.3f}"]
                for n in ranked]
        lines += [markdown(["variant (by predicted loss)", "predicted loss", "measured KL mean", "measured dPPL"],
                              rows), ""]
        rho = plots.spearman([points[n]["predicted"] for n in ranked], [points[n]["kl"] for n in ranked])
        if rho is not None:
            lines += [f"Rank correlation (Spearman) of predicted loss and measured KL: {rho:.3f} "
                      f"over {len(points)} variants.", ""]
        plots.save(plots.predicted_measured_figure(points), out / "predicted_vs_measured.png")
        lines += ["![predicted vs measured](predicted_vs_measured.png)", ""]
    else:
        lines += ["No quantized variant with both a predicted and a measured loss.", ""]

    size_points = {n: p for n, p in points.items() if p["avg_bits"]}
    plots.save(plots.front_figure(run.front, size_points), out / "pareto_front.png")
    lines += ["## Size vs loss", "",
              f"Pareto front from `{run.front_file}` ({len(run.front)} points) with the chosen plan and the "
              "baselines." if run.front else
              "This run directory holds no Pareto front JSON; the plans it evaluated are shown alone.",
              "", "![size vs loss](pareto_front.png)", ""]

    bits = {n: {l: run.layer_bits(a[l], l) for l in run.layers} for n in run.variants  # model order, not names
            if (a := run.assignment(n)) is not None}
    if bits:
        plots.save(plots.bits_figure(bits), out / "bits_per_layer.png")
        lines += ["## Bits per layer", "", "![bits per layer](bits_per_layer.png)", ""]
        chosen = {l: run.plan.layers.get(l, run.plan.default) for l in run.layers}  # the plan.json this run wrote
        mixed = next((n for n in bits if run.assignment(n) == chosen),
                     next((n for n in bits if n.startswith("mixed")), None))
        if mixed:
            counts: dict[str, int] = {}
            for option in run.assignment(mixed).values():
                counts[option] = counts.get(option, 0) + 1
            lines += [f"Layers per option in `{mixed}`: " +
                      ", ".join(f"{o}: {c}" for o, c in sorted(counts.items())), ""]

    options = [str(o) for o in run.table.options if o.quantized]
    plots.save(plots.sensitivity_figure(run.errors, run.layers, options), out / "sensitivity_heatmap.png")
    worst = sorted(run.layers, key=lambda l: -run.errors[(l, options[0])])[:8]
    lines += ["## Sensitivity", "", "![sensitivity heatmap](sensitivity_heatmap.png)", "",
              f"Most sensitive layers at {options[0]}: " +
              ", ".join(f"`{l}` ({run.errors[(l, options[0])]:.3g})" for l in worst), ""]

    base = run.variants.get("unquantized", {}).get("measured", {})
    windows = {n: e["measured"]["per_window"]["ppl"] for n, e in run.variants.items()
               if n != "unquantized" and "ppl" in e.get("measured", {}).get("per_window", {})}
    if windows and "ppl" in base.get("per_window", {}):
        plots.save(plots.window_figure(windows, base["per_window"]["ppl"]), out / "per_window.png")
        lines += ["## Per-window perplexity", "", "![per-window PPL](per_window.png)", ""]
    return lines


def measure(run: Run, args) -> None:
    """Quantize and evaluate each table option uniformly (and --plans) under the run's protocol; cache results."""
    from .batch import build_parser as batch_parser, read_plan, resolve_plans
    from .cli_args import calibration, data_dir_for_plan, evaluator, resolve_device
    from .cost import assignment_bytes, average_bits, layer_shapes
    from .models import load_model
    from .quantize_model import needs_calibration, quantize_model, restore

    specs = [f"uniform {o}" for o in run.table.options if o.quantized] + list(args.plans)
    # every plan is read and checked before the model is loaded; fp16 (None) is the unquantized row already
    plans = {s: read_plan(s.removeprefix("uniform ")) for s in specs if s not in run.variants}
    plans = {s: plan for s, plan in plans.items() if plan is not None}
    if not plans:
        return
    protocol, cal = run.plan.evaluation, run.plan.calibration
    argv = ["--eval", protocol.get("corpus", "wikitext2"), "--seqlen", str(protocol.get("seqlen", 2048)),
            "--eval-windows", str(protocol["windows"] if protocol.get("subset") else 0),
            "--calib", str(cal.get("source", "wiki")), "--nsamples", str(cal.get("nsamples", 16)),
            "--calib-seqlen", str(cal.get("seqlen", 512)), "--seed", str(cal.get("seed", 0)), "--device", args.device]
    where = data_dir_for_plan(args.data_dir, cal)
    argv += ["--data-dir", where] if where else []
    argv += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    options = batch_parser().parse_args(argv)
    device = resolve_device(options.device)
    loaded = load_model(run.plan.model)
    shapes = layer_shapes(loaded.model)
    evaluation = evaluator(options, loaded, device, not args.quiet)
    loaded.model.to(device)
    evaluation.unquantized()
    for spec, (assignment, _) in resolve_plans(plans, loaded, shapes, several=False).items():
        calib = calibration(options, loaded) if needs_calibration(assignment) else None
        originals = quantize_model(loaded, assignment, calib, "reference", device, options.batch_size,
                                   not args.quiet)
        measured = evaluation(f"eval {spec}")
        restore(loaded.model, originals)
        named = {l: str(o) for l, o in assignment.items()}
        run.extra[spec] = {"bytes": assignment_bytes(shapes, assignment), "avg_bits": average_bits(shapes, assignment),
                           "predicted_loss": run.predicted(named), "measured": measured, "assignment": named}
        atomic.write_json(run.dir / MEASURED_FILE, run.extra)
        log.info("%s: PPL %.3f, KL %.4f", spec, measured["ppl"], measured["kl"]["mean"])
    run.variants = run._ordered({**run.variants, **run.extra})


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run = Run(Path(args.run_dir))
    if args.measure:
        measure(run, args)
    path = write_report(run, Path(args.out) if args.out else run.dir / "report")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
