"""Markdown table of search.sh runs (their results.json): every variant's size, predicted and measured loss.

    python scripts/solver_table.py runs/a runs/b > table.md

dPPL/dPPL(uniform) is each plan's perplexity increase over the unquantized
model divided by that of the uniform plan of the same run.
"""
from __future__ import annotations

import sys
from pathlib import Path

from bitalloc.errors import BitallocError, cli_entry
from bitalloc.help_format import script_parser
from bitalloc.safe_json import load_json


def rows(run: Path) -> list[str]:
    """The run's table lines; a results.json that is not search.sh's stops with one line naming it."""
    path = run / "results.json"
    try:
        return _rows(load_json(path, "results"))
    except (KeyError, TypeError, AttributeError) as err:
        problem = f"missing key {err}" if isinstance(err, KeyError) else err
        raise BitallocError(f"{path} is not a search.sh results file ({problem})") from None


def _rows(data: dict) -> list[str]:
    variants = data["variants"]
    base = variants["unquantized"]["measured"]["ppl"]
    uniform = next((v["measured"]["ppl"] - base for k, v in variants.items() if k.startswith("uniform ")), None)
    budget = data["budget"].get("spec", data["budget"].get("kind"))
    order = ["unquantized", "uniform", "rules", "greedy", "annealing", "pareto", "ilp", "optuna"]
    rank = lambda name: next((i for i, key in enumerate(order) if key in name), len(order))
    lines = []
    for name, entry in sorted(variants.items(), key=lambda item: rank(item[0])):
        measured = entry["measured"]
        if name == "unquantized":
            lines.append(f"| {budget} | unquantized | - | - | - | {measured['ppl']:.2f} | - | 0 | - |")
            continue
        ratio = f"{(measured['ppl'] - base) / uniform:.3f}" if uniform else "-"
        lines.append(f"| {budget} | {name} | {entry['bytes'] / 1e6:.3f} | {entry['avg_bits']:.3f} | "
                     f"{entry['predicted_loss']:.4g} | {measured['ppl']:.2f} | {measured['ppl'] - base:+.2f} | "
                     f"{measured['kl']['mean']:.4f} | {ratio} |")
    return lines


@cli_entry
def main(argv=None) -> int:
    parser = script_parser(__file__, __doc__)
    parser.add_argument("runs", nargs="+", help="run directories written by search.sh")
    args = parser.parse_args(argv)
    lines = [line for run in args.runs for line in rows(Path(run))]  # every run read before any output
    print("| budget | plan | MB | avg bits | predicted loss | PPL | dPPL | KL mean | dPPL / dPPL(uniform) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
