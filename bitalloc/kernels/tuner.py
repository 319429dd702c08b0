"""Which way to launch a kernel call: measured once per key, kept for the process.

Several layers have more than one way to run (the weight-only GEMV or
dequantize + cuBLAS; the fused W8A8 matmul or `_int_mm` + an epilogue kernel;
each with launch parameters), and which is fastest depends on the GPU and the
shape.  So the first call of a key times every choice as a decode step with
CUDA graphs runs it, replayed from a graph after an L2 flush
(`timing.cold_timer`), and keeps the fastest.  (Timing single calls with
events picked configurations up to 1.8x slower under graph replay on the
H200.)  The least of a few dozen noisy figures favours whichever choice was
timed low by chance, so the choices within CLOSE of it are timed again,
interleaved, and the median of each one's figures decides.  Before a choice is
timed, its output on that first call's input is checked against a reference
choice's (the plainest way: dequantize + cuBLAS, `_int_mm` + rescaling), and a
choice that disagrees is dropped with a warning: a kernel wrong on some GPU,
shape or compiler costs speed, never correctness.
BITALLOC_TRITON_TUNE=0 takes the first choice (tests: one compilation per
kernel), and so does Triton's CPU interpreter.

Where several choices time alike, two processes may keep different ones and
their decode steps differ by a few percent (docs/RESULTS.md, issue 8, point 5).
`preset` takes an earlier run's choices (the `<out>_tuner.json` a benchmark
writes), so a benchmark can repeat its launches exactly; a preset choice is
still checked against the reference once, and timed over if it disagrees.

What a process times on a GPU is kept in a cache file (`cache_file`: one per
GPU model, torch and Triton versions and kernel sources), and the next process
takes it back as presets: a second run neither spends the timing again nor
lands on different launches.  BITALLOC_TUNER_CACHE names another file, or
`off` (the benchmark scripts time afresh).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import logging
import os
import re
import statistics
from pathlib import Path
from typing import Callable, Hashable, Sequence

from .. import atomic
from ..errors import BitallocError, first_line
from ..paths import cache_root
from ..safe_json import load_json
from .timing import cold_timer

log = logging.getLogger(__name__)

CHOSEN: dict[tuple, Hashable] = {}
PRESET: dict[str, Hashable] = {}  # keys as `choices_made` writes them
AGREEMENT = 1e-2  # relative L2 error against the reference choice (float16 kernels differ by ~1e-3)
CLOSE = 1.1  # choices within this factor of the fastest first figure are timed again ...
RECHECKS = 3  # ... this many times each, interleaved, at most CONTENDERS of them
CONTENDERS = 4
CACHE_ENV = "BITALLOC_TUNER_CACHE"
_recalled = False  # whether this process has read the cache file yet


def _written(key: tuple) -> str:
    return " ".join(map(str, key))


def choices_made() -> dict[str, str]:
    """CHOSEN as plain data (a benchmark writes it beside its timings: which launch each shape got)."""
    return {_written(key): repr(choice) for key, choice in CHOSEN.items()}


def preset(choices: dict, replace: bool = True) -> None:
    """Take `choices` (a `choices_made()` of an earlier run) for their keys instead of timing (with `replace`
    False, only for keys that have no preset yet)."""
    for key, choice in choices.items():
        try:
            launch = ast.literal_eval(choice)
        except (ValueError, SyntaxError, TypeError):
            raise BitallocError(f"tuner choice for {key!r} is not a launch as choices_made writes it: {choice!r}") from None
        if replace or str(key) not in PRESET:
            PRESET[str(key)] = launch


def cache_file() -> Path | None:
    """Where timed choices are kept: $BITALLOC_TUNER_CACHE, None when that is `off` or there is no GPU, else
    <cache root>/tuner/<GPU>-<hash of torch's and Triton's versions and the kernel sources>.json."""
    setting = os.environ.get(CACHE_ENV, "")
    if setting.lower() in ("off", "0", "no", "false"):
        return None
    if setting:
        return Path(setting)
    import torch

    if not torch.cuda.is_available():
        return None
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
    return cache_root() / "tuner" / f"{gpu}-{_toolchain_hash()}.json"


@functools.lru_cache(maxsize=None)
def _toolchain_hash() -> str:
    import torch

    digest = hashlib.sha256(torch.__version__.encode())
    try:
        import triton

        digest.update(triton.__version__.encode())
    except ImportError:
        pass
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def _stored(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        stored = load_json(path, "tuner cache")
    except BitallocError as err:
        raise BitallocError(f"{err}; delete it or set {CACHE_ENV}=off") from None
    if not isinstance(stored, dict) or not all(isinstance(v, str) for v in stored.values()):
        raise BitallocError(f"tuner cache {path} is not a tuner file; delete it or set {CACHE_ENV}=off")
    return stored


def _recall() -> None:
    """Once per process: the cache file's choices become presets (explicit presets keep precedence)."""
    global _recalled
    if _recalled:
        return
    _recalled = True
    path = cache_file()
    stored = {} if path is None else _stored(path)
    if stored:
        try:
            preset(stored, replace=False)
        except BitallocError as err:
            raise BitallocError(f"tuner cache {path}: {err}; delete it or set {CACHE_ENV}=off") from None
        log.info("tuner: %d launch choices from %s", len(stored), path)


