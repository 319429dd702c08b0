"""Greedy decoding with a static KV cache, one CUDA graph per decode step: tokens/s and latency.

The same harness runs the unquantized and the packed model, so their ratio is
the speed-up of the packed layers alone.  Every decode step has the same
shapes (one token, a fixed-size cache), so on CUDA the step is captured once as
a graph and replayed: launch overhead stays out of the figures and the kernels
run back to back, as a serving engine runs them.  Tuning of the Triton kernels
happens in the warm-up steps, before capture.

With `compile`, torch.compile fuses the small operations between the linear
layers (norms, rotary embedding, residuals, SiLU * up): in eager mode a decoder
block launches a few dozen tiny kernels, and in a graph each still costs a few
microseconds.  The first warm-up step runs eagerly, so every packed layer has
built its kernel state and tuned its launches; traced after that, a `triton`
layer is one opaque operator inside the graph, and other backends are graph
breaks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class DecodeResult:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    step_seconds: list[float]
    tokens: list[int]  # every generated token: the prefill's, the warm-up steps' and the timed steps'
    kernels: str = ""  # with `profile`: GPU time per kernel over the profiled steps (torch.profiler table)

    @property
    def tokens_per_second(self) -> float:
        return len(self.step_seconds) / sum(self.step_seconds)

    @property
    def latency_ms(self) -> dict:
        ordered = sorted(self.step_seconds)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3  # noqa: E731
        return {"mean": sum(ordered) / len(ordered) * 1e3, "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "prefill_ms": self.prefill_seconds * 1e3, "tokens_per_second": self.tokens_per_second,
                "latency_ms": self.latency_ms}


class _Step:
    """One decode step on static buffers: ids [1, 1] and position [1] in, next-token logits out."""

    def __init__(self, model, cache, device, compile: bool = False):
        self.model, self.cache = model, cache
        self.forward = torch.compile(self._forward, dynamic=False) if compile else self._forward
        self.prepared = not compile  # a compiled step is traced after one eager step has built the kernels
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None
        self.logits = None

    def _forward(self):
        return self.model(input_ids=self.ids, cache_position=self.position, past_key_values=self.cache,
                          use_cache=True).logits[:, -1]

    def capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.forward()  # settle lazy allocations on the side stream
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.forward()

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        self.ids.copy_(token.view(1, 1))
        self.position.fill_(position)
        if not self.prepared:
            self.prepared = True
            return self._forward()
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.logits


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode(model, prompt: torch.Tensor, new_tokens: int, warmup: int = 3, graphs: bool = True,
           compile: bool = False, profile: int = 0) -> DecodeResult:
    """Greedy-decode `new_tokens` after `prompt` [1, L]; times the prefill and every decode step
    (compiled by torch.compile with `compile`: the warm-up steps compile it).  With `profile`, that
    many further steps run under torch.profiler: where the step's GPU time goes, kernel by kernel."""
    from transformers import StaticCache

    device = prompt.device
    total = prompt.shape[1] + warmup + new_tokens + profile + 1
    cache = StaticCache(config=model.config, max_cache_len=total)
    start = time.perf_counter()
    logits = model(input_ids=prompt, cache_position=torch.arange(prompt.shape[1], device=device),
                   past_key_values=cache, use_cache=True).logits[:, -1]
    _sync(device)
    prefill = time.perf_counter() - start
    step = _Step(model, cache, device, compile)
    position = prompt.shape[1]
    token = logits.argmax(-1)
    tokens, times = [int(token)], []
    for _ in range(warmup):  # tunes kernels and fills allocator pools before capture
        token = step(token, position).argmax(-1)
        tokens.append(int(token))
        position += 1
    if graphs and device.type == "cuda":
        step.capture()
    for _ in range(new_tokens):
        _sync(device)
        start = time.perf_counter()
        token = step(token, position).argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - start)
        tokens.append(int(token))
        position += 1
    kernels = _profile(step, token, position, profile) if profile else ""
    return DecodeResult(prompt.shape[1], new_tokens, prefill, times, tokens, kernels)


def _profile(step: _Step, token: torch.Tensor, position: int, steps: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for offset in range(steps):
            token = step(token, position + offset).argmax(-1)
        _sync(token.device)
        seconds = time.perf_counter() - start
    events = prof.key_averages()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    summary = gpu_time_line(events, steps, seconds) if torch.cuda.is_available() else ""
    return summary + events.table(sort_by=sort, row_limit=25, max_name_column_width=70)


def gpu_time_line(events, steps: int, seconds: float) -> str:
    """Per step: GPU operations launched, their summed GPU time, and the step's wall time under the
    profiler; the difference is time the GPU spent between operations (launch gaps, waits on the host)."""
    device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = sum(e.count for e in device) / steps
    busy = sum(e.self_device_time_total for e in device) / 1e6 / steps
    wall = seconds / steps
    idle = max(0.0, wall - busy)
    return (f"per step: {launches:.0f} GPU operations, {busy * 1e3:.3f} ms of GPU time, {wall * 1e3:.3f} ms wall "
            f"under the profiler: {idle * 1e3:.3f} ms ({100 * idle / wall:.0f} %) between operations\n")
