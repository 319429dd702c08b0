"""Run a model one decoder block at a time: capture block 0's inputs, then feed each block.

Only the block being worked on needs to be on the accelerator; everything else
stays where it is.  Used by the profiler and by calibrated quantization in apply.
"""
from __future__ import annotations

import inspect
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

    def head(self, count: int) -> "BlockBatch":
        """The first `count` windows (arguments with a leading batch dimension are cut alike)."""
        rows = self.hidden.shape[0]
        return BlockBatch(self.hidden[:count], _slice_batch(self.kwargs, rows, count))

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]


def _slice_batch(value, rows: int, count: int):
    if isinstance(value, torch.Tensor):
        return value[:count] if value.dim() > 0 and value.shape[0] == rows and rows > 1 else value
    if isinstance(value, (tuple, list)):
        return type(value)(_slice_batch(v, rows, count) for v in value)
    if isinstance(value, dict):
        return {k: _slice_batch(v, rows, count) for k, v in value.items()}
    return value


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
        for param in module._parameters.values():
            if param is not None:
                param.data = param.data.to(device)
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(device)


@torch.no_grad()
def capture_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int, device="cpu",
                   host: bool = False) -> list[BlockBatch]:
    """Inputs of decoder block 0 for each batch of `ids` (the rest of the model is not run).

    `host`: each batch's hidden states go to host memory as soon as they are made (`to_host`), so the
    device never holds the whole calibration set (2.1 GB for 128 x 2048 tokens of an 8B model)."""
    _, blocks = find_blocks(model)
    captured: list[BlockBatch] = []

    signature = inspect.signature(blocks[0].forward)
    var_keyword = next((k for k, p in signature.parameters.items() if p.kind == p.VAR_KEYWORD), None)

    def hook(module, args, kwargs):
        bound = dict(signature.bind(*args, **kwargs).arguments)  # positional arguments (GPT-2's mask) by name
        extra = bound.pop(var_keyword, {}) if var_keyword else {}
        hidden = bound.pop(next(iter(bound)))
        kept = {k: v for k, v in {**bound, **extra}.items() if k not in ("cache", "past_key_values", "layer_past")}
        if var_keyword or "use_cache" in signature.parameters:
            kept["use_cache"] = False
        captured.append(BlockBatch(to_host(hidden.detach()) if host else hidden.detach(), kept))
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


def returns_tuple(block: nn.Module, batch: BlockBatch) -> bool:
    """Whether the block returns a tuple led by the hidden states (older GPT-2 style) or a tensor."""
    probe = batch.head(1)
    with torch.no_grad():
        device = block_device(block, probe.hidden.device)
        return isinstance(block(probe.hidden.to(device), **_to(probe.kwargs, device)), (tuple, list))


class _Inject(nn.Module):
    """Stands in for a decoder block and hands on the given hidden states (or its input when none)."""

    def __init__(self, original: nn.Module, hidden: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        object.__setattr__(self, "_original", original)
        self._hidden, self._as_tuple = hidden, as_tuple

    def __getattr__(self, name):  # attributes the model's loop reads from its layers (attention_type...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self._hidden is None else self._hidden
        return (out,) if self._as_tuple else out


def final_logits(model: nn.Module, ids: torch.Tensor, hidden: torch.Tensor, as_tuple: bool) -> torch.Tensor:
    """Logits of the model when the last block outputs `hidden`: runs only what follows the blocks
    (final norm, head, soft-capping...), through the model's own forward, for any architecture."""
    prefix, blocks = find_blocks(model)
    module_list = model.get_submodule(prefix)
    originals = list(module_list)
    try:
        for i, block in enumerate(originals):
            module_list[i] = _Inject(block, hidden if i == len(originals) - 1 else None, as_tuple)
        return model(input_ids=ids.to(hidden.device), use_cache=False).logits
    finally:
        for i, block in enumerate(originals):
            module_list[i] = block


def block_device(block: nn.Module, default=None) -> torch.device:
    """Where the block's weights are (its first parameter or buffer); `default` when it has none."""
    for tensor in block.parameters():
        return tensor.device
    for tensor in block.buffers():
        return tensor.device
    return default


def run_block(block: nn.Module, batch: BlockBatch, device=None) -> torch.Tensor:
    """The block's hidden-state output, computed where the block is (host-held inputs are copied there)."""
    device = device or block_device(block, batch.hidden.device)
    out = block(batch.hidden.to(device), **_to(batch.kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def block_outputs(block: nn.Module, batches: list[BlockBatch]) -> list[torch.Tensor]:
    return [run_block(block, b) for b in batches]


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy (page-locked where CUDA is, so copies back are fast); host tensors are returned as they are.

    Profiling keeps the calibration hidden states here, so the accelerator holds only one block's weights,
    its candidates and one batch's activations.
    """
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=torch.cuda.is_available())
    return host.copy_(tensor)


def advance(batches: list[BlockBatch], outputs: list[torch.Tensor]) -> list[BlockBatch]:
    """The next block's inputs: same arguments, new hidden states, held where the previous ones were
    (batches captured to the host stay there)."""
    return [BlockBatch(_held_like(b, out), b.kwargs) for b, out in zip(batches, outputs)]


@torch.no_grad()
def advance_through(block: nn.Module, batches: list[BlockBatch]) -> list[BlockBatch]:
    """`advance` by running `block`, one batch at a time: a host-held batch's output goes to the host
    before the next batch runs, so the device never holds them all."""
    return [BlockBatch(_held_like(b, run_block(block, b)), b.kwargs) for b in batches]


def _held_like(batch: BlockBatch, hidden: torch.Tensor) -> torch.Tensor:
    return to_host(hidden) if batch.hidden.device.type == "cpu" else hidden


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
