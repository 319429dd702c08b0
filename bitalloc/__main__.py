"""`bitalloc COMMAND ...` (or `python -m bitalloc COMMAND ...`): one name for the entry points.

    bitalloc search ...           the pipeline of search.sh
    bitalloc profile ...          the sensitivity table alone (python -m bitalloc.profile)
    bitalloc apply --plan P       quantize, pack and evaluate a plan
    bitalloc flops ...            parameters, MACs, bytes and BOPs (python flops/cal_flops.py)
    bitalloc report RUN_DIR       Markdown report with figures of a search run
    bitalloc batch ...            batch evaluation into results/*.txt
    bitalloc fidelity ...         predicted loss against measured KL over random plans
    bitalloc export ...           a plan for GPTQModel or llama.cpp

`bitalloc COMMAND --help` explains each.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"search": "bitalloc.pipeline", "profile": "bitalloc.profile", "apply": "bitalloc.apply",
            "flops": "bitalloc.cost_cli", "report": "bitalloc.report", "batch": "bitalloc.batch",
            "fidelity": "bitalloc.fidelity", "export": "bitalloc.export.__main__"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command '{argv[0]}' (commands: {', '.join(COMMANDS)}; bitalloc --help)", file=sys.stderr)
        return 2
    from . import help_format

    help_format.invoked_as = f"bitalloc {argv[0]}"
    try:
        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    finally:
        help_format.invoked_as = None


if __name__ == "__main__":
    sys.exit(main())
