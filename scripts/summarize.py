"""One table from results/ppl_results.txt and results/lm_eval_results.txt (written by batch_eval.py).

    python scripts/summarize.py [--results results] [--format text|markdown] [--metric acc]
"""
import sys
from pathlib import Path

from bitalloc.errors import cli_entry
from bitalloc.help_format import script_parser
from bitalloc.results import summarize


@cli_entry
def main(argv=None) -> int:
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--results", default="results", help="directory holding the results files")
    parser.add_argument("--format", choices=("text", "markdown"), default="text", help="table format")
    parser.add_argument("--metric", default="acc", help="lm-eval metric shown per task (acc, acc_norm, ...)")
    args = parser.parse_args(argv)
    print(summarize(Path(args.results), args.format, args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
