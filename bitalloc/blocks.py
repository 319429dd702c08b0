"""Run a model one decoder block at a time: capture block 0's inputs, then feed each block.

Only the block being worked on needs to be on the accelerator; everything else
stays where it is.  Used by the profiler and by calibrated quantization in apply.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .models import block_linears, find_blocks, weight_matrix
from .quant.calib import LayerCalib


class _Stop(Exception):
    pass


@dataclass
class BlockBatch:
    """One calibration batch at a block boundary: hidden states and the block's other arguments."""

    hidden: torch.Tensor
    kwargs: dict


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def move_outside_blocks(model: nn.Module, device) -> None:
    """Move embeddings, final norm, head and rotary buffers, but not the decoder blocks."""
    prefix, _ = find_blocks(model)
    for name, module in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        for key, param in module._parameters.items():
            if param is not None:
                param.data = param.data.to(device)
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(device)


@torch.no_grad()
def capture_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int, device="cpu") -> list[BlockBatch]:
    """Inputs of decoder block 0 for each batch of `ids` (the rest of the model is not run)."""
    _, blocks = find_blocks(model)
    captured: list[BlockBatch] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "layer_past")}
        kwargs["use_cache"] = False
        captured.append(BlockBatch(hidden.detach(), kwargs))
        raise _Stop

    move_outside_blocks(model, device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in ids.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, batch: BlockBatch, device=None) -> torch.Tensor:
    device = device or batch.hidden.device
    out = block(batch.hidden.to(device), **_to(batch.kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def block_outputs(block: nn.Module, batches: list[BlockBatch]) -> list[torch.Tensor]:
    return [run_block(block, b) for b in batches]


def advance(batches: list[BlockBatch], outputs: list[torch.Tensor]) -> list[BlockBatch]:
    """The next block's inputs: same arguments, new hidden states."""
    return [BlockBatch(out, b.kwargs) for b, out in zip(batches, outputs)]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at dotted path `name`; returns the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


@torch.no_grad()
def collect_calibration(block: nn.Module, batches: list[BlockBatch], names: list[str]) -> dict[str, LayerCalib]:
    """Input statistics of the named linears of `block` over all batches (one block pass)."""
    linears = block_linears(block)
    calibs = {n: LayerCalib(weight_matrix(linears[n]).shape[1]) for n in names}
    handles = [linears[n].register_forward_pre_hook(lambda m, a, n=n: calibs[n].add(a[0])) for n in names]
    try:
        block_outputs(block, batches)
    finally:
        for handle in handles:
            handle.remove()
    return calibs
