"""Kernel and layer benchmarks: packed layers against the dense baseline, with roofline figures.

A row is one (device, backend, option, layer shape, batch) timing.  On CUDA the
baseline is the float16 layer (cuBLAS); on the CPU it is float32.  Every call
reads a different copy of the weights, enough copies that they do not fit the
last-level cache (L2 on the GPU), since in a model every layer's weights are
read once per token.  On CUDA the calls are replayed from one CUDA graph, so
launch overhead stays out, as in graph-captured decoding.

Achieved bandwidth counts the bytes the layer must read at least once: the
stored weight tensors (codes, scales, zeros; `layout.py`) plus activations in
and out.  The roofline percentage divides it by a given memory bandwidth.
"""
from __future__ import annotations

import copy
import csv
import logging
import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import atomic
from .kernels.quant_linear import QuantLinear
from .kernels.timing import time_cpu, time_cuda, time_cuda_graph
from .quant import parse, quantize
from .quant.calib import LayerCalib

log = logging.getLogger(__name__)

# (out_features, in_features) of the distinct decoder linears
LAYER_SHAPES = {
    "llama-2-7b": {"q/k/v/o_proj": (4096, 4096), "gate/up_proj": (11008, 4096), "down_proj": (4096, 11008)},
    "llama-2-70b": {"q/o_proj": (8192, 8192), "k/v_proj": (1024, 8192), "gate/up_proj": (28672, 8192),
                    "down_proj": (8192, 28672)},
}
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DENSE = "dense"
CPU_CACHE_BYTES = 32 << 20  # last-level cache of the development CPU (lscpu)
COLUMNS = ("device", "model", "layer", "backend", "option", "kernel", "out_features", "in_features", "batch",
           "seconds", "latency_ms", "weight_bytes", "gbps", "roofline_pct", "speedup")


def random_layer(out_features: int, in_features: int, option: str, device, backend: str) -> nn.Module:
    """A layer of that shape with random weights: nn.Linear for "dense", else a packed QuantLinear."""
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(out_features * 7919 + in_features)
    weight = torch.randn(out_features, in_features, device=device, generator=generator) * 0.02
    if backend == DENSE:
        layer = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
        layer.weight.data.copy_(weight)
        return layer.requires_grad_(False)
    return pack_weight(weight, parse(option), None, backend)


def pack_weight(weight: torch.Tensor, option, bias, backend: str) -> QuantLinear:
    """Quantize on the weight's device (RTN is fast on a GPU) and pack; `outliers=k` gets calibration
    statistics that make k evenly spaced input channels the fp16 outlier channels (benchmarks need
    their cost, not their choice)."""
    weight = weight.float()
    qw = quantize(weight, option, _spread_outliers(weight, option)) if option.quantized else None
    layer = QuantLinear.from_weight(qw, bias, dense=weight).to(weight.device)
    layer.set_backend(backend)
    return layer


def _spread_outliers(weight: torch.Tensor, option) -> LayerCalib | None:
    """Calibration inputs whose largest channels are `outliers` evenly spaced ones (None without outliers)."""
    count = option.param("outliers", 0, int)
    if not count:
        return None
    calib = LayerCalib(weight.shape[1], max_rows=0, hessian=False)
    x = torch.ones(1, weight.shape[1], device=weight.device)
    x[:, torch.linspace(0, weight.shape[1] - 1, count, device=weight.device).long()] = 100.0
    calib.add(x)
    return calib


@torch.no_grad()
def pack_in_place(model: nn.Module, assignment: dict, backend: str, progress: bool = True) -> None:
    """Replace each linear named in `assignment` by its packed QuantLinear, on the device it is on."""
    from .blocks import replace_module

    for name, option in tqdm(list(assignment.items()), desc="pack", unit="layer", disable=not progress):
        module = model.get_submodule(name)
        bias = getattr(module, "bias", None)
        layer = pack_weight(module.weight.detach(), option, bias, backend)
        replace_module(model, name, layer)
        del module


def weight_bytes(layer: nn.Module) -> int:
    if isinstance(layer, QuantLinear):
        return sum(b.numel() * b.element_size() for b in layer.buffers())
    return layer.weight.numel() * layer.weight.element_size()


MAX_COPIES = 64


def copies_beyond_cache(layer: nn.Module, cache_bytes: int) -> list[nn.Module]:
    """Enough copies of a layer that cycling through them reads from memory, not cache
    (at most MAX_COPIES: layers under cache_bytes / 16 are timed partly from cache)."""
    count = min(MAX_COPIES, max(2, math.ceil(4 * cache_bytes / weight_bytes(layer))))
    layers = [layer]
    for _ in range(count - 1):
        twin = copy.deepcopy(layer)
        if isinstance(twin, QuantLinear):
            twin.set_backend(layer.backend)
        layers.append(twin)
    return layers


