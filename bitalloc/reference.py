"""The unquantized model's token distributions, cached on disk for KL divergence and top-1.

One directory per (model fingerprint, windows, batch size, storage), one
safetensors file per evaluation batch, each written atomically and carrying
its key and a SHA-256 of its tensors in the header, so a stale or corrupted
file is detected, never silently used.

Disk use: the full log-probabilities take windows x (seqlen-1) x vocab x 2
bytes (float16): 32 windows of 512 tokens of SmolLM2 (vocab 49,152) are 1.6 GB,
the whole WikiText-2 test set at 2048 would be 28 GB.  The cache is bounded by
$BITALLOC_REFERENCE_GB (default 4): a reference that would not fit is stored as
its top-K log-probabilities plus the log of the remaining mass (K=256: 1.5 KB a
token), which gives the KL divergence between the distributions coarse-grained
to those K tokens and one "rest" bucket: a lower bound of the exact value that
reaches it as K grows (tests/test_eval_reference.py), recorded as
`"kl_topk": K` in the results; top-1 agreement stays exact.  After a reference is written, the least recently used
other references are deleted until the cache fits (never ones used in the last
30 minutes, which another process may be reading).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import atomic
from .data import ids_hash
from .errors import BitallocError

log = logging.getLogger(__name__)

FORMAT = "bitalloc-reference/2"
ENV_LIMIT = "BITALLOC_REFERENCE_GB"
DEFAULT_LIMIT_GB = 4.0
DEFAULT_TOPK = 256
RECENT_SECONDS = 30 * 60


def limit_bytes() -> int:
    value = os.environ.get(ENV_LIMIT, str(DEFAULT_LIMIT_GB))
    try:
        return int(float(value) * 2**30)
    except ValueError:
        raise BitallocError(f"${ENV_LIMIT} must be a number of GiB, got '{value}'") from None


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*") if p.is_file())


def _last_use(path: Path) -> float:
    return max((p.stat().st_mtime for p in path.glob("*") if p.is_file()), default=path.stat().st_mtime)


class ReferenceCache:
    """Unquantized log-probabilities per evaluation batch: full (exact KL) or top-K (bounded disk)."""

    def __init__(self, root: Path | None, fingerprint: str, windows: torch.Tensor, batch_size: int,
                 vocab_size: int | None = None, topk: int | None = None, max_bytes: int | None = None):
        self.max_bytes = limit_bytes() if max_bytes is None else max_bytes
        tokens = windows.shape[0] * (windows.shape[1] - 1)
        if topk is None:
            full = tokens * (vocab_size or 0) * 2
            topk = 0 if root is None or full <= self.max_bytes else DEFAULT_TOPK
        self.topk = topk
        storage = f"top{topk}" if topk else "full"
        self.key = f"{fingerprint}-{ids_hash(windows)}-b{batch_size}-{storage}"
        self.root = None if root is None else Path(root) / "reference"
        self.dir = None if root is None else self.root / self.key
        self.batches = math.ceil(windows.shape[0] / batch_size)
        self._memory: dict[int, dict[str, torch.Tensor]] = {}

    def _path(self, index: int) -> Path:
        return self.dir / f"batch_{index:05d}.safetensors"

    def _header_ok(self, index: int) -> bool:
        try:
            with safe_open(str(self._path(index)), "pt") as handle:
                meta = handle.metadata() or {}
        except (OSError, SafetensorError):
            return False
        return meta.get("format") == FORMAT and meta.get("key") == self.key and meta.get("index") == str(index)

    def complete(self) -> bool:
        """Every batch is present with the right key (checksums are checked by `verify` and `get`)."""
        if self.dir is None:
            return len(self._memory) == self.batches
        return all(self._path(i).is_file() and self._header_ok(i) for i in range(self.batches))

    def verify(self) -> bool:
        """Read every batch and check its checksum; a corrupted file is deleted so it gets recomputed."""
        if self.dir is None:
            return self.complete()
        good = True
        for index in range(self.batches):
            try:
                self.get(index)
            except BitallocError as err:
                log.warning("%s; recomputing the reference", err)
                self._path(index).unlink(missing_ok=True)
                good = False
        return good

    def put(self, index: int, logprobs: torch.Tensor) -> None:
        """Store one batch of float32 log-probs [B, T, V] in this cache's storage."""
        if self.topk:
            values, indices = logprobs.topk(self.topk, dim=-1)
            rest = torch.logsumexp(logprobs.scatter(-1, indices, float("-inf")), dim=-1)
            tensors = {"values": values.half(), "indices": indices.int(), "rest": rest.float()}
        else:
            tensors = {"logprobs": logprobs.half()}
        tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
        if self.dir is None:
            self._memory[index] = tensors
            return
        meta = {"format": FORMAT, "key": self.key, "index": str(index), "sha256": _digest(tensors)}
        with atomic.atomic_path(self._path(index)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def get(self, index: int) -> dict[str, torch.Tensor]:
        if self.dir is None:
            return self._memory[index]
        path = self._path(index)
        try:
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as err:
            raise BitallocError(f"reference cache file {path} is unreadable ({err}); rerun to recompute it") from None
        if meta.get("key") != self.key or meta.get("sha256") != _digest(tensors):
            raise BitallocError(f"reference cache file {path} is corrupted (checksum mismatch); rerun to recompute it")
        return tensors

    def touch(self) -> None:
        if self.dir is not None and self.dir.is_dir():
            marker = self.dir / "last_use"
            marker.touch()

    def prune(self) -> list[Path]:
        """Delete least recently used other references until the cache fits its limit."""
        if self.root is None or not self.root.is_dir():
            return []
        entries = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        sizes = {p: _dir_size(p) for p in entries}
        total, removed = sum(sizes.values()), []
        now = time.time()
        for path in sorted(entries, key=_last_use):
            if total <= self.max_bytes:
                break
            if path == self.dir or now - _last_use(path) < RECENT_SECONDS:
                continue
            shutil.rmtree(path, ignore_errors=True)
            total -= sizes[path]
            removed.append(path)
            log.info("reference cache over %.1f GiB: removed %s", self.max_bytes / 2**30, path.name)
        return removed


def compare(reference: dict[str, torch.Tensor], logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(P_ref || P) and top-1 agreement of one window; logprobs float32 [T, V].

    The stored float16 log-probs are renormalised first: rounded, they no longer sum to one, and that
    first-order error would give the unquantized model itself a KL of ~3e-5 against its own reference."""
    if "logprobs" in reference:
        stored = reference["logprobs"]
        ref = stored.to(logprobs.device).float()
        if stored.dtype != torch.float32:  # the reference run itself compares unrounded log-probs: KL 0 exactly
            ref = ref - ref.logsumexp(-1, keepdim=True)
        kl = (ref.exp() * (ref - logprobs)).sum(-1)
        return kl.clamp_min(0), ref.argmax(-1) == logprobs.argmax(-1)
    values = reference["values"].to(logprobs.device).float()
    indices = reference["indices"].to(logprobs.device).long()
    rest = reference["rest"].to(logprobs.device).float()
    total = torch.logaddexp(values.logsumexp(-1), rest)
    values, rest = values - total[..., None], rest - total
    picked = logprobs.gather(-1, indices)
    kl = (values.exp() * (values - picked)).sum(-1)
    rest_q = torch.log1p(-picked.exp().sum(-1).clamp(max=1 - 1e-7))
    kl = kl + torch.where(rest > -80, rest.exp() * (rest - rest_q), torch.zeros_like(rest))
    return kl.clamp_min(0), indices[..., 0] == logprobs.argmax(-1)
