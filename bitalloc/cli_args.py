"""Command-line arguments shared by search, apply and the scripts, and what they build."""
from __future__ import annotations

import argparse
import os

import torch

from .data import DEFAULT_CALIB, ENV_DATA, CorpusUnavailable, calibration_ids, data_dir, eval_split, eval_windows
from .errors import BitallocError
from .evaluate import Evaluation, Evaluator, default_seqlen
from .paths import cache_root
from .safe_json import is_finite_number


def add_model_args(parser: argparse.ArgumentParser, default_model: str | None = "smollm2-135m") -> None:
    """`default_model` None: the model comes from elsewhere (apply: the one the plan names)."""
    group = parser.add_argument_group("model and device")
    where = "smollm2-135m (the embedded default)" if default_model else "the plan's model (default), smollm2-135m"
    group.add_argument("--model", default=default_model,
                       help=f"{where}, a .gguf file, a Hugging Face directory or a hub id")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    group.add_argument("--cache-dir", default=None,
                       help="where sensitivity and reference caches live (default $BITALLOC_CACHE or ~/.cache/bitalloc)")


def add_data_args(parser: argparse.ArgumentParser, seqlen: int | None = 512, windows: int | None = 32,
                  evaluation: bool = True, from_plan: bool = False) -> None:
    """Calibration options, and with `evaluation` the evaluation ones; `from_plan` (apply): what the user
    leaves unset is taken from the plan, as its help says.  `seqlen` None: the model's context."""
    plan = " (default: the plan's, else %(default)s)" if from_plan else ""
    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", default=None, help=f"local corpora (layout of shared/data); default ${ENV_DATA}"
                       + (", else the plan's own (the directory its search read) where it still exists" if from_plan
                          else ""))
    group.add_argument("--calib", default=DEFAULT_CALIB,
                       help="calibration text: wiki, ptb (train), wikitext2 (validation), c4 (train shard), "
                            f"pileval or a .txt/.jsonl path{plan}")
    group.add_argument("--nsamples", type=int, default=16, help=f"calibration windows{plan}")
    group.add_argument("--calib-seqlen", type=int, default=512, help=f"tokens per calibration window{plan}")
    group.add_argument("--seed", type=int, default=0, help=f"seed for calibration sampling{plan}")
    if evaluation:
        group.add_argument("--eval", default="wikitext2",
                           help="evaluation corpora, comma-separated: wikitext2, ptb (test splits), c4, c4-new "
                                "(validation shard), or a text/JSONL path; a corpus that is not available is "
                                f"skipped with one line{plan}")
        unset = (" (default: the plan's)" if from_plan else
                 " (default: the model's context, at most 2048)" if seqlen is None else "")
        group.add_argument("--seqlen", type=int, default=seqlen, help=f"evaluation window length{unset}")
        group.add_argument("--eval-windows", type=int, default=windows,
                           help="evaluate an evenly spaced subset of N windows (0 = all)"
                                + (" (default: the plan's)" if from_plan else ""))
    group.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BitallocError(f"unknown device '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BitallocError(f"device '{name}' requested but CUDA is not available")
    return device


def check_positive(args, *names: str) -> None:
    """Counts and lengths must be at least 1: the shared ones and a command's own `names`.  Called before
    any model is loaded, so a bad value costs nothing."""
    _check(args, ("nsamples", "calib_seqlen", "seqlen", "batch_size", *names), lambda v: v >= 1, "at least 1")


def check_non_negative(args, *names: str) -> None:
    """Seeds, and counts where 0 means something (--eval-windows 0: all), must not be negative."""
    _check(args, ("seed", *names), lambda v: v >= 0, "0 or more")


def check_above_zero(args, *names: str) -> None:
    """Durations and fractions (floats) must be finite and above 0."""
    _check(args, names, lambda v: v > 0, "above 0")


def _check(args, names, ok, wanted: str) -> None:
    for name in names:
        value = getattr(args, name, None)  # None: not this command's, unset, or decided later (seqlen)
        if value is not None and not (is_finite_number(value) and ok(value)):
            raise BitallocError(f"--{name.replace('_', '-')} must be {wanted}, got {value}")


def calibration(args, loaded) -> torch.Tensor:
    return calibration_ids(loaded.tokenizer, args.calib, args.nsamples, args.calib_seqlen, args.seed, args.data_dir)


def calibration_record(args) -> dict:
    return {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.calib_seqlen, "seed": args.seed}


def corpora_location(args) -> dict:
    """Where the local corpora were read ({} for the hub): recorded in a plan so that apply finds the
    same text on the machine that searched without --data-dir.  Not part of the protocol's identity."""
    local = data_dir(args.data_dir)
    return {"data_dir": str(local.resolve())} if local else {}


def data_dir_for_plan(given: str | None, calibration: dict) -> str | None:
    """--data-dir as given, else $BITALLOC_DATA's (None here), else the directory the plan's search
    read where it still exists."""
    searched = calibration.get("data_dir")
    if given or os.environ.get(ENV_DATA) or not searched or not os.path.isdir(searched):
        return given
    return searched


def corpora(spec: str) -> list[str]:
    names = list(dict.fromkeys(name.strip() for name in spec.split(",") if name.strip()))
    if not names:
        raise BitallocError("--eval names no corpus")
    return names


def evaluator(args, loaded, device, progress: bool = True, keep_reference: bool = True) -> Evaluation:
    """Every corpus of --eval under its protocol; unavailable ones (C4 without its file) are skipped, said once."""
    if args.seqlen is None:
        args.seqlen = default_seqlen(loaded.model)
    max_windows = args.eval_windows or None
    found, unavailable = {}, {}
    for name in corpora(args.eval):
        try:
            windows = eval_windows(loaded.tokenizer, name, args.seqlen, max_windows, args.data_dir)
        except CorpusUnavailable as err:
            unavailable[name] = str(err)
            continue
        protocol = {"corpus": name, "split": eval_split(name),
                    "seqlen": args.seqlen, "windows": int(windows.shape[0]), "subset": max_windows is not None}
        found[name] = Evaluator(loaded, windows, protocol, cache_root(args.cache_dir), args.batch_size, device,
                                progress, keep_reference)
    return Evaluation(found, unavailable)
