"""Read JSON that a person may have edited or a tool may have mangled, strictly.

Python's `json.loads` is lenient where a plan must not be: it keeps the last of
two duplicate keys silently, turns `NaN`, `Infinity` and `1e999` into
non-finite floats, reads whatever size it is given, and answers a byte-order
mark with a message about codecs.  `load_json` refuses each of these with one
line that says what is wrong, and raises only `BitallocError`.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .errors import BitallocError

MAX_BYTES = 16 << 20  # a plan for a 1000-layer model is ~100 KB
_BOMS = ((b"\xef\xbb\xbf", "a UTF-8 byte-order mark"), (b"\xff\xfe\x00\x00", "a UTF-32 byte-order mark"),
         (b"\x00\x00\xfe\xff", "a UTF-32 byte-order mark"), (b"\xff\xfe", "a UTF-16 byte-order mark"),
         (b"\xfe\xff", "a UTF-16 byte-order mark"))


def is_finite_number(value) -> bool:
    """A JSON number a reader can compute with (true/false are numbers to Python, not here).

    An integer beyond a float's range (JSON allows thousands of digits) is refused here, where
    `math.isfinite` would raise OverflowError; NaN and infinities fail the comparison."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


class _Rejected(ValueError):
    """Raised from inside the decoder's hooks; carries the finished message."""


def quote(text: str, limit: int = 120) -> str:
    """A name as it can be shown on one line: quoted, non-ASCII and control characters escaped, shortened."""
    shown = ascii(str(text))
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _unique_keys(pairs):
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _Rejected(f"key {quote(key)} appears twice in one object (JSON would keep only the last)")
        seen.add(key)
    return dict(pairs)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Rejected(f"number {quote(text, 40)} is out of range (it would become infinity)")
    return value


def _no_constant(name: str):
    raise _Rejected(f"{name} is not a JSON number")


def read_bytes(path: Path, what: str, max_bytes: int = MAX_BYTES) -> bytes:
    """At most `max_bytes` of `path` (a bigger file, a device or a FIFO that never ends is refused)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise BitallocError(f"{what} file not found: {path}") from None
    except OSError as err:
        raise BitallocError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if len(data) > max_bytes:
        raise BitallocError(f"{what} {path} is larger than {max_bytes >> 20} MiB; that is not a {what}")
    return data


def loads(data: bytes, source: str):
    """Decode strict JSON from bytes; `source` names the file in messages."""
    if not data.strip():
        raise BitallocError(f"{source} is empty")
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise BitallocError(f"{source} starts with {name}; save it as UTF-8 without one")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BitallocError(f"{source} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_float=_finite_float,
                          parse_constant=_no_constant)
    except _Rejected as err:
        raise BitallocError(f"{source}: {err}") from None
    except RecursionError:
        raise BitallocError(f"{source} is nested too deeply to be read") from None
    except ValueError as err:  # JSONDecodeError, and ints longer than Python converts
        raise BitallocError(f"{source} is not valid JSON: {' '.join(str(err).split())}") from None


def load_json(path, what: str = "JSON file", max_bytes: int = MAX_BYTES):
    path = Path(path)
    return loads(read_bytes(path, what, max_bytes), f"{what} {path}")
