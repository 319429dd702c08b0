"""Exact costs of a layer under an option, and of a whole model under a plan.

Every cost the solver can budget is a function of (LayerShape, Option):

    bytes     what the packed layer stores (`kernels/layout.py`): codes packed with
              their padding, float16 scales and zeros per group (a ragged last group
              has its own), input-side transforms, outlier columns, bias
    bops      bit operations per token: bits_w x bits_a x MACs (MACs = out x in;
              outlier columns run at 16 x 16 bits); fp16 layers count 16 x 16
    latency   milliseconds, looked up in a latency table (below)

MACs and FLOPs of a whole forward are counted by fvcore in `macs.py` (re-exported
here); `model_bytes` adds the unquantized rest of the model, with options of
their own for the token embeddings and the head; `kv_cache_bytes` the cache.

Latency table: a CSV file with one row per measured (backend, batch, layer shape,
option), written by the kernel benchmarks under inference/:

    backend,batch,out_features,in_features,option,latency_ms
    triton,1,576,576,rtn:int4:g64:asym,0.0121
    triton,1,576,576,fp16,0.0183

`batch` is the number of token rows the layer multiplies at once (1 when
decoding one sequence); `latency_ms` the time of one call of the layer; `option`
an option string (`fp16` for the dense layer).  Other columns (device, dtype,
repeats, ...) may follow and are ignored.  A (backend, batch, shape, option) key
may appear once.  A layer's bias is not part of the key.  A latency budget is
the sum of the looked-up times of the decoder linears; a layer whose shape or
option the table lacks stops the run with an error naming it.
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .arch import Architecture
from .errors import BitallocError
from .kernels import layout
from .macs import MacCount, Workload, analytic_macs, block_macs, count_macs
from .models import linear_layers, linear_shape
from .quant.option import FP16, Option, parse
from .quant.registry import get_quantizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerShape:
    name: str
    out_features: int
    in_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def layer_shapes(model: nn.Module) -> list[LayerShape]:
    return [
        LayerShape(name, *linear_shape(m), getattr(m, "bias", None) is not None)
        for name, m in linear_layers(model).items()
    ]


# --- bytes -------------------------------------------------------------------------

def layer_storage(shape: LayerShape, option: Option) -> dict[str, layout.TensorSpec]:
    transforms = option.quantized and get_quantizer(option.method).transforms_input
    return layout.storage(option, shape.out_features, shape.in_features, shape.bias, act_scale=transforms)


def layer_bytes(shape: LayerShape, option: Option) -> int:
    """Bytes the packed layer occupies: codes with padding, scales, zeros, transforms, bias."""
    return layout.nbytes(layer_storage(shape, option))


def bias_bytes(shapes: list[LayerShape]) -> int:
    """The layers' float16 biases: stored alike under every option, so they are bytes but not bits per weight
    (an fp16 layer is 16.0 bits with or without one)."""
    return sum(2 * s.out_features for s in shapes if s.bias)


def bits_per_weight(shape: LayerShape, option: Option) -> float:
    return 8 * (layer_bytes(shape, option) - bias_bytes([shape])) / shape.numel


def assignment_bytes(shapes: list[LayerShape], assignment: dict[str, Option]) -> int:
    return sum(layer_bytes(s, assignment[s.name]) for s in shapes)


def bits_of_bytes(size: float, shapes: list[LayerShape]) -> float:
    """Bits per quantizable weight of linears taking `size` bytes: scales and zeros included, biases not."""
    return 8 * (size - bias_bytes(shapes)) / sum(s.numel for s in shapes)


def average_bits(shapes: list[LayerShape], assignment: dict[str, Option]) -> float:
    return bits_of_bytes(assignment_bytes(shapes, assignment), shapes)


@dataclass(frozen=True)
class ModelBytes:
    linears: int  # the decoder linears, as the plan says
    embeddings: int  # the token embedding table (and the head, when tied to it)
    head: int  # an untied head
    other: int  # norms, position embeddings, projections outside the blocks
    head_tied: bool  # the head is the embedding table (counted there)

    @property
    def total(self) -> int:
        return self.linears + self.embeddings + self.head + self.other

    def to_json(self) -> dict:
        return {"linears": self.linears, "embeddings": self.embeddings, "head": self.head, "other": self.other,
                "total": self.total, "head_tied": self.head_tied}


def _table_shape(name: str, weight: torch.Tensor, bias) -> LayerShape:
    """An embedding table or head [rows, dim] stored like a linear: groups run along dim."""
    return LayerShape(name, weight.shape[0], weight.shape[1], bias is not None)


def model_bytes(model: nn.Module, assignment: dict[str, Option], embeddings: Option = FP16,
                head: Option | None = None, other_dtype: torch.dtype = torch.float16) -> ModelBytes:
    """Bytes of the whole model: decoder linears per `assignment`, token embeddings and head under
    their own options, every other parameter in `other_dtype`.  Tied tensors count once; a head
    tied to the embeddings is stored under their option (`head` None: that, or fp16 when untied)."""
    linears = assignment_bytes(layer_shapes(model), assignment)
    counted = {id(p) for m in linear_layers(model).values() for p in m.parameters()}
    embed = model.get_input_embeddings()
    out = model.get_output_embeddings()
    embed_bytes = layer_bytes(_table_shape("embeddings", embed.weight, None), embeddings)
    counted.add(id(embed.weight))
    head_bytes, tied = 0, out is not None and out.weight is embed.weight
    if tied:
        if head not in (None, embeddings):
            raise BitallocError(f"the head is tied to the token embeddings: give both one option, not "
                                f"{embeddings} and {head}")
    elif out is not None:
        head_bytes = layer_bytes(_table_shape("head", out.weight, getattr(out, "bias", None)), head or FP16)
        counted |= {id(p) for p in out.parameters()}
    size = torch.empty((), dtype=other_dtype).element_size()
    other = sum(p.numel() * size for p in {id(p): p for p in model.parameters()}.values() if id(p) not in counted)
    return ModelBytes(linears, embed_bytes, head_bytes, other, tied)


def other_bytes(model: nn.Module, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of every parameter outside the decoder linears (embeddings, norms, head; tied ones once),
    all kept in `dtype`: what a saved packed model stores beside its packed layers."""
    counted = {id(p) for m in linear_layers(model).values() for p in m.parameters()}
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() * size for p in {id(p): p for p in model.parameters()}.values() if id(p) not in counted)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def kv_cache_bytes(arch: Architecture, context: int, batch: int = 1, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of the keys and values of `context` tokens per sequence, every layer."""
    return 2 * arch.layers * batch * context * arch.kv_width * torch.empty((), dtype=dtype).element_size()


# --- bit operations ------------------------------------------------------------------

def weight_bits(option: Option) -> int:
    return option.bits if option.quantized else 16


def layer_bops(shape: LayerShape, option: Option) -> int:
    """Bit operations per token: bits_w x bits_a per MAC; outlier columns stay at 16 x 16."""
    outliers = option.param("outliers", 0, int) if option.quantized else 0
    regular = shape.out_features * (shape.in_features - outliers)
    return weight_bits(option) * option.act_bits * regular + 16 * 16 * shape.out_features * outliers


def assignment_bops(shapes: list[LayerShape], assignment: dict[str, Option], tokens: int = 1) -> int:
    return tokens * sum(layer_bops(s, assignment[s.name]) for s in shapes)


# --- latency tables ----------------------------------------------------------------

LATENCY_COLUMNS = ("backend", "batch", "out_features", "in_features", "option", "latency_ms")
LatencyKey = tuple[str, int, int, int, str]  # backend, batch, out, in, option


@dataclass(frozen=True)
class LatencyLookup:
    """The latency of one layer under one option, for one backend and batch: a cost function."""

    table: "LatencyTable"
    backend: str
    batch: int

    def __call__(self, shape: LayerShape, option: Option) -> float:
        key = (self.backend, self.batch, shape.out_features, shape.in_features, str(option))
        try:
            return self.table.rows[key]
        except KeyError:
            raise BitallocError(
                f"latency table {self.table.source} has no row for {shape.out_features}x{shape.in_features} "
                f"{option} on backend {self.backend} at batch {self.batch} (layer {shape.name}): benchmark it"
            ) from None

    def to_json(self) -> dict:
        return {"table": self.table.source, "backend": self.backend, "batch": self.batch}


@dataclass(frozen=True)
class LatencyTable:
    source: str
    rows: dict[LatencyKey, float]

    @classmethod
    def load(cls, path) -> "LatencyTable":
        path = Path(path)
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                return cls.from_records(csv.DictReader(handle), str(path))
        except FileNotFoundError:
            raise BitallocError(f"latency table not found: {path}") from None
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise BitallocError(f"cannot read latency table {path}: {err}") from None

    @classmethod
    def from_records(cls, records, source: str) -> "LatencyTable":
        """Rows as dicts with LATENCY_COLUMNS (a csv.DictReader, or any iterable of dicts)."""
        fields = getattr(records, "fieldnames", None)
        if fields is not None and set(LATENCY_COLUMNS) - set(fields):
            missing = [c for c in LATENCY_COLUMNS if c not in fields]
            raise BitallocError(f"latency table {source} lacks column '{missing[0]}' "
                                f"(needs {', '.join(LATENCY_COLUMNS)})")
        rows: dict[LatencyKey, float] = {}
        for line, record in enumerate(records, start=2):
            where = f"latency table {source}, row {line}"
            try:
                key = (record["backend"].strip(), int(record["batch"]), int(record["out_features"]),
                       int(record["in_features"]), str(parse(record["option"])))
                latency = float(record["latency_ms"])
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise BitallocError(f"{where}: cannot read it ({err})") from None
            except BitallocError as err:
                raise BitallocError(f"{where}: {err}") from None
            if not math.isfinite(latency) or latency < 0 or min(key[1:4]) < 1:
                raise BitallocError(f"{where}: latency must be finite and >= 0, batch and shape >= 1")
            if key in rows:
                raise BitallocError(f"{where}: {key[4]} at {key[2]}x{key[3]}, {key[0]} batch {key[1]} is given twice")
            rows[key] = latency
        if not rows:
            raise BitallocError(f"latency table {source} has no rows")
        return cls(source, rows)

    @property
    def backends(self) -> list[str]:
        return sorted({key[0] for key in self.rows})

    def lookup(self, backend: str | None = None, batch: int = 1) -> LatencyLookup:
        """The cost function for one backend (may be left out when the table has one) and batch."""
        if backend is None:
            if len(self.backends) > 1:
                raise BitallocError(f"latency table {self.source} has several backends "
                                    f"({', '.join(self.backends)}): choose one")
            backend = self.backends[0]
        if not any(key[0] == backend and key[1] == batch for key in self.rows):
            raise BitallocError(f"latency table {self.source} has no rows for backend {backend} at batch {batch}")
        return LatencyLookup(self, backend, batch)


__all__ = [
    "LayerShape", "layer_shapes", "layer_storage", "layer_bytes", "bias_bytes", "bits_per_weight", "bits_of_bytes",
    "assignment_bytes", "average_bits", "ModelBytes", "model_bytes", "parameter_count", "kv_cache_bytes", "weight_bits",
    "layer_bops", "assignment_bops", "LATENCY_COLUMNS", "LatencyLookup", "LatencyTable", "MacCount", "Workload", "count_macs",
    "block_macs", "analytic_macs",
]
