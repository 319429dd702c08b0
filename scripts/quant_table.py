"""One table of every quantizer on one model: WikiText-2 PPL (and KL to the unquantized model) per option.

    python scripts/quant_table.py --data-dir ../shared/data

Loads the model once; for each variant quantizes every decoder linear with one
option (bitalloc.quantize_model, calibrated methods true-sequentially), evaluates
it on the search protocol's windows (WikiText-2 test, --seqlen 512, 32 evenly
spaced windows by default), records the quantization and evaluation times, and
restores the original layers.  Results are written after every variant to
--json, and variants already there are skipped, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from bitalloc import atomic
from bitalloc.cli_args import (add_data_args, add_model_args, calibration, calibration_record, check_non_negative,
                               check_positive)
from bitalloc.data import eval_windows
from bitalloc.errors import BitallocError, cli_entry
from bitalloc.evaluate import ReferenceCache, evaluate
from bitalloc.help_format import script_parser
from bitalloc.models import linear_layers, load_model
from bitalloc.quant import parse
from bitalloc.quantize_model import needs_calibration, quantize_model, restore
from bitalloc.safe_json import load_json

log = logging.getLogger("quant_table")
WEIGHT_METHODS = ("rtn", "gptq", "awq", "lwc", "hqq", "smoothquant")


def variants() -> list[tuple[str, str]]:
    """(row label, option) in the order they run: the comparisons the issue asks for first,
    then the rows that need no calibration (fast), then the rest."""
    rows = [(f"{m} W{b}", f"{m}:int{b}:g64:asym") for b in (4, 3) for m in ("rtn", "gptq", "awq", "lwc")]
    rows += [("rtn W8A8", "rtn:int8:pc:sym:a8"), ("smoothquant W8A8", "smoothquant:int8:pc:sym:a8")]
    rows += [(f"{m} W{b}", f"{m}:int{b}:g64:asym") for b in (4, 3) for m in ("hqq", "smoothquant")]
    rows += [(f"{m} W8", f"{m}:int8:g64:asym") for m in WEIGHT_METHODS]
    rows += [("rtn W4A8", "rtn:int4:g64:asym:a8"), ("rtn W4A4", "rtn:int4:g64:asym:a4"),
             ("rtn W8A8 FP8 act", "rtn:int8:pc:sym:afp8"), ("rtn W4A8 FP8 act", "rtn:int4:g64:asym:afp8")]
    rows += [(f"rtn {f.upper()}", f"rtn:{f}:g64") for f in ("fp4", "nf4", "fp8e4m3", "fp8e5m2")]
    for label, weights, act in (("W8A8", "int8:pc:sym", "a8"), ("W4A8", "int4:g64:asym", "a8"),
                                ("W4A4", "int4:g64:asym", "a4")):
        if label != "W8A8":
            rows.append((f"smoothquant {label}", f"smoothquant:{weights}:{act}"))
        rows += [(f"{m} {label} +32 outliers", f"{m}:{weights}:{act}:outliers=32") for m in ("rtn", "smoothquant")]
    rows += [(f"gptq {f.upper()}", f"gptq:{f}:g64") for f in ("fp4", "nf4")]
    rows += [(f"gptq W{b} no act-order", f"gptq:int{b}:g64:asym:act_order=0") for b in (4, 3)]
    rows += [(f"rtn W{b} clip search (weight MSE)", f"rtn:int{b}:g64:asym:clip=1") for b in (4, 3)]
    rows += [(f"rtn W{b} clip search (output-weighted)", f"rtn:int{b}:g64:asym:clip=2") for b in (4, 3)]
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--json", default="results/quant_table.json", help="results file (resumed if present)")
    parser.add_argument("--markdown", default="results/quant_table.md", help="the table as Markdown")
    parser.add_argument("--only", default=None, help="comma-separated options to run instead of the full list")
    parser.add_argument("--limit-minutes", type=float, default=0, help="stop starting variants after this long")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_args(parser)
    add_data_args(parser)
    parser.set_defaults(nsamples=32)
    return parser


def render(results: dict) -> str:
    """The rows in the order `variants` runs them (the unquantized model first), any others after."""
    order = ["fp16"] + [option for _, option in variants()]
    rows = sorted(results["rows"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    base = results["rows"].get("fp16")
    lines = ["| variant | option | PPL | ΔPPL | KL mean | quantize s | eval s |", "|---|---|---:|---:|---:|---:|---:|"]
    for key, row in rows:
        delta = row["ppl"] - base["ppl"] if base else float("nan")
        kl = row.get("kl", {}).get("mean", 0.0)
        lines.append(f"| {row['label']} | `{key}` | {row['ppl']:.3f} | {delta:+.3f} | {kl:.4f} | "
                     f"{row['quantize_s']:.0f} | {row['eval_s']:.0f} |")
    return "\n".join(lines) + "\n"


def load_results(path: Path) -> dict:
    """The results to resume from (checked before the model loads), or a fresh start."""
    if not path.is_file():
        return {"rows": {}}
    results = load_json(path, "results")
    if not isinstance(results, dict) or not isinstance(results.get("rows"), dict):
        raise BitallocError(f"results {path} has no 'rows' object; it is not a quant_table results file")
    return results


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_positive(args)
    check_non_negative(args, "eval_windows", "limit_minutes")
    torch.manual_seed(0)
    progress = not args.quiet
    wanted = variants() if not args.only else [(o, o) for o in args.only.split(",")]
    for _, option in wanted:
        parse(option)
    path = Path(args.json)
    results = load_results(path)
    started = time.time()
    loaded = load_model(args.model)
    windows = eval_windows(loaded.tokenizer, args.eval, args.seqlen, args.eval_windows or None, args.data_dir)
    calib_ids = calibration(args, loaded)
    protocol = {"model": args.model, "corpus": args.eval, "seqlen": args.seqlen, "windows": int(windows.shape[0]),
                "calibration": calibration_record(args)}
    earlier = {k: v for k, v in results.get("protocol", protocol).items() if k in protocol}
    changed = [k for k in protocol if earlier.get(k) != protocol[k]]
    if results["rows"] and changed:  # its rows would sit beside new ones measured another way
        raise BitallocError(f"results {path} were measured with other settings ({', '.join(changed)}: "
                            f"{', '.join(str(earlier.get(k)) for k in changed)}); give another --json or delete it")
    results["protocol"] = {**protocol, "threads": torch.get_num_threads()}
    reference = ReferenceCache(None, loaded.fingerprint, windows, args.batch_size)
    t0 = time.time()
    base = evaluate(loaded.model, windows, reference, True, args.batch_size, progress=progress, desc="fp16")
    results["rows"].setdefault("fp16", {"label": "unquantized", **base, "quantize_s": 0.0,
                                        "eval_s": time.time() - t0})
    layers = list(linear_layers(loaded.model))
    for label, text in wanted:
        if text in results["rows"]:
            continue
        if args.limit_minutes and time.time() - started > 60 * args.limit_minutes:
            log.info("time limit reached; run again to continue")
            break
        option = parse(text)
        assignment = {name: option for name in layers}
        t0 = time.time()
        calib = calib_ids if needs_calibration(assignment) else None
        originals = quantize_model(loaded, assignment, calib, batch_size=args.batch_size, progress=progress)
        quantize_s = time.time() - t0
        t0 = time.time()
        measured = evaluate(loaded.model, windows, reference, False, args.batch_size, progress=progress, desc=text)
        eval_s = time.time() - t0
        restore(loaded.model, originals)
        results["rows"][text] = {"label": label, **measured, "quantize_s": quantize_s, "eval_s": eval_s}
        log.info("%-40s PPL %.3f  (quantize %.0f s, eval %.0f s)", text, measured["ppl"], quantize_s, eval_s)
        atomic.write_json(path, results)
        atomic.write_text(args.markdown, render(results))
    atomic.write_json(path, results)
    atomic.write_text(args.markdown, render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
