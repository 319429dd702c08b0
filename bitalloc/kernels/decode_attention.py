"""Attention of one new token over a static KV cache: a Triton kernel the tuner may take instead of SDPA.

In a batch-1 decode step each block's attention reads a few hundred cached keys
and values per head (a Llama-2-7B layer at 167 positions: 2.7 MB), yet on the
H200 torch's SDPA (cuDNN) took ~7 us a layer, as long as a 4096x4096 int4 GEMV:
a fixed cost in the float16 and the packed model alike, so it caps their ratio.
One query row needs no tiles of queries.  A program per head walking the whole
cache in dependent steps (the first version of this kernel) left most SMs idle
and took 11.7 us, so the cache is split as flash-decoding splits it: each
program takes one head and one stretch of keys, keeps a running softmax (max,
sum and the weighted values in float32) and stores it; the last program of a
head to finish, counted by an atomic ticket, merges the stretches and resets the
ticket, all in one launch (a second merge kernel would cost a launch per layer):
7.4 us a layer on the H200 at 16 keys a program.  A cache of at most 256
positions is faster still unsplit in one step (all its keys loaded at once, no
merge): 6.4 us; from 512 positions the split wins (`inference/attention.py`).
All of these are bound by latency rather than by the bytes (docs/RESULTS.md,
issue 8).  The mask Hugging Face
builds for a static cache is honoured: keys past the current position are
masked, not skipped, exactly as SDPA computes them.

`use_for_decoding(model)` registers it as a Hugging Face attention
implementation: steps of one query token go through `decode_attention`, where
the tuner times every launch beside torch's SDPA (the reference each launch
must agree with) and keeps the fastest, so a GPU where SDPA is faster keeps
SDPA; prompts (several query tokens) always take SDPA.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import tuner

NAME = "bitalloc_decode"
SDPA = ("sdpa", ())
# (keys per block, warps, most stretches a head's keys are split into; 1: one program walks them all)
LAUNCHES = [("triton", config) for config in ((16, 2, 64), (64, 4, 16), (32, 4, 32), (64, 8, 16), (128, 4, 2),
                                              (256, 8, 1))]
NO_MASK, BOOL_MASK, ADDED_MASK = 0, 1, 2
MERGED_AT_ONCE = 8  # stretches the last program loads per step of its merge


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (triton is optional on the CPU)."""
    import triton
    import triton.language as tl

    @triton.jit
    def one_token_attention(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr, stats_ptr, ticket_ptr, keys, stretch,
                            scale, stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh,
                            stride_vl, stride_mb, stride_mh, stride_ml, HEADS: tl.constexpr,
                            HEADS_PER_KV: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr,
                            MERGED: tl.constexpr, MASK: tl.constexpr):
        """out[b, 0, h] = softmax(q k^T * scale + mask) v for head h of batch row b: program (h, s, b) takes
        keys [s * stretch, (s + 1) * stretch); SPLITS (a power of two, at least the programs per head; 1: no
        split) sizes the partial results at part_ptr (weighted values) and stats_ptr (max and sum)."""
        h = tl.program_id(0)
        s = tl.program_id(1)
        b = tl.program_id(2)
        kv = h // HEADS_PER_KV
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale
        k_row = k_ptr + b * stride_kb + kv * stride_kh
        v_row = v_ptr + b * stride_vb + kv * stride_vh
        mask_row = mask_ptr + b * stride_mb + h * stride_mh
        top = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)  # running max of the scores
        total = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)  # running sum of exp(score - top)
        acc = tl.zeros([D], tl.float32)  # running sum of exp(score - top) * v
        end = tl.minimum(s * stretch + stretch, keys)
        for start in range(s * stretch, end, BLOCK):
            n = start + tl.arange(0, BLOCK)
            inside = n < end
            k = tl.load(k_row + n[:, None] * stride_kl + d[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(v_row + n[:, None] * stride_vl + d[None, :], mask=inside[:, None], other=0.0)
            scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
            if MASK == 1:
                inside &= tl.load(mask_row + n * stride_ml, mask=inside, other=0) != 0
            if MASK == 2:
                scores += tl.load(mask_row + n * stride_ml, mask=inside, other=0.0).to(tl.float32)
            scores = tl.where(inside, scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=0))
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # all masked so far: no NaN from -inf - -inf
            weights = tl.exp(scores - shift)
            rescale = tl.exp(top - shift)
            total = total * rescale + tl.sum(weights, axis=0)
            acc = acc * rescale + tl.sum(weights[:, None] * v.to(tl.float32), axis=0)
            top = new_top
        out = out_ptr + (b * HEADS + h) * D + d
        if SPLITS == 1:
            tl.store(out, (acc / total).to(out_ptr.dtype.element_ty))
        else:
            row = b * HEADS + h
            tl.store(part_ptr + (row * SPLITS + s) * D + d, acc)
            tl.store(stats_ptr + (row * SPLITS + s) * 2, top)
            tl.store(stats_ptr + (row * SPLITS + s) * 2 + 1, total)
            tl.debug_barrier()  # every thread's stores before the ticket (its release covers them)
            splits = tl.num_programs(1)
            if tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel") == splits - 1:  # the head's last program
                i = tl.arange(0, SPLITS)
                tops = tl.load(stats_ptr + (row * SPLITS + i) * 2, mask=i < splits, other=float("-inf"),
                               cache_modifier=".cg")
                totals = tl.load(stats_ptr + (row * SPLITS + i) * 2 + 1, mask=i < splits, other=0.0,
                                 cache_modifier=".cg")
                best = tl.max(tops, axis=0)
                shift = tl.where(best == float("-inf"), 0.0, best)
                total = tl.sum(tl.exp(tops - shift) * totals, axis=0)
                acc = tl.zeros([D], tl.float32)
                for first in range(0, splits, MERGED):
                    j = first + tl.arange(0, MERGED)
                    there = j < splits
                    part_top = tl.load(stats_ptr + (row * SPLITS + j) * 2, mask=there, other=float("-inf"),
                                       cache_modifier=".cg")
                    parts = tl.load(part_ptr + (row * SPLITS + j[:, None]) * D + d[None, :], mask=there[:, None],
                                    other=0.0, cache_modifier=".cg")
                    acc += tl.sum(tl.exp(part_top - shift)[:, None] * parts, axis=0)
                tl.store(out, (acc / total).to(out_ptr.dtype.element_ty))
                tl.atomic_xchg(ticket_ptr + row, 0)  # ready for the next step

    return one_token_attention


_TICKETS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # never freed: a captured graph may still count on them


def _tickets(device: torch.device, rows: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (batch row, head), that every launch leaves at zero: kept across calls
    (a fresh zeroed buffer would cost a memset per layer), except one first needed inside a CUDA graph capture,
    whose memory belongs to that graph."""
    tickets = _TICKETS.get(device)
    if tickets is not None and tickets.numel() >= rows:
        return tickets
    fresh = torch.zeros(max(rows, 256), dtype=torch.int32, device=device)
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        if tickets is not None:
            _OUTGROWN.append(tickets)
        _TICKETS[device] = fresh
    return fresh


def _mask_kind(mask: torch.Tensor | None) -> int:
    if mask is None:
        return NO_MASK
    return BOOL_MASK if mask.dtype == torch.bool else ADDED_MASK


def _sdpa(query, key, value, mask, scale):
    heads, kv_heads = query.shape[1], key.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads)
    return out.transpose(1, 2).contiguous()


def _launch(kind: str, config: tuple, query, key, value, mask, scale: float) -> torch.Tensor:
    """[B, 1, H, D]: attention of query [B, H, 1, D] over key and value [B, H_kv, L, D] with `mask` (bool, True
    where a key counts, or added to the scores; broadcast over heads and batch rows where of size 1)."""
    if kind == SDPA[0]:
        return _sdpa(query, key, value, mask, scale)
    block, warps, most_splits = config
    batch, heads, _, dim = query.shape
    keys = key.shape[2]
    blocks = -(-keys // block)
    stretch = block * -(-blocks // most_splits)
    splits = -(-keys // stretch)
    padded = 1 << (splits - 1).bit_length()  # 1 when unsplit
    out = query.new_empty(batch, 1, heads, dim)
    if splits == 1:
        parts = stats = tickets = out
    else:
        parts = torch.empty(batch * heads * padded * dim, dtype=torch.float32, device=query.device)
        stats = torch.empty(batch * heads * padded * 2, dtype=torch.float32, device=query.device)
        tickets = _tickets(query.device, batch * heads)
    kind_of_mask = _mask_kind(mask)
    if mask is None:
        mask_arg, mask_strides = query, (0, 0, 0)
    else:
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mask_arg = mask
        mask_strides = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in (0, 1)) + (mask.stride(3),)
    _kernel()[(heads, splits, batch)](
        query, key, value, mask_arg, out, parts, stats, tickets, keys, stretch, scale, query.stride(0),
        query.stride(1), key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1),
        value.stride(2), *mask_strides, HEADS=heads, HEADS_PER_KV=heads // key.shape[1], D=dim, BLOCK=block,
        SPLITS=padded, MERGED=min(MERGED_AT_ONCE, padded),
        MASK=kind_of_mask, num_warps=warps)
    return out


def _tuner_key(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> tuple:
    """The cache length rounded up to a power of two: a growing (dynamic) cache is timed once per doubling,
    not at every step."""
    batch, kv_heads, keys, dim = key.shape
    lengths = 1 << (keys - 1).bit_length()
    return "attention", tuple(query.shape), (batch, kv_heads, lengths, dim), query.dtype, _mask_kind(mask)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """One query token per batch row ([B, H, 1, D]) over the cache: the tuner's fastest of SDPA and the Triton
    launches for this shape (timed once; every launch checked against SDPA first)."""
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    key_ = _tuner_key(query, key, mask)
    dim = query.shape[-1]
    choices = LAUNCHES + [SDPA] if dim & (dim - 1) == 0 else [SDPA]  # the kernel spans a power-of-two head size
    launch = functools.partial(_launch, query=query, key=key, value=value, mask=mask, scale=scale)
    choice = tuner.choose(key_, choices, lambda c: launch(*c), reference=SDPA)
    return launch(*choice)


@torch.library.custom_op("bitalloc::decode_attention", mutates_args=())
def decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """`decode_attention` as one opaque operator for torch.compile (its choice is made by the eager step
    before tracing, as for the packed layers)."""
    return decode_attention(query, key, value, mask, scale)


@decode_attention_op.register_fake
def _(query, key, value, mask, scale):
    return query.new_empty(query.shape[0], 1, query.shape[1], query.shape[3])


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs):
    """A Hugging Face attention function: one query token through `decode_attention`, anything else SDPA's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask_ok = attention_mask is None or attention_mask.dim() == 4
    if query.shape[2] != 1 or dropout or not mask_ok or not (query.is_cuda or tuner.interpreting()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    attend = decode_attention_op if torch.compiler.is_compiling() else decode_attention
    return attend(query, key, value, attention_mask, scale), None


def use_for_decoding(model) -> None:
    """Route `model`'s attention through `attention_forward` (masks built as for SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
