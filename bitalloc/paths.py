"""Where caches live: $BITALLOC_CACHE, else ~/.cache/bitalloc."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("BITALLOC_CACHE") or Path.home() / ".cache" / "bitalloc")