@torch.no_grad()
def time_layer(layer: nn.Module, batch: int, device) -> float:
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    in_features = layer.in_features
    x = torch.randn(batch, in_features, device=device, dtype=dtype)
    if device.type == "cuda":
        layers = copies_beyond_cache(layer, torch.cuda.get_device_properties(device).L2_cache_size)
        seconds = time_cuda_graph([lambda layer=layer: layer(x) for layer in layers])
        del layers
        return seconds
    layers = copies_beyond_cache(layer, CPU_CACHE_BYTES)
    turn = iter(range(1 << 62))
    return time_cpu(lambda: layers[next(turn) % len(layers)](x), reps=max(20, 2 * len(layers)))


SPEC_BANDWIDTH = {"NVIDIA H100 80GB HBM3": 3.35e12, "NVIDIA H200": 4.8e12}  # HBM bytes/s by device name


def roofline_bandwidth(device) -> tuple[float, str]:
    """(bytes/s the roofline uses, a line saying where it comes from): the data sheet's figure for known
    GPUs, else a measured device copy."""
    copied = measure_bandwidth(device)
    spec = SPEC_BANDWIDTH.get(torch.cuda.get_device_name(device))
    bandwidth = spec or copied
    return bandwidth, (f"roofline: {bandwidth / 1e12:.2f} TB/s ({'spec' if spec else 'measured copy'}); "
                       f"measured device copy {copied / 1e12:.2f} TB/s")


