"""User-facing failures: one clear line and exit code 2, never a traceback."""
from __future__ import annotations

import functools
import logging
import sys

EXIT_BAD_INPUT = 2


class BitallocError(Exception):
    """Bad input (missing model, malformed plan, impossible budget, NaN weights...).

    Raised anywhere in the library; command-line entry points turn it into a single
    line on stderr and exit code 2.  The message must name the offending thing.
    """


def one_line(err: BaseException | str, limit: int = 2000) -> str:
    """The message on one line (lone surrogates escaped), at most `limit` characters."""
    message = " ".join(str(err).split()).encode("utf-8", "backslashreplace").decode("utf-8")
    return message if len(message) <= limit else message[: limit - 3] + "..."


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of the message (the exception's type when it has none), at most `limit`
    characters: for messages whose later lines are a traceback or a dump."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return one_line(lines[0] if lines else type(err).__name__, limit)


def cli_entry(main):
    """Wrap a CLI main(argv) so bad input ends with one line and exit code 2, and progress bars
    written to a log redraw only now and then (progress.pace_for_logs)."""

    @functools.wraps(main)
    def wrapper(argv=None):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from .progress import pace_for_logs

        pace_for_logs()
        try:
            return main(argv)
        except BitallocError as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            print("error: interrupted; finished outputs are kept, partial ones were discarded", file=sys.stderr)
            sys.exit(130)

    return wrapper
