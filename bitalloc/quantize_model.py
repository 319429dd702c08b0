"""Quantize a whole model as an assignment says, block by block, through QuantLinear."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import advance, block_outputs, capture_inputs, collect_calibration, replace_module
from .errors import BitallocError
from .guards import check_weights
from .kernels.quant_linear import QuantLinear
from .models import LoadedModel, block_linears, find_blocks, weight_matrix
from .quant import Option, get_quantizer, quantize


def needs_calibration(assignment: dict[str, Option]) -> bool:
    return any(o.quantized and get_quantizer(o.method).needs_calibration for o in assignment.values())


@torch.no_grad()
def quantize_model(loaded: LoadedModel, assignment: dict[str, Option], calib_ids: torch.Tensor | None = None,
                   backend: str = "reference", device="cpu", batch_size: int = 4,
                   progress: bool = True) -> dict[str, nn.Module]:
    """Replace every assigned linear by a packed QuantLinear; returns the originals (see `restore`).

    Methods that calibrate see the inputs produced by the blocks already
    quantized, as GPTQ does, streamed one block at a time.
    """
    model = loaded.model
    check_weights(model)
    prefix, blocks = find_blocks(model)
    calibrate = needs_calibration(assignment)
    if calibrate and calib_ids is None:
        raise BitallocError("the plan uses a calibrated method but no calibration data was given")
    batches = capture_inputs(model, calib_ids, batch_size, device) if calibrate else None
    originals: dict[str, nn.Module] = {}
    for index, block in enumerate(tqdm(blocks, desc="quantize", unit="block", disable=not progress)):
        linears = block_linears(block)
        calibs = collect_calibration(block.to(device), batches, list(linears)) if calibrate else {}
        for name, module in linears.items():
            full = f"{prefix}.{index}.{name}"
            option = assignment[full]
            weight = weight_matrix(module).detach().float().cpu()
            qw = quantize(weight, option, calibs.get(name), layer=full) if option.quantized else None
            layer = QuantLinear.from_weight(qw, getattr(module, "bias", None), backend=backend, dense=weight)
            originals[full] = replace_module(block, name, layer.to(device))
        if calibrate:
            batches = advance(batches, block_outputs(block, batches))
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
