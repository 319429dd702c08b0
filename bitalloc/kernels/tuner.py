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
"""
from __future__ import annotations

import logging
import os
import statistics
from typing import Callable, Hashable, Sequence

from .timing import cold_timer

log = logging.getLogger(__name__)

CHOSEN: dict[tuple, Hashable] = {}
AGREEMENT = 1e-2  # relative L2 error against the reference choice (float16 kernels differ by ~1e-3)
CLOSE = 1.1  # choices within this factor of the fastest first figure are timed again ...
RECHECKS = 3  # ... this many times each, interleaved, at most CONTENDERS of them
CONTENDERS = 4


def choices_made() -> dict[str, str]:
    """CHOSEN as plain data (a benchmark writes it beside its timings: which launch each shape got)."""
    return {" ".join(map(str, key)): str(choice) for key, choice in CHOSEN.items()}


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
        choice = CHOSEN[key] = _fastest(key, choices, run, reference) if tuning() else choices[0]
    return choice


def _fastest(key, choices, run, reference):
    expected = None if reference is None else run(reference).float()
    timed = cold_timer()
    timings = {}
    for choice in choices:
        try:
            if expected is not None and choice != reference:
                error = float((run(choice).float() - expected).norm() / expected.norm().clamp_min(1e-12))
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
