"""Markdown table of search.sh runs (their results.json): every variant's size, predicted and measured loss.

    python scripts/solver_table.py runs/a runs/b > table.md

dPPL/dPPL(uniform) is each plan's perplexity increase over the unquantized
model divided by that of the uniform plan of the same run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bitalloc.help_format import HelpFormatter


def rows(run: Path) -> list[str]:
    data = json.loads((run / "results.json").read_text())
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories written by search.sh")
    args = parser.parse_args()
    print("| budget | plan | MB | avg bits | predicted loss | PPL | dPPL | KL mean | dPPL / dPPL(uniform) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        print("\n".join(rows(Path(run))))


if __name__ == "__main__":
    main()
