"""Progress bars in logs and under --quiet, for ours and the libraries' alike (all are tqdm).

tqdm's own TQDM_* settings are read when tqdm is imported, which transformers does
before any command starts, so these adjust the class's constructor instead.
"""
from __future__ import annotations

import contextlib
import sys

LOG_INTERVAL = 30.0  # seconds between redraws of a bar written to a file or pipe


def _wrap_init(adjust) -> tuple[type, object]:
    from tqdm import std

    original = std.tqdm.__init__

    def init(self, *args, **kwargs):
        adjust(kwargs)
        original(self, *args, **kwargs)

    std.tqdm.__init__ = init
    return std.tqdm, original


def pace_for_logs() -> None:
    """When stderr is not a terminal, every bar redraws at most every LOG_INTERVAL seconds: a log gets a
    line per interval, not one per step.  Applied once per process."""
    global _paced
    if sys.stderr.isatty() or _paced:
        return
    _wrap_init(lambda kwargs: kwargs.setdefault("mininterval", LOG_INTERVAL))
    _paced = True


_paced = False


@contextlib.contextmanager
def libraries_quiet(quiet: bool):
    """Within the block, no bar draws at all when `quiet` (libraries such as lm-eval pass `disable`
    themselves, so it is forced, not defaulted)."""
    if not quiet:
        yield
        return
    cls, original = _wrap_init(lambda kwargs: kwargs.update(disable=True))
    try:
        yield
    finally:
        cls.__init__ = original
