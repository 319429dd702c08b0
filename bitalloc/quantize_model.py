"""Quantize a whole model as an assignment says, block by block, through QuantLinear.

Calibrated methods (GPTQ, AWQ, SmoothQuant, LWC, outlier selection) see the
inputs produced by the blocks already quantized, and, inside a block, by the
layers already quantized ("true sequential", as GPTQ does): the block's linears
are taken in the order it calls them, in groups that read the same tensor
(q/k/v, then o, then gate/up, then down), and each group's inputs are collected
from the block with the groups before it already replaced.  Collecting a
group's inputs stops the block at that group, so the partial passes cost less
than full ones.

Modes (as AutoAWQ names them):
    real   packed QuantLinear layers (what apply deploys and the profiler measures)
    fake   nn.Linear layers holding the dequantized weights (weight-only options)
    scale  the scaled floating-point model: layers whose method transforms the
           input (AWQ, SmoothQuant) get weights W * s and divide their input by s,
           with no rounding; the model computes the same function up to float error,
           and its weights are what another tool would quantize.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import BlockBatch, advance_through, capture_inputs, replace_module, run_block
from .errors import BitallocError
from .guards import check_weights
from .hooks import run_hooked
from .kernels.quant_linear import QuantLinear
from .models import LoadedModel, block_linears, find_blocks, set_weight_matrix, weight_matrix
from .quant import LayerCalib, Option, QuantizedWeight, quantize
from .quant.registry import needs_calibration as option_needs_calibration

MODES = ("real", "fake", "scale")


class _Stop(Exception):
    pass


class InputScaled(nn.Module):
    """A floating-point linear computing linear(x / s): the 'scale' mode's layer."""

    def __init__(self, linear: nn.Module, act_scale: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("act_scale", act_scale.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x / self.act_scale.to(x.dtype))


def needs_calibration(assignment: dict[str, Option]) -> bool:
    return any(option_needs_calibration(o) for o in assignment.values())


def execution_groups(block: nn.Module, batch: BlockBatch) -> list[list[str]]:
    """The block's linears in call order, grouped by the input tensor they share (one batch is run)."""
    linears = block_linears(block)
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: calls.append((n, a[0]))) for n, m in linears.items()]
    run_hooked(handles, lambda: run_block(block, batch))
    groups: list[list[str]] = []
    seen: dict[int, list[str]] = {}
    for name, tensor in calls:  # the tensors are alive in `calls`, so ids are not reused
        group = seen.get(id(tensor))
        if group is None:
            group = seen[id(tensor)] = []
            groups.append(group)
        if name not in group:
            group.append(name)
    called = {n for g in groups for n in g}
    return groups + [[n] for n in linears if n not in called]


@torch.no_grad()
def collect_group(block: nn.Module, batches: list[BlockBatch], first: str) -> LayerCalib:
    """Input statistics of linear `first` (shared by its group) over all batches; the block stops there."""
    module = block_linears(block)[first]
    calib = LayerCalib(weight_matrix(module).shape[1])

    def hook(_module, args):
        calib.add(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            try:
                run_block(block, batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    return calib


def _replacement(module: nn.Module, qw: QuantizedWeight | None, weight: torch.Tensor, mode: str, backend: str,
                 layer: str) -> nn.Module:
    if mode == "real":
        return QuantLinear.from_weight(qw, getattr(module, "bias", None), backend=backend, dense=weight)
    if qw is None:
        return module
    if mode == "fake":
        if qw.option.act_bits < 16:
            raise BitallocError(f"layer {layer}: mode 'fake' simulates weights only; {qw.option} quantizes activations")
        fake = copy.deepcopy(module)
        set_weight_matrix(fake, qw.dequantize())
        return fake
    if qw.act_scale is None:
        return module
    scaled = copy.deepcopy(module)
    set_weight_matrix(scaled, weight * qw.act_scale)
    return InputScaled(scaled, qw.act_scale)


@torch.no_grad()
def quantize_model(loaded: LoadedModel, assignment: dict[str, Option], calib_ids: torch.Tensor | None = None,
                   backend: str = "reference", device="cpu", batch_size: int = 4,
                   progress: bool = True, mode: str = "real") -> dict[str, nn.Module]:
    """Replace every assigned linear (see the module doc for `mode`); returns the originals (see `restore`)."""
    if mode not in MODES:
        raise BitallocError(f"unknown quantization mode '{mode}' (known: {', '.join(MODES)})")
    model = loaded.model
    check_weights(model)
    prefix, blocks = find_blocks(model)
    calibrate = needs_calibration(assignment)
    if calibrate and calib_ids is None:
        raise BitallocError("the plan uses a calibrated method but no calibration data was given")
    batches = capture_inputs(model, calib_ids, batch_size, device, host=True) if calibrate else None
    originals: dict[str, nn.Module] = {}
    for index, block in enumerate(tqdm(blocks, desc="quantize", unit="block", disable=not progress)):
        block.to(device)
        linears = block_linears(block)
        names = {name: f"{prefix}.{index}.{name}" for name in linears}
        block_calibrates = any(option_needs_calibration(assignment[full]) for full in names.values())
        groups = execution_groups(block, batches[0]) if block_calibrates else [list(linears)]
        for group in groups:
            calibrated = any(option_needs_calibration(assignment[names[n]]) for n in group)
            calib = collect_group(block, batches, group[0]) if calibrated else None
            for name in group:
                full, module = names[name], linears[name]
                option = assignment[full]
                weight = weight_matrix(module).detach().float().cpu()
                qw = quantize(weight, option, calib, layer=full) if option.quantized else None
                layer = _replacement(module, qw, weight, mode, backend, full)
                originals[full] = replace_module(block, name, layer.to(device))
        if calibrate:
            batches = advance_through(block, batches)
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            layer.set_backend(backend)
    return originals


def restore(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put the original linears back (undo `quantize_model`)."""
    for name, module in originals.items():
        replace_module(model, name, module)


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every QuantLinear's stored tensors: what a saved model holds for its linears."""
    return sum(
        b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantLinear) for b in m.buffers()
    )
