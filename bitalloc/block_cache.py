"""The profiler's cache on disk: one JSON file of values per block, and the resume frontiers.

A block's file is written atomically once its values are measured; a frontier
(the hidden states entering the next block, or the gradient leaving the last
finished one) lets a killed run continue where it stopped.  Unreadable, malformed
or older-format files are reported and measured again, never trusted.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import atomic
from .safe_json import is_finite_number

log = logging.getLogger(__name__)
CACHE_FORMAT = 2


def _valid_row(row) -> bool:
    """A row as `profile_rows.merge` writes it; anything else would crash the profiler that reads it back."""
    return (isinstance(row, dict) and isinstance(row.get("layer"), str) and isinstance(row.get("option"), str)
            and isinstance(row.get("version", ""), str) and isinstance(row.get("settings", {}), dict)
            and isinstance(row.get("values"), dict) and all(map(is_finite_number, row["values"].values())))


def _block_problem(data) -> str | None:
    """Why a parsed block file cannot be trusted (a hand edit, another tool's file), or None if it can."""
    if not isinstance(data, dict):
        return "is not a JSON object"
    if data.get("format") != CACHE_FORMAT:
        return "has an older format"
    if not isinstance(data.get("rows"), list):
        return "has no list of rows"
    bad = next((number for number, row in enumerate(data["rows"]) if not _valid_row(row)), None)
    return None if bad is None else f"has a malformed row (row {bad})"


class BlockCache:
    """Per-block value files and the resume frontiers of one profiling setup."""

    def __init__(self, root: Path | None, key: str, frontier_tag: str = ""):
        self.dir = None if root is None else Path(root) / key
        self.frontier_tag = frontier_tag  # one range of blocks' frontiers never meet another range's
        self.memory: dict[int, list[dict]] = {}  # without a directory, rows live here for one call

    def _block_path(self, index: int) -> Path:
        return self.dir / f"block_{index:04d}.json"

    def load_rows(self, index: int) -> list[dict]:
        if self.dir is None:
            return self.memory.get(index, [])
        path = self._block_path(index)
        if not path.is_file():
            return []
        try:
            data = json.loads(path.read_text())
        except (ValueError, OSError):  # ValueError covers bad JSON and bad UTF-8
            problem = "is unreadable"
        else:
            problem = _block_problem(data)
        if problem:
            log.warning("cache file %s %s; block %d will be measured again", path, problem, index)
            return []
        return data["rows"]

    def save_rows(self, index: int, rows: list[dict]) -> None:
        if self.dir is None:
            self.memory[index] = rows
        else:
            atomic.write_json(self._block_path(index), {"format": CACHE_FORMAT, "block": index, "rows": rows})

    def _frontier(self, name: str) -> Path | None:
        return None if self.dir is None else self.dir / f"{name}{self.frontier_tag}.safetensors"

    def save_tensors(self, name: str, index: int, tensors: list[torch.Tensor]) -> None:
        if self.dir is None:
            return
        with atomic.atomic_path(self._frontier(name)) as tmp:
            save_file({f"t{i}": t.detach().cpu().contiguous() for i, t in enumerate(tensors)}, str(tmp),
                      metadata={"block": str(index)})

    def load_tensors(self, name: str, usable) -> tuple[int, list[torch.Tensor]] | None:
        """(block, tensors) of the saved frontier if `usable(block)`.

        A run killed between a block's rows and its frontier leaves the frontier one block behind
        the rows; resuming from it costs one block's pass (without measuring), not a restart.
        """
        path = self._frontier(name)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as handle:
                index = int(handle.metadata().get("block", -1))
            if not usable(index):
                return None
            tensors = load_file(str(path))
            return index, [tensors[f"t{i}"] for i in range(len(tensors))]
        except Exception:  # corrupt or mismatched frontier: the passes are recomputed instead
            log.warning("resume frontier %s is unusable; recomputing earlier blocks", path)
            return None

    def drop(self, name: str) -> None:
        if self.dir is not None:
            self._frontier(name).unlink(missing_ok=True)
