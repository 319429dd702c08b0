"""Exports: one plan, written in the formats other tools load.

    gptqmodel   a GPTQModel/vLLM quantize config: base bits/group/sym plus per-module
                `dynamic` overrides ("+:regex" -> overrides, "-:regex" -> keep unquantized)
    llamacpp    a llama-quantize --tensor-type-file: one `regex=ggml_type` per GGUF tensor

Each exporter is a pure function `(ExportInput, **options) -> (text, notes)` registered in
EXPORTERS; the command line (`python -m bitalloc.export`) loads the plan and model, calls one
and writes its text atomically.  A layer the target cannot represent is a BitallocError naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..cost import LayerShape, layer_shapes
from ..errors import BitallocError
from ..models import LoadedModel, find_blocks
from ..plan import Plan
from ..quant.option import Option


@dataclass
class ExportInput:
    """What every exporter reads: the plan's full assignment and the model's structure."""

    plan: Plan
    assignment: dict[str, Option]  # every decoder linear, full name -> option
    shapes: dict[str, LayerShape]
    prefix: str  # the decoder blocks' module path, e.g. "model.layers"
    blocks: int
    model_type: str  # transformers' config.model_type
    gguf: Path | None = None  # a GGUF file of this model, to check tensor names against

    def split(self, layer: str) -> tuple[int, str]:
        """'model.layers.3.mlp.up_proj' -> (3, 'mlp.up_proj')."""
        index, _, local = layer[len(self.prefix) + 1:].partition(".")
        return int(index), local


def export_input(plan: Plan, loaded: LoadedModel, gguf: Path | None = None) -> ExportInput:
    shapes = layer_shapes(loaded.model)
    assignment = plan.check_against(shapes, loaded.fingerprint)
    prefix, blocks = find_blocks(loaded.model)
    model_type = getattr(getattr(loaded.model, "config", None), "model_type", "") or ""
    return ExportInput(plan, assignment, {s.name: s for s in shapes}, prefix, len(blocks), model_type, gguf)


Exporter = Callable[..., tuple[str, list[str]]]
EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str):
    def decorate(fn):
        EXPORTERS[name] = fn
        return fn

    return decorate


def get_exporter(name: str) -> Exporter:
    try:
        return EXPORTERS[name]
    except KeyError:
        raise BitallocError(f"unknown export target '{name}' (known: {', '.join(sorted(EXPORTERS))})") from None


from . import gptqmodel, llamacpp  # noqa: E402,F401  (register the exporters)

__all__ = ["EXPORTERS", "ExportInput", "export_input", "get_exporter", "register_exporter"]
