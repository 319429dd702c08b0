"""Corpora, seeded calibration windows and evaluation windows (GPTQ protocol).

Text comes from a local data directory (`--data-dir`, or the BITALLOC_DATA
environment variable; the layout is that of ../shared/data) or, where the
Hugging Face hub is reachable, from `datasets`.  Calibration never reads a
test split.

Evaluation protocols (GPTQ's `datautils`, the ones papers report):
  wikitext2  raw test split joined with "\\n\\n", tokenized once, non-overlapping
             windows of `seqlen`, tail dropped
  ptb        test sentences stripped and joined with single spaces (GPTQ's
             "ptb-new"), then the same windows
  c4         256 windows of `seqlen` tokens, each from a random validation
             document longer than `seqlen` at a random offset, Python `random`
             seeded with 0 (GPTQ's "c4")
  c4-new     the first 1100 validation documents joined with single spaces,
             the first 256 windows (GPTQ's "c4-new")
C4 needs the validation shard `c4-validation.00000-of-00008.json(.gz)`: in the
data directory (or its c4/ folder), given as a path to `--eval`, or from the hub.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import BitallocError

log = logging.getLogger(__name__)

ENV_DATA = "BITALLOC_DATA"
DEFAULT_CALIB = "wiki"
C4_WINDOWS = 256  # GPTQ: 256 evaluation windows from C4
C4_NEW_DOCUMENTS = 1100  # GPTQ "c4-new": the first 1100 validation documents
C4_VALIDATION = "c4-validation.00000-of-00008.json"
C4_TRAIN = "c4-train.00000-of-01024.json"


class CorpusUnavailable(BitallocError):
    """A corpus that is neither on disk nor reachable: callers may skip it and say so."""


@dataclass(frozen=True)
class Source:
    """Where one split of a corpus lives: local candidates, how lines join, and the hub fallback."""

    local: tuple[str, ...]  # paths relative to the data directory, first found wins
    joiner: str | None = None  # None: one text file kept as is; else lines stripped and joined
    hub: tuple | None = None  # (dataset, config, split, field, data_files) for datasets.load_dataset
    documents: bool = False  # JSON lines of {"text": ...}, one document each (C4, the Pile)


def _c4(shard: str, split: str) -> Source:
    names = (f"c4/{shard}.gz", f"c4/{shard}", f"{shard}.gz", shard)
    return Source(names, hub=("allenai/c4", None, split, "text", {split: f"en/{shard}.gz"}), documents=True)


CORPORA: dict[str, dict[str, Source]] = {
    "wikitext2": {
        "test": Source(("wikitext2/test.txt",), hub=("wikitext", "wikitext-2-raw-v1", "test", "text", None)),
        "validation": Source(("wikitext2/valid.tokens.txt",),
                             hub=("wikitext", "wikitext-2-v1", "validation", "text", None)),
    },
    "ptb": {
        split: Source((f"ptb/{file}.txt",), " ", ("ptb_text_only", "penn_treebank", split, "sentence", None))
        for split, file in (("test", "test"), ("validation", "valid"), ("train", "train"))
    },
    "c4": {"validation": _c4(C4_VALIDATION, "validation"), "train": _c4(C4_TRAIN, "train")},
    "pileval": {"validation": Source(("pileval/val.jsonl.gz", "pileval/val.jsonl", "val.jsonl.gz", "val.jsonl"),
                                     hub=("mit-han-lab/pile-val-backup", None, "validation", "text", None),
                                     documents=True)},
    "wiki": {"train": Source(("calib/wiki.txt",))},
}
CORPORA["c4-new"] = CORPORA["c4"]
CALIB_SPLIT = {"wiki": "train", "ptb": "train", "wikitext2": "validation", "c4": "train", "pileval": "validation"}
EVAL_SPLIT = {"wikitext2": "test", "ptb": "test", "c4": "validation", "c4-new": "validation"}
HUB_JOIN = {"wikitext2": "\n\n", "ptb": " "}


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    value = explicit or os.environ.get(ENV_DATA)
    if not value:
        return None
    path = Path(value)
    if not path.is_dir():
        raise BitallocError(f"data directory not found: {path}")
    return path


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so an offline machine fails in seconds, not after minutes of retries."""
    if any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _document_text(line: str, where: str) -> str:
    """The "text" of one JSON line; anything else would surface later as a TypeError far from the file."""
    try:
        text = json.loads(line)["text"]
    except (ValueError, KeyError, TypeError):  # not JSON, no "text", or not an object
        text = None
    if not isinstance(text, str):
        raise BitallocError(f"{where}: expected a JSON object with a 'text' field holding a string")
    return text


def read_documents(path: Path) -> list[str]:
    """The "text" field of every line of a JSON-lines file (optionally .gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    documents = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                documents.append(_document_text(line, f"{path}:{number}"))
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise BitallocError(f"cannot read {path}: {err}") from None
    return documents


def read_user_text(path: Path) -> str:
    """A user's own text file: plain text, or JSONL with a "text" field (optionally .gz)."""
    if path.name.removesuffix(".gz").endswith((".jsonl", ".json")):
        return "\n\n".join(read_documents(path))
    return read_text_file(path)


