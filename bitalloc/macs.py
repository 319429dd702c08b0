"""MACs of a forward pass: counted by fvcore on the traced model, and by formula as a cross-check.

A MAC is one multiply-accumulate of a matrix product; FLOPs = 2 x MACs.
Counted: every linear layer (decoder linears, the head, input/output
projections) and attention's two products Q K^T and A V over the full
Lq x Lk score matrix (what a dense kernel computes; causal masking is not
subtracted).  Not counted: norms, activations, softmax, rotary embeddings and
residual adds, which are elementwise and memory-bound.

Workloads:
    prefill   batch x seqlen tokens, no cache, logits for every position
    decode    batch x 1 new token attending to a KV cache of seqlen tokens (and to itself)

fvcore traces the model with torch.jit.  `LogitsOnly` and `DecodeStep` wrap a
transformers model so the trace sees tensors in and logits out: the cache is
off for prefill, and for decode it is rebuilt inside the trace from key/value
tensors the wrapper receives.  The op handles below count what fvcore leaves
out (scaled_dot_product_attention, baddbmm) and replace its matmul count by one
that stays right under broadcasting: output elements x contracted length.
"""
from __future__ import annotations

import inspect
import logging
import math
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .arch import Architecture
from .errors import BitallocError, first_line
from .models import find_blocks, linear_layers

log = logging.getLogger(__name__)

# op -> index of the input whose last dimension is the contracted one
PRODUCT_OPS = {"aten::linear": 0, "aten::matmul": 0, "aten::mm": 0, "aten::bmm": 0, "aten::addmm": 1,
               "aten::baddbmm": 1}
# fvcore counts these by default; they are not matrix products
NOT_COUNTED = ("aten::layer_norm", "aten::group_norm", "aten::instance_norm", "aten::batch_norm",
               "aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::adaptive_avg_pool2d",
               "aten::grid_sampler")
_PRODUCT_LIKE = re.compile(r"mm|matmul|attention|einsum|conv")


@dataclass(frozen=True)
class Workload:
    batch: int = 1
    seqlen: int = 512  # prefill: tokens per sequence; decode: tokens already in the cache
    decode: bool = False

    def __post_init__(self):
        if self.batch < 1 or self.seqlen < 1:
            raise BitallocError(f"batch and seqlen must be at least 1 (got batch {self.batch}, seqlen {self.seqlen})")

    @property
    def new_tokens(self) -> int:
        """Tokens each sequence pushes through the linears."""
        return 1 if self.decode else self.seqlen

    @property
    def tokens(self) -> int:
        return self.batch * self.new_tokens

    @property
    def keys(self) -> int:
        """Positions each query attends to."""
        return self.seqlen + 1 if self.decode else self.seqlen

    def __str__(self) -> str:
        if self.decode:
            return f"decode: {self.batch} x 1 new token after {self.seqlen} cached"
        return f"prefill: {self.batch} x {self.seqlen} tokens"


# --- fvcore handles ------------------------------------------------------------

def _product_handle(operand: int):
    def count(inputs, outputs):
        from fvcore.nn.jit_handles import get_shape

        return math.prod(get_shape(outputs[0])) * get_shape(inputs[operand])[-1]

    return count


def _zero(inputs, outputs):
    return 0


def _attention_macs(inputs, outputs):
    """scaled_dot_product_attention: Q K^T and A V, per query head (GQA heads share K and V, not work)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


# --- wrappers the tracer can follow ----------------------------------------------

def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5 names the cache argument `cache`; 4.x named it `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class LogitsOnly(nn.Module):
    """ids -> logits with the KV cache off."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False, return_dict=True).logits


class DecodeStep(nn.Module):
    """(new ids, k0, v0, k1, v1, ...) -> logits of the new tokens, with the cache built from the tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, *key_values):
        from transformers import DynamicCache

        pairs = list(zip(key_values[0::2], key_values[1::2]))
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        kwargs = {_cache_kwarg(self.model): cache}
        return self.model(input_ids=input_ids, use_cache=True, return_dict=True, **kwargs).logits


@torch.no_grad()
def _empty_cache(model: nn.Module, batch: int, length: int) -> list[torch.Tensor]:
    """Zero key/value tensors shaped as the model's cache after `length` tokens (shapes read off one real step)."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.zeros(batch, 1, dtype=torch.long, device=device), use_cache=True, return_dict=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "layers"):
        raise BitallocError(f"{type(model).__name__} returned no layered KV cache; decode MACs cannot be traced")
    tensors = []
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            shape = list(t.shape)
            shape[-2] = length
            tensors.append(torch.zeros(shape, dtype=t.dtype, device=t.device))
    return tensors


