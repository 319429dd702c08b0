"""Measured loss of a plan in one forward pass: a bank of pre-quantized layers and held windows.

`LayerBank` quantizes each (layer, option) the search may pick exactly once,
through the same quantizers and QuantLinear that apply uses, and swaps the
modules into the model per plan.  Calibrated methods see the unquantized
model's inputs, as the profiler measured them; the pipeline re-measures the
final plan through apply's own path anyway.

`HeldKL` is the KL divergence to the unquantized model on calibration windows
held out from profiling (never the test split), evaluated chunk by chunk so a
search can stop a hopeless plan after the first chunks.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..blocks import advance_through, capture_inputs, collect_calibration, replace_module
from ..evaluate import ReferenceCache, evaluate
from ..kernels.quant_linear import QuantLinear
from ..models import LoadedModel, block_linears, find_blocks, weight_matrix
from ..quant import Option, quantize
from ..quant.registry import needs_calibration
from .problem import Problem

log = logging.getLogger(__name__)


class LayerBank:
    """QuantLinear modules for every wanted (layer, option), and the swap that installs a plan."""

    @torch.no_grad()
    def __init__(self, loaded: LoadedModel, wanted: dict[str, list[Option]], calib_ids: torch.Tensor | None = None,
                 batch_size: int = 4, device="cpu", progress: bool = True):
        self.model = loaded.model
        self.modules: dict[tuple[str, str], torch.nn.Module] = {}
        self.originals: dict[str, torch.nn.Module] = {}
        calibrate = any(needs_calibration(o) for opts in wanted.values() for o in opts)
        prefix, blocks = find_blocks(self.model)
        batches = capture_inputs(self.model, calib_ids, batch_size, device, host=True) if calibrate else None
        for index, block in enumerate(tqdm(blocks, desc="layer bank", unit="block", disable=not progress)):
            linears = block_linears(block)
            calibs = collect_calibration(block.to(device), batches, list(linears)) if calibrate else {}
            for name, module in linears.items():
                full = f"{prefix}.{index}.{name}"
                weight = weight_matrix(module).detach().float().cpu()
                bias = getattr(module, "bias", None)
                for option in wanted.get(full, []):
                    qw = quantize(weight, option, calibs.get(name), layer=full) if option.quantized else None
                    self.modules[(full, str(option))] = QuantLinear.from_weight(qw, bias, dense=weight).to(device)
            if calibrate:
                batches = advance_through(block, batches)
        self.current: dict[str, str] = {}

    def install(self, assignment: dict[str, Option]) -> None:
        """Swap in the banked module of each assigned layer (originals are kept for `restore`)."""
        for layer, option in assignment.items():
            if self.current.get(layer) == str(option):
                continue
            old = replace_module(self.model, layer, self.modules[(layer, str(option))])
            self.originals.setdefault(layer, old)
            self.current[layer] = str(option)

    def restore(self) -> None:
        for layer, module in self.originals.items():
            replace_module(self.model, layer, module)
        self.originals, self.current = {}, {}


class HeldKL:
    """Mean per-token KL(unquantized || plan) on held windows, chunk by chunk."""

    def __init__(self, loaded: LoadedModel, windows: torch.Tensor, cache_dir=None, chunk: int = 4,
                 batch_size: int = 4, device="cpu"):
        self.model, self.batch_size, self.device = loaded.model, batch_size, device
        self.chunks = list(windows.split(chunk))
        self.references = [ReferenceCache(cache_dir, loaded.fingerprint, c, batch_size) for c in self.chunks]
        for chunk_ids, reference in zip(self.chunks, self.references):  # the model is still unquantized here
            if not reference.complete():
                evaluate(self.model, chunk_ids, reference, True, batch_size, device, progress=False)

    def __call__(self, report: Callable[[float, int], None] | None = None) -> float:
        total, tokens = 0.0, 0
        for step, (chunk_ids, reference) in enumerate(zip(self.chunks, self.references)):
            result = evaluate(self.model, chunk_ids, reference, False, self.batch_size, self.device, progress=False)
            total += result["kl"]["mean"] * result["tokens"]
            tokens += result["tokens"]
            if report is not None and step + 1 < len(self.chunks):
                report(total / tokens, step)
        return total / tokens


def bank_measure(problem: Problem, bank: LayerBank, held: HeldKL):
    """measure(choice, report) for the Optuna solver: install the plan from the bank, return its held KL."""

    def measure(choice: np.ndarray, report=None) -> float:
        bank.install(problem.assignment(choice))
        return held(report)

    return measure
