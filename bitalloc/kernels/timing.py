"""Timing that the tuner and the benchmarks share: device events on CUDA, perf_counter on CPU.

Every timed call is preceded by a write of a buffer larger than the GPU's L2
cache (not timed), so a weight read comes from device memory as it does in a
real model, where every layer's weights are read once per token.
"""
from __future__ import annotations

import statistics
import time

import torch

L2_FLUSH_BYTES = 256 << 20
_flush_buffers: dict[torch.device, torch.Tensor] = {}


def _flush(device: torch.device) -> None:
    buffer = _flush_buffers.get(device)
    if buffer is None:
        buffer = _flush_buffers[device] = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    buffer.zero_()


def cold_timer():
    """A timer of one call of `fn` as a model decoded with CUDA graphs runs it: replayed from a graph (no
    launch overhead) right after other work that evicted its weights from L2 (an L2 flush, whose own
    replay time is subtracted).  The flush is timed once, for every call the timer compares: it takes
    several times longer than a GEMV, so timing it anew for each would add its noise to every figure,
    while one figure subtracted from all cannot reorder them."""
    device = torch.device("cuda", torch.cuda.current_device())
    flush = lambda: _flush(device)  # noqa: E731
    flush_seconds = time_cuda_graph([flush], min_calls=100)
    return lambda fn: 2 * time_cuda_graph([flush, fn]) - flush_seconds


def time_cuda(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of one call of `fn` on the current CUDA device, cold L2."""
    device = torch.device("cuda", torch.cuda.current_device())
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        _flush(device)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def time_cpu(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of one call of `fn` on the CPU (wall clock)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_cuda_graph(calls, min_calls: int = 20, reps: int = 10) -> float:
    """Median seconds per call of `calls` replayed back to back from one CUDA graph.

    Launch overhead stays out (as in a model decoded with graphs); the callers
    pass calls on different weight copies, enough to exceed the L2 cache, so
    weights come from device memory.  Each call runs once before capture, so
    kernel tuning and compilation happen outside the graph.
    """
    for call in calls:
        call()
    torch.cuda.synchronize()
    rounds = max(1, -(-min_calls // len(calls)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for call in calls:
                call()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (rounds * len(calls)))
    return statistics.median(times)
