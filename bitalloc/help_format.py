"""One help format for every command line: defaults shown, but never twice; descriptions and epilogs
(usage examples copied from module docstrings) keep their line breaks."""
from __future__ import annotations

import argparse
from pathlib import Path


# set by `bitalloc COMMAND` (bitalloc/__main__.py): usage and error lines then name the command as typed
invoked_as: str | None = None


def program(documented: str) -> str:
    """A parser's prog: the command as the user typed it, else the way the README documents it."""
    return invoked_as or documented


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default only where its help does not already say it and there is one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def from_docstring(doc: str) -> dict:
    """ArgumentParser's description (the docstring's first paragraph) and epilog (the rest), so that
    --help shows each once."""
    first, _, rest = doc.strip().partition("\n\n")
    return {"description": first, "epilog": rest.lstrip("\n").rstrip() or None}


def script_parser(file: str, doc: str) -> argparse.ArgumentParser:
    """The parser of a repo script (scripts/, inference/): named as the README runs it from the
    repository root (`python scripts/x.py`), its docstring as description and epilog."""
    path = Path(file).resolve()
    return argparse.ArgumentParser(prog=f"python {path.parent.name}/{path.name}", formatter_class=HelpFormatter,
                                   **from_docstring(doc))
