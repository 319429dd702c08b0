"""Progress bars in logs and under --quiet, for ours and the libraries' alike (all are tqdm).

tqdm's own TQDM_* settings are read when tqdm is imported, which transformers does
before any command starts, so these adjust the class's constructor instead.
"""
from __future__ import annotations

import contextlib
import sys

LOG_INTERVAL = 30.0  # seconds between redraws of a bar written to a file or pipe
_paced = False  # pace_for_logs has wrapped tqdm in this process


def _wrap(method: str, adjust) -> tuple[type, object]:
    """Make tqdm's `method` adjust its keyword arguments first; returns what to restore."""
    from tqdm import std

    original = getattr(std.tqdm, method)

    def wrapped(self, *args, **kwargs):
        adjust(kwargs)
        return original(self, *args, **kwargs)

    setattr(std.tqdm, method, wrapped)
    return std.tqdm, original


def pace_for_logs() -> None:
    """When stderr is not a terminal, every bar redraws at most every LOG_INTERVAL seconds: a log gets a
    line per interval, not one per step.  Applied once per process."""
    global _paced
    if sys.stderr.isatty() or _paced:
        return
    _wrap("__init__", lambda kwargs: kwargs.setdefault("mininterval", LOG_INTERVAL))
    for method in ("set_postfix", "set_postfix_str", "set_description", "set_description_str"):
        _wrap(method, lambda kwargs: kwargs.setdefault("refresh", False))  # shown at the next paced redraw
    _paced = True


@contextlib.contextmanager
def libraries_quiet(quiet: bool):
    """Within the block, no bar draws at all when `quiet` (libraries such as lm-eval pass `disable`
    themselves, so it is forced, not defaulted)."""
    if not quiet:
        yield
        return
    cls, original = _wrap("__init__", lambda kwargs: kwargs.update(disable=True))
    try:
        yield
    finally:
        cls.__init__ = original