def measure_bandwidth(device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy, read plus write counted."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = time_cuda(lambda: dst.copy_(src), reps=10)
    return 2 * src.numel() * 4 / seconds


@torch.no_grad()
def kernel_rows(device, backends: dict[str, list[str]], shapes: dict, batches=BATCHES, bandwidth: float | None = None,
                progress: bool = True) -> list[dict]:
    """Time every (backend, option) of `backends` on every layer shape and batch, with the dense baseline."""
    device = torch.device(device)
    rows = []
    work = [(model, name, shape) for model, layers in shapes.items() for name, shape in layers.items()]
    for model, name, (out_features, in_features) in tqdm(work, desc="shapes", disable=not progress):
        baseline = {}
        cases = [(DENSE, "fp16" if device.type == "cuda" else "fp32")]
        cases += [(backend, option) for backend, options in backends.items() for option in options]
        for backend, option in cases:
            layer = random_layer(out_features, in_features, option, device, backend)
            stored = weight_bytes(layer)
            for batch in batches:
                seconds = time_layer(layer, batch, device)
                if backend == DENSE:
                    baseline[batch] = seconds
                moved = stored + batch * (in_features + out_features) * (2 if device.type == "cuda" else 4)
                kernel = getattr(layer, "kernel", None) or ("cuBLAS" if device.type == "cuda" else "torch")
                rows.append({
                    "device": _device_name(device), "model": model, "layer": name, "backend": backend,
                    "option": option, "kernel": kernel, "out_features": out_features,
                    "in_features": in_features, "batch": batch, "seconds": seconds, "latency_ms": seconds * 1e3,
                    "weight_bytes": stored, "gbps": moved / seconds / 1e9,
                    "roofline_pct": 100 * moved / seconds / bandwidth if bandwidth else None,
                    "speedup": baseline[batch] / seconds,
                })
            del layer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_csv(rows: list[dict], path, columns=COLUMNS) -> None:
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def write_latency_table(rows: list[dict], path) -> None:
    """The cost model's latency table (bitalloc.cost): backend,batch,out_features,in_features,option,latency_ms.

    The dense baseline is written as option `fp16` of every backend measured, so
    a plan's fp16 layers have a latency under any backend.
    """
    table = {}
    backends = sorted({r["backend"] for r in rows if r["backend"] != DENSE})
    for r in rows:
        names = backends if r["backend"] == DENSE else [r["backend"]]
        option = "fp16" if r["backend"] == DENSE else r["option"]
        for backend in names:
            key = (backend, r["batch"], r["out_features"], r["in_features"], option)
            table[key] = dict(zip(("backend", "batch", "out_features", "in_features", "option"), key),
                              latency_ms=r["latency_ms"], device=r["device"])
    write_csv(list(table.values()), path, ("backend", "batch", "out_features", "in_features", "option",
                                           "latency_ms", "device"))


def plot_speedups(rows: list[dict], path, title: str) -> None:
    """One panel per layer shape: speed-up over the dense baseline against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["model"], r["layer"], r["out_features"], r["in_features"]) for r in rows})
    cols = min(4, len(shapes))
    fig, axes = plt.subplots(math.ceil(len(shapes) / cols), cols, figsize=(4.2 * cols, 3.4 * math.ceil(len(shapes) / cols)),
                             squeeze=False)
    for ax, (model, layer, out_features, in_features) in zip(axes.flat, shapes):
        mine = [r for r in rows if (r["model"], r["layer"]) == (model, layer)]
        for backend, option in sorted({(r["backend"], r["option"]) for r in mine}):
            line = sorted((r["batch"], r["speedup"]) for r in mine if (r["backend"], r["option"]) == (backend, option))
            ax.plot(*zip(*line), marker="o", label=f"{backend} {option}")
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"{model} {layer} {out_features}x{in_features}", fontsize=9)
        ax.set_xlabel("batch")
        ax.set_ylabel("speed-up vs dense")
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic.atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def summary(rows: list[dict]) -> str:
    """A fixed-width table of every row (the text results file)."""
    head = f"{'model':<12} {'layer':<13} {'shape':>11} {'backend':<14} {'option':<22} {'batch':>5} " \
           f"{'us':>9} {'GB/s':>8} {'roof%':>6} {'speedup':>7}"
    lines, fallbacks = [head, "-" * len(head)], {}
    for r in rows:
        roof = f"{r['roofline_pct']:6.1f}" if r["roofline_pct"] is not None else "     -"
        backend = r["backend"]
        if str(r.get("kernel", "")).startswith("reference ("):  # the backend handed this layer to `reference`
            backend = f"{backend}->ref"
            fallbacks[(backend, r["option"])] = r["kernel"]
        lines.append(f"{r['model']:<12} {r['layer']:<13} {r['out_features']:>5}x{r['in_features']:<5} "
                     f"{backend:<14} {r['option']:<22} {r['batch']:>5} {r['seconds'] * 1e6:9.1f} "
                     f"{r['gbps']:8.1f} {roof} {r['speedup']:7.2f}")
    lines += [f"{backend} {option}: computed by {kernel}" for (backend, option), kernel in fallbacks.items()]
    return "\n".join(lines) + "\n"


# --- whole models built from a config (random weights) -------------------------------

LLAMA_CONFIGS = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
}


def random_llama(name: str, device, layers: int | None = None, head: bool = True):
    """A Llama of that shape with random float16 weights, initialised directly on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    settings = dict(LLAMA_CONFIGS[name])
    if layers is not None:
        settings["num_hidden_layers"] = layers
    config = LlamaConfig(**settings, tie_word_embeddings=False)
    with torch.device(device):
        cls = LlamaForCausalLM if head else LlamaModel
        model = cls._from_config(config, dtype=torch.float16)
    return model.eval().requires_grad_(False)


MIXES = {
    # about 4 bits per weight: 3-bit where llama.cpp's mixes spend least (q, k, gate), 4-bit elsewhere,
    # 8-bit for down_proj of the first and last two blocks (the sensitive ones)
    "mixed4": {"q_proj": "rtn:int3:g128:asym", "k_proj": "rtn:int3:g128:asym", "v_proj": "rtn:int4:g128:asym",
               "o_proj": "rtn:int4:g128:asym", "gate_proj": "rtn:int3:g128:asym", "up_proj": "rtn:int4:g128:asym",
               "down_proj": "rtn:int4:g128:asym", "edge_down_proj": "rtn:int8:g128:asym"},
    # the same idea with one option per group of layers reading one input (q/k/v, gate/up), so that
    # `decode.py --fuse` can stack each group into one wider layer: 3.92 bits per weight on Llama-2-7B
    "mixed4-tied": {"q_proj": "rtn:int4:g128:asym", "k_proj": "rtn:int4:g128:asym", "v_proj": "rtn:int4:g128:asym",
                    "o_proj": "rtn:int4:g128:asym", "gate_proj": "rtn:int3:g128:asym",
                    "up_proj": "rtn:int3:g128:asym", "down_proj": "rtn:int4:g128:asym",
                    "edge_down_proj": "rtn:int8:g128:asym"},
    "int4": {"*": "rtn:int4:g128:asym"},
    "w8a8": {"*": "rtn:int8:pc:sym:a8"},
}


def mix_assignment(model: nn.Module, mix: str) -> dict:
    """Layer name -> Option for one of MIXES."""
    from .models import find_blocks, linear_layers

    rule = MIXES[mix]
    blocks = len(find_blocks(model)[1])
    assignment = {}
    for name in linear_layers(model):
        short = name.rsplit(".", 1)[-1]
        index = int(name.split(".")[-3])
        key = "edge_down_proj" if short == "down_proj" and (index < 2 or index >= blocks - 2) else short
        assignment[name] = parse(rule.get(key, rule.get(short, rule.get("*"))))
    return assignment
