"""python -m bitalloc.export --plan plan.json --to gptqmodel|llamacpp OUT: write a plan for another tool.

    gptqmodel  OUT is a quantize_config.json (GPTQModel's QuantizeConfig keys, per-module `dynamic`)
    llamacpp   OUT is a file for `llama-quantize --tensor-type-file OUT in.gguf out.gguf TYPE`

The plan is validated against its model first (layers, tie groups, fingerprint); a layer the
target cannot represent stops the export with one line naming it, and nothing is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import atomic
from ..errors import cli_entry
from ..help_format import HelpFormatter, from_docstring, program
from ..models import load_model, locate
from ..plan import Plan
from . import EXPORTERS, export_input, get_exporter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program("python -m bitalloc.export"), formatter_class=HelpFormatter,
                                     **from_docstring(__doc__))
    parser.add_argument("out", help="file to write")
    parser.add_argument("--plan", required=True, help="plan.json written by search")
    parser.add_argument("--to", required=True, choices=sorted(EXPORTERS), help="target format")
    parser.add_argument("--model", default=None, help="model spec (default: the plan's model)")
    parser.add_argument("--gguf", default=None,
                        help="GGUF file whose tensor names llamacpp entries are checked against "
                             "(default: the model itself when it is a GGUF file)")
    parser.add_argument("--allow-wider", action="store_true",
                        help="llamacpp: accept tensors that llama.cpp must store with more bits than planned")
    return parser


def default_gguf(spec: str) -> Path | None:
    source = locate(spec)
    return source.path if source.gguf else None


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    plan = Plan.load(args.plan)
    exporter = get_exporter(args.to)
    spec = args.model or plan.model
    gguf = Path(args.gguf) if args.gguf else default_gguf(spec)
    data = export_input(plan, load_model(spec), gguf)
    options = {"allow_wider": args.allow_wider} if args.to == "llamacpp" else {}
    text, notes = exporter(data, **options)
    atomic.write_text(args.out, text)
    for note in notes:
        print(note)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
