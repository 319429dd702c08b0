"""Corpora, seeded calibration windows and evaluation windows (GPTQ protocol).

Text comes from a local data directory (`--data-dir`, or the BITALLOC_DATA
environment variable; the layout is that of ../shared/data) or, where the
Hugging Face hub is reachable, from `datasets`.  Calibration never reads a
test split.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from .errors import BitallocError

log = logging.getLogger(__name__)

ENV_DATA = "BITALLOC_DATA"
DEFAULT_CALIB = "wiki"

# name -> split -> (local file, how its lines are joined, `datasets` fallback)
CORPORA = {
    "wikitext2": {
        "test": ("wikitext2/test.txt", None, ("wikitext", "wikitext-2-raw-v1", "test", "text", "\n\n")),
        "validation": ("wikitext2/valid.tokens.txt", None,
                       ("wikitext", "wikitext-2-v1", "validation", "text", "\n\n")),
    },
    "ptb": {
        split: (f"ptb/{file}.txt", " ", ("ptb_text_only", "penn_treebank", split, "sentence", " "))
        for split, file in (("test", "test"), ("validation", "valid"), ("train", "train"))
    },
    "wiki": {"train": ("calib/wiki.txt", None, None)},
}
CALIB_SPLIT = {"wiki": "train", "ptb": "train", "wikitext2": "validation"}


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    value = explicit or os.environ.get(ENV_DATA)
    if not value:
        return None
    path = Path(value)
    if not path.is_dir():
        raise BitallocError(f"data directory not found: {path}")
    return path


def read_user_text(path: Path) -> str:
    """A user's own calibration file: plain text, or JSONL with a "text" field (optionally .gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            raw = handle.read()
    except (OSError, UnicodeDecodeError) as err:
        raise BitallocError(f"cannot read text file {path}: {err}") from None
    stem = path.name.removesuffix(".gz")
    if stem.endswith((".jsonl", ".json")):
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    raise BitallocError(f"{path}:{number}: expected a JSON object with a 'text' field") from None
        return "\n\n".join(texts)
    return raw


def load_text(name: str, split: str, directory: str | os.PathLike | None = None) -> str:
    """The text of a corpus split, joined as the evaluation protocol expects."""
    if name not in CORPORA and Path(name).is_file():
        return read_user_text(Path(name))
    if name not in CORPORA:
        raise BitallocError(f"unknown corpus '{name}' (known: {', '.join(CORPORA)}, or a path to a text/JSONL file)")
    if split not in CORPORA[name]:
        raise BitallocError(f"corpus '{name}' has no '{split}' split here (available: {', '.join(CORPORA[name])})")
    local, joiner, remote = CORPORA[name][split]
    root = data_dir(directory)
    if root is not None and (root / local).is_file():
        text = (root / local).read_text(encoding="utf-8")
        return joiner.join(line.strip() for line in text.splitlines()) if joiner else text
    if remote is not None:
        try:
            import datasets

            dataset_name, config, remote_split, field, join = remote
            rows = datasets.load_dataset(dataset_name, config, split=remote_split)[field]
            return join.join(row.strip() if join == " " else row for row in rows)
        except Exception as err:  # offline, missing config...: fall through to the clear message
            log.debug("datasets could not load %s: %s", name, err)
    where = f"{root / local}" if root else f"--data-dir/{local} (or ${ENV_DATA})"
    raise BitallocError(f"corpus {name}/{split} not found: put it at {where}, or make the Hugging Face hub reachable")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return ids.reshape(-1).long()


def ids_hash(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()[:16]


def calibration_ids(tokenizer, source: str = DEFAULT_CALIB, nsamples: int = 16, seqlen: int = 512,
                    seed: int = 0, directory=None) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens, reproducible from `seed`."""
    split = CALIB_SPLIT.get(source, "train")
    ids = tokenize(tokenizer, load_text(source, split, directory))
    if ids.numel() <= seqlen:
        raise BitallocError(f"calibration text '{source}' has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens, tail dropped (GPTQ protocol).

    With `max_windows`, an evenly spaced subset of them (first and last included):
    a quick estimate that still covers the whole corpus.
    """
    count = ids.numel() // seqlen
    if count == 0:
        raise BitallocError(f"evaluation text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    all_windows = ids[: count * seqlen].view(count, seqlen)
    if max_windows is None or max_windows >= count:
        return all_windows
    if max_windows < 1:
        raise BitallocError(f"--eval-windows must be at least 1, got {max_windows}")
    picks = torch.linspace(0, count - 1, max_windows).round().long().unique()
    return all_windows[picks]


def eval_windows(tokenizer, corpus: str = "wikitext2", seqlen: int = 2048, max_windows: int | None = None,
                 directory=None) -> torch.Tensor:
    return windows(tokenize(tokenizer, load_text(corpus, "test", directory)), seqlen, max_windows)