def _trace_target(model: nn.Module, workload: Workload) -> tuple[nn.Module, tuple]:
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and workload.keys > positions:
        raise BitallocError(f"{workload} needs {workload.keys} positions; the model has {positions}")
    device = next(model.parameters()).device
    ids = torch.zeros(workload.batch, workload.new_tokens, dtype=torch.long, device=device)
    if not workload.decode:
        return LogitsOnly(model), (ids,)
    return DecodeStep(model), (ids, *_empty_cache(model, workload.batch, workload.seqlen))


# --- counting ------------------------------------------------------------------

@dataclass
class MacCount:
    """fvcore's count for one workload, by module (names as in the model, "" = the whole forward)."""

    workload: Workload
    by_module: dict[str, int]
    by_operator: dict[str, int]  # op (fvcore's short name) -> MACs of the whole forward
    block_operators: list[dict[str, int]]  # per decoder block: op -> MACs
    block_names: list[str]
    linear_names: list[str]  # the decoder linears

    @property
    def total(self) -> int:
        return self.by_module.get("", 0)

    @property
    def blocks(self) -> list[int]:
        return [self.by_module.get(name, 0) for name in self.block_names]

    @property
    def block_linears(self) -> list[int]:
        """MACs inside each block's linear layers (the rest of a block is attention's products)."""
        return [sum(self.by_module.get(n, 0) for n in self.linear_names if n.startswith(block + "."))
                for block in self.block_names]

    @property
    def block_attention(self) -> list[int]:
        return [b - lin for b, lin in zip(self.blocks, self.block_linears)]

    @property
    def outside_blocks(self) -> int:
        """Head and any projections outside the decoder blocks."""
        return self.total - sum(self.blocks)

    def linear(self, name: str) -> int:
        return self.by_module.get(name, 0)


def mac_analysis(module: nn.Module, inputs: tuple):
    """fvcore's FlopCountAnalysis with the handles above: it counts MACs of matrix products only."""
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(module, inputs)
    for op, operand in PRODUCT_OPS.items():
        analysis.set_op_handle(op, _product_handle(operand))
    analysis.set_op_handle("aten::scaled_dot_product_attention", _attention_macs)
    analysis.set_op_handle(**{op: _zero for op in NOT_COUNTED})  # None would not override fvcore's default
    return analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)


def count_macs(model: nn.Module, workload: Workload = Workload()) -> MacCount:
    """Trace one forward of `workload` and count its MACs with fvcore."""
    analysis = mac_analysis(*_trace_target(model.eval(), workload))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            by_module = analysis.by_module()
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise BitallocError(f"fvcore cannot trace {type(model).__name__}: {first_line(err)}") from None
        by_module_op = analysis.by_module_and_operator()
    missed = sorted(op for op in analysis.unsupported_ops() if _PRODUCT_LIKE.search(op))
    if missed:
        log.warning("fvcore has no count for %s: the MACs reported leave them out", ", ".join(missed))
    # the wrapper's own names carry a leading "model."; "" and "model" are both the whole forward
    rename = lambda name: "" if name in ("", "model") else name.removeprefix("model.")
    by_module = {rename(name): int(v) for name, v in by_module.items() if name != "model"}
    prefix, blocks = find_blocks(model)
    block_names = [f"{prefix}.{i}" for i in range(len(blocks))]
    block_ops = [{op: int(v) for op, v in by_module_op.get(f"model.{name}", {}).items() if v}
                 for name in block_names]
    return MacCount(workload, by_module, {op: int(v) for op, v in analysis.by_operator().items() if v},
                    block_ops, block_names, list(linear_layers(model)))


def block_macs(model: nn.Module, batch: int = 1, seqlen: int = 512, decode: bool = False) -> tuple[list[int], int]:
    """(MACs of each decoder block, MACs of the whole forward)."""
    count = count_macs(model, Workload(batch, seqlen, decode))
    return count.blocks, count.total


# --- the formula -----------------------------------------------------------------

def analytic_macs(arch: Architecture, workload: Workload) -> dict[str, int]:
    """MACs of a standard decoder by formula: the cross-check of fvcore's count."""
    t = workload.tokens
    projections = 2 * arch.hidden * arch.heads * arch.head_dim + 2 * arch.hidden * arch.kv_width  # q, o; k, v
    mlp = (3 if arch.mlp == "gated" else 2) * arch.hidden * arch.ffn
    block_linear = t * (projections + mlp)
    block_attention = workload.batch * arch.heads * workload.new_tokens * workload.keys * 2 * arch.head_dim
    outside = t * arch.vocab * arch.embed_dim  # the head
    if arch.embed_dim != arch.hidden:  # OPT's project_in and project_out
        outside += 2 * t * arch.hidden * arch.embed_dim
    block = block_linear + block_attention
    return {"block_linear": block_linear, "block_attention": block_attention, "block": block,
            "outside_blocks": outside, "total": arch.layers * block + outside}
