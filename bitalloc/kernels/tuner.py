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
"""
from __future__ import annotations

import ast
import logging
import os
import statistics
from typing import Callable, Hashable, Sequence

from ..errors import BitallocError
from .timing import cold_timer

log = logging.getLogger(__name__)

CHOSEN: dict[tuple, Hashable] = {}
PRESET: dict[str, Hashable] = {}  # keys as `choices_made` writes them
AGREEMENT = 1e-2  # relative L2 error against the reference choice (float16 kernels differ by ~1e-3)
CLOSE = 1.1  # choices within this factor of the fastest first figure are timed again ...
RECHECKS = 3  # ... this many times each, interleaved, at most CONTENDERS of them
CONTENDERS = 4


def _written(key: tuple) -> str:
    return " ".join(map(str, key))


def choices_made() -> dict[str, str]:
    """CHOSEN as plain data (a benchmark writes it beside its timings: which launch each shape got)."""
    return {_written(key): str(choice) for key, choice in CHOSEN.items()}


def preset(choices: dict) -> None:
    """Take `choices` (a `choices_made()` of an earlier run) for their keys instead of timing."""
    for key, choice in choices.items():
        try:
            PRESET[str(key)] = ast.literal_eval(choice)
        except (ValueError, SyntaxError, TypeError):
            raise BitallocError(f"tuner choice for {key!r} is not a launch as choices_made writes it: {choice!r}")


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
        choice = CHOSEN[key] = _preset(key, choices, run, reference) or (
            _fastest(key, choices, run, reference) if tuning() else choices[0])
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
            log.warning("%s: preset %s failed (%s); timing the choices", key[0], choice, str(err).splitlines()[0])
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
            log.warning("%s %s failed: %s", key[0], choice, str(err).splitlines()[0][:200])
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
