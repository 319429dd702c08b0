"""Where caches live ($BITALLOC_CACHE, else ~/.cache/bitalloc), and the preset option spaces."""
from __future__ import annotations

import os
from pathlib import Path

PRESET_SPACES = Path(__file__).resolve().parents[1] / "search" / "spaces"  # found from any working folder


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("BITALLOC_CACHE") or Path.home() / ".cache" / "bitalloc")
