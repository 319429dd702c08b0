"""Plot perplexity against average bits per model from results/ppl_results.txt (one PNG per corpus and seqlen).

    python scripts/plot_results.py [--results results] [--out results/figures]
"""
import sys
from pathlib import Path

from bitalloc import plots
from bitalloc.errors import BitallocError, cli_entry
from bitalloc.help_format import script_parser
from bitalloc.results import PPL_FIELDS, PPL_FILE, read_rows


@cli_entry
def main(argv=None) -> int:
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--results", default="results", help="directory holding ppl_results.txt")
    parser.add_argument("--out", default=None, help="where the PNGs go (default RESULTS/figures)")
    args = parser.parse_args(argv)
    rows = [r for r in read_rows(Path(args.results) / PPL_FILE, PPL_FIELDS) if r["status"] == "ok"]
    if not rows:
        raise BitallocError(f"no measured rows in {Path(args.results) / PPL_FILE}")
    out = Path(args.out) if args.out else Path(args.results) / "figures"
    for corpus, seqlen, windows in dict.fromkeys((r["corpus"], r["seqlen"], r["windows"]) for r in rows):
        mine = [r for r in rows if (r["corpus"], r["seqlen"], r["windows"]) == (corpus, seqlen, windows)]
        if len({r["plan"] for r in mine}) < 2:
            continue  # one point is no curve
        path = out / f"ppl_{corpus}_{seqlen}_{windows}w.png"
        plots.save(plots.results_figure(mine, f"{corpus} (seqlen {seqlen}, {windows} windows)"), path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