def read_text_file(path: Path) -> str:
    """A whole text file (optionally .gz) as UTF-8; a file that is not is named, not a UnicodeDecodeError."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            return handle.read()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise BitallocError(f"cannot read text file {path}: {err}") from None


def _source(name: str, split: str) -> Source:
    if name not in CORPORA:
        raise BitallocError(f"unknown corpus '{name}' (known: {', '.join(CORPORA)}, or a path to a text/JSONL file)")
    if split not in CORPORA[name]:
        raise BitallocError(f"corpus '{name}' has no '{split}' split here (available: {', '.join(CORPORA[name])})")
    return CORPORA[name][split]


def _from_hub(source: Source) -> list[str] | None:
    if source.hub is None or not hub_reachable():
        return None
    dataset, config, split, field, data_files = source.hub
    try:
        import datasets

        return list(datasets.load_dataset(dataset, config, split=split, data_files=data_files)[field])
    except Exception as err:  # hub up but dataset missing, gated...: fall through to the clear message
        log.debug("datasets could not load %s: %s", dataset, err)
        return None


def load_documents(name: str, split: str, directory: str | os.PathLike | None = None) -> list[str]:
    """A corpus split as a list of documents (lines, for line-based corpora)."""
    source = _source(name, split)
    root = data_dir(directory)
    found = next((root / rel for rel in source.local if root is not None and (root / rel).is_file()), None)
    if found is not None:
        if source.documents:
            return read_documents(found)
        text = read_text_file(found)
        return text.splitlines() if source.joiner else [text]
    rows = _from_hub(source)
    if rows is not None:
        return rows
    where = f"{root / source.local[0]}" if root else f"--data-dir/{source.local[0]} (or ${ENV_DATA})"
    raise CorpusUnavailable(f"corpus {name}/{split} not available: put it at {where}, "
                            f"or make the Hugging Face hub reachable")


def load_text(name: str, split: str, directory: str | os.PathLike | None = None) -> str:
    """The text of a corpus split, joined as the evaluation protocol expects."""
    if name not in CORPORA and Path(name).is_file():
        return read_user_text(Path(name))
    source = _source(name, split)
    documents = load_documents(name, split, directory)
    if source.joiner:
        return source.joiner.join(line.strip() for line in documents)
    if len(documents) == 1:
        return documents[0]
    return HUB_JOIN.get(name, "\n\n").join(documents)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return ids.reshape(-1).long()


def ids_hash(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()[:16]


def document_windows(tokenizer, documents: list[str], seqlen: int, count: int, seed: int) -> torch.Tensor:
    """GPTQ's C4 sampling: `count` times, a random document longer than `seqlen`, a random window of it.

    Python's `random` seeded with `seed`, exactly as GPTQ draws, so the windows match its numbers.
    """
    if not documents:
        raise BitallocError("no documents to sample windows from")
    rng = random.Random(seed)
    picked, tries = [], 0
    while len(picked) < count:
        tries += 1
        if tries > 100 * count + 1000:
            raise BitallocError(f"too few documents longer than seqlen={seqlen} tokens to sample {count} windows")
        ids = tokenize(tokenizer, documents[rng.randint(0, len(documents) - 1)])
        if ids.numel() <= seqlen:
            continue
        start = rng.randint(0, ids.numel() - seqlen - 1)
        picked.append(ids[start : start + seqlen])
    return torch.stack(picked)


def calibration_ids(tokenizer, source: str = DEFAULT_CALIB, nsamples: int = 16, seqlen: int = 512,
                    seed: int = 0, directory=None) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens, reproducible from `seed`.

    Document corpora (c4, pileval) are sampled document by document, as GPTQ
    does for C4, so a shard of hundreds of MB is never tokenized whole.
    """
    split = CALIB_SPLIT.get(source, "train")
    if source in CORPORA and CORPORA[source][split].documents:
        return document_windows(tokenizer, load_documents(source, split, directory), seqlen, nsamples, seed)
    ids = tokenize(tokenizer, load_text(source, split, directory))
    if ids.numel() <= seqlen:
        raise BitallocError(f"calibration text '{source}' has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens, tail dropped (GPTQ protocol)."""
    count = ids.numel() // seqlen
    if count == 0:
        raise BitallocError(f"evaluation text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    return subset(ids[: count * seqlen].view(count, seqlen), max_windows)


def subset(all_windows: torch.Tensor, max_windows: int | None) -> torch.Tensor:
    """An evenly spaced subset of `max_windows` windows (first and last included): the quick mode.

    It still covers the whole corpus, so its PPL estimates the full one.
    """
    count = all_windows.shape[0]
    if max_windows is None or max_windows >= count:
        return all_windows
    if max_windows < 1:
        raise BitallocError(f"--eval-windows must be at least 1, got {max_windows}")
    picks = torch.linspace(0, count - 1, max_windows).round().long().unique()
    return all_windows[picks]


def c4_path(corpus: str) -> Path | None:
    """A path naming a C4 validation shard is evaluated with the C4 protocol."""
    path = Path(corpus)
    return path if path.name.startswith("c4-validation.") and path.is_file() else None


def eval_split(corpus: str) -> str:
    return "validation" if c4_path(corpus) else EVAL_SPLIT.get(corpus, "test")


def eval_windows(tokenizer, corpus: str = "wikitext2", seqlen: int = 2048, max_windows: int | None = None,
                 directory=None) -> torch.Tensor:
    """The windows of a corpus' evaluation split under its protocol (see the module doc)."""
    shard = c4_path(corpus)
    if shard is not None or corpus == "c4":
        documents = read_documents(shard) if shard else load_documents("c4", "validation", directory)
        return subset(document_windows(tokenizer, documents, seqlen, C4_WINDOWS, seed=0), max_windows)
    if corpus == "c4-new":
        text = " ".join(load_documents("c4", "validation", directory)[:C4_NEW_DOCUMENTS])
        ids = tokenize(tokenizer, text)[: C4_WINDOWS * seqlen]
        return windows(ids, seqlen, max_windows)
    return windows(tokenize(tokenizer, load_text(corpus, eval_split(corpus), directory)), seqlen, max_windows)
