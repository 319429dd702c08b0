"""Numerical guards: a NaN or Inf stops the run where it first appears, with the name of what made it.

One NaN weight turns every later activation, sensitivity and perplexity into NaN;
left alone it surfaces hours later as a solver failure or a plan chosen on
garbage.  These checks are called once per model, block, layer or evaluation
batch, so they cost a small fraction of the work they protect.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
from torch import nn

from .errors import BitallocError
from .hooks import run_hooked


def _finite(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or tensor.device.type == "meta" or bool(torch.isfinite(tensor).all())


def check_weights(model: nn.Module) -> None:
    """Raise naming the first parameter or buffer that holds a NaN or Inf."""
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if not _finite(tensor):
            bad = (~torch.isfinite(tensor)).nonzero()
            raise BitallocError(f"weight {name} has {bad.shape[0]} NaN/Inf value(s), the first at "
                                f"{tuple(bad[0].tolist())}; the model file is damaged (or was saved from a diverged run)")


def check_quantized(qw, layer: str) -> None:
    """A quantizer's output must dequantize to finite values: finite scales and zeros, no zero scale."""
    for name in ("scales", "zeros", "act_scale", "outlier_weight"):
        tensor = getattr(qw, name, None)
        if tensor is None:
            continue
        bad = ~torch.isfinite(tensor)
        if name in ("scales", "act_scale"):
            bad |= tensor == 0
        if bad.any():
            raise BitallocError(f"layer {layer}: quantizing with {qw.option} gave {int(bad.sum())} NaN/Inf/zero "
                                f"{name}; that layer's weights are out of the format's range")


def _nonfinite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return not _finite(value)
    if isinstance(value, (list, tuple)):
        return any(_nonfinite(v) for v in value)
    return hasattr(value, "logits") and _nonfinite(value.logits)


def first_nonfinite_module(root: nn.Module, run: Callable[[], object], prefix: str = "") -> str | None:
    """Run `run()` with hooks on every submodule of `root`; the first whose output holds NaN/Inf."""
    found: list[str] = []

    def hook(name):
        def record(module, args, output):
            if not found and _nonfinite(output):
                found.append(f"{prefix}.{name}".strip(".") if name else prefix)
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in root.named_modules()]
    run_hooked(handles, run)
    return found[0] if found else None


def check_activations(root: nn.Module, output, where: str, rerun: Callable[[], object], prefix: str = "") -> None:
    """Raise if `output` (a tensor or a list of them) holds NaN/Inf, naming the submodule that first produced it.

    `rerun()` repeats the computation that produced `output`; it runs only when the check fails.
    """
    if not _nonfinite(output):
        return
    culprit = first_nonfinite_module(root, rerun, prefix)
    origin = f", first in the output of {culprit}" if culprit else ""
    raise BitallocError(f"{where} produced NaN/Inf activations{origin} (overflow of the activations' dtype, "
                        f"or NaN weights)")


def check_value(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise BitallocError(f"{what} is {value}; a quantized layer produced NaN/Inf activations")
    return value