def _remember() -> None:
    """Add this process's choices to the cache file (written whole: temp file, then rename; under a lock, so
    processes tuning at once keep each other's choices)."""
    path = cache_file()
    if path is not None:
        with atomic.locked(path):
            atomic.write_json(path, {**_stored(path), **choices_made()})


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def tuning() -> bool:
    return os.environ.get("BITALLOC_TRITON_TUNE", "1") != "0" and not interpreting()


def choose(key: tuple, choices: Sequence[Hashable], run: Callable[[Hashable], object],
           reference: Hashable | None = None) -> Hashable:
    """The choice for `key` (timing `run(choice)` for each on first sight, each checked against
    `run(reference)`, one of the choices)."""
    choice = CHOSEN.get(key)
    if choice is None:
        if tuning():
            _recall()
        choice = _preset(key, choices, run, reference)
        timed = choice is None and tuning()
        if timed:
            choice = _fastest(key, choices, run, reference)
        CHOSEN[key] = choice = choices[0] if choice is None else choice
        if timed:
            _remember()
    return choice


def _preset(key, choices, run, reference) -> Hashable | None:
    """The preset choice for `key` if it is one of `choices` and agrees with the reference, else None."""
    choice = PRESET.get(_written(key))
    if choice is None:
        return None
    if choice not in choices:
        log.warning("%s: preset %s is not among this call's choices; timing them", key[0], choice)
        return None
    if reference is not None and choice != reference:
        try:
            error = _error(run, choice, run(reference).float())
        except Exception as err:  # compiled on another machine's toolchain, perhaps
            log.warning("%s: preset %s failed (%s); timing the choices", key[0], choice, first_line(err))
            return None
        if not error <= AGREEMENT:
            log.warning("%s: preset %s is %.2g off the reference %s; timing the choices", key[0], choice, error,
                        reference)
            return None
    return choice


def _error(run, choice, expected) -> float:
    """Relative L2 error of `choice`'s output against `expected` (NaN when it makes NaNs)."""
    return float((run(choice).float() - expected).norm() / expected.norm().clamp_min(1e-12))


def _fastest(key, choices, run, reference):
    expected = None if reference is None else run(reference).float()
    timed = cold_timer()
    timings = {}
    for choice in choices:
        try:
            if expected is not None and choice != reference:
                error = _error(run, choice, expected)
                if not error <= AGREEMENT:  # NaN included
                    log.warning("%s %s dropped: its output is %.2g off the reference %s (relative L2 error)",
                                key[0], choice, error, reference)
                    continue
            timings[choice] = [timed(lambda: run(choice))]
        except Exception as err:  # a configuration the compiler rejects (resources): skip it
            log.warning("%s %s failed: %s", key[0], choice, first_line(err, 200))
    if not timings:
        raise RuntimeError(f"no launch choice compiled for {key}")
    first = min(figures[0] for figures in timings.values())
    contenders = sorted((c for c in timings if timings[c][0] <= CLOSE * first), key=lambda c: timings[c][0])
    contenders = contenders[:CONTENDERS] if len(contenders) > 1 else []
    for _ in range(RECHECKS):
        for choice in contenders:
            timings[choice].append(timed(lambda: run(choice)))
    best = min(contenders or timings, key=lambda c: statistics.median(timings[c]))
    log.debug("tuned %s: %s (%.1f us)", key, best, statistics.median(timings[best]) * 1e6)
    return best
