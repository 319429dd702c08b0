"""`bitalloc COMMAND ...` (or `python -m bitalloc COMMAND ...`): one name for the entry points.

    bitalloc report RUN_DIR       Markdown report with figures of a search run
    bitalloc batch ...            batch evaluation into results/*.txt
    bitalloc apply --plan P       quantize and evaluate a plan
    bitalloc search ...           the pipeline of search.sh
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"report": "bitalloc.report", "batch": "bitalloc.batch", "apply": "bitalloc.apply",
            "search": "bitalloc.pipeline"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv else sys.stdout)
        return 2 if argv and argv[0] not in ("-h", "--help") else 0
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
