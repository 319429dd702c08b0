"""OmniQuant's learnable weight clipping (LWC, Shao et al. 2024), method name `lwc`.

Each group learns how far to shrink its range: upper bound gamma * max(w),
lower bound beta * min(w) (one factor gamma * max|w| for symmetric and codebook
formats), gamma = sigmoid(a), beta = sigmoid(b), trained with Adam through a
straight-through rounding.

What the training fits differs from the paper, to fit bitalloc's one signature
(weight, option, LayerCalib): OmniQuant trains a whole block against the
unquantized block's output (together with learnable equivalent transforms);
here each layer is trained against its own unquantized output, with the loss
tr(dW H dW^T) = the squared output error summed over every calibration token,
computed exactly from X^T X.  Each layer is then an independent, cheap problem
(no activations stored, no block re-run per step), and the profiler can price
a layer's LWC option alone, as it does every other option.  Because the loss
covers the whole calibration set at once, one epoch is one full-batch step; the
factors start from the best ratio of a grid search (rtn clip=1 on the same
objective's diagonal) instead of OmniQuant's sigmoid(4), and the best factors
seen are kept, the search's own ratios among them (the sigmoid never reaches 1,
no clipping, exactly), so LWC never ends worse than where it started.

Parameters: epochs (default 20, 40 at 2 bits, as OmniQuant), lr (default 0.05:
larger than OmniQuant's 0.01 because an epoch here is one step, not one per sample).
"""
from __future__ import annotations

import torch

from . import formats
from .calib import LayerCalib, output_error
from .option import Option
from .qweight import QuantizedWeight, quantize_with_scales
from .registry import at_least, positive, register_quantizer
from .rtn import clip_search


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _nearest(x: torch.Tensor, fmt: str) -> torch.Tensor:
    bounds, codes = formats._codebook_search(fmt)
    return formats.codebook(fmt)[codes.long()][torch.bucketize(x.detach(), bounds)]


def clip_ranges(wg: torch.Tensor, option: Option, upper: torch.Tensor, lower: torch.Tensor):
    """Scales and zeros [out, ng] of groups clipped to [lower * min, upper * max] (differentiable)."""
    if option.fmt != "int":
        return (wg.abs().amax(-1) * upper).clamp_min(1e-8), None
    if option.sym:
        return (wg.abs().amax(-1) * upper / (2 ** (option.bits - 1) - 1)).clamp_min(1e-8), None
    lo, hi = formats.asym_range(wg.amin(-1) * lower, wg.amax(-1) * upper)
    scales = ((hi - lo) / (2**option.bits - 1)).clamp_min(1e-8)
    return scales, _ste_round(-lo / scales).clamp(0, 2**option.bits - 1)


def fake_quantize(wg: torch.Tensor, option: Option, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """Quantize-dequantize with straight-through rounding, so gradients reach the scales."""
    x = wg / scales[..., None]
    if option.fmt != "int":
        return (x + (_nearest(x, option.fmt) - x).detach()) * scales[..., None]
    offset = zeros[..., None] if zeros is not None else torch.full_like(x, 2 ** (option.bits - 1))
    q = torch.clamp(_ste_round(x) + offset, 0, 2**option.bits - 1)
    return (q - offset) * scales[..., None]


def train_clipping(w: torch.Tensor, option: Option, hessian: torch.Tensor, epochs: int, lr: float):
    """Learn per-group clip factors; returns (upper, lower) factors in (0, 1]."""
    wg = formats.to_groups(w, option.group_size)
    norm = float(hessian.diagonal().mean()) * w.numel()

    def loss_at(factors):
        dequantized = fake_quantize(wg, option, *clip_ranges(wg, option, *factors))
        return output_error(formats.from_groups(dequantized, w.shape[1]) - w, hessian).sum() / norm

    _, _, ratio = clip_search(w, option, hessian.diagonal().clamp_min(1e-8))
    # the search's own ratios are the first candidate: the sigmoid never reaches 1 (no clipping) exactly
    best, best_loss = (ratio, ratio), float(loss_at((ratio, ratio)))
    logit = torch.logit(ratio.clamp(0.01, 0.995))
    upper, lower = logit.clone().requires_grad_(True), logit.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([upper, lower], lr=lr)
    for epoch in range(epochs + 1):
        with torch.enable_grad():
            factors = torch.sigmoid(upper), torch.sigmoid(lower)
            loss = loss_at(factors)
            value = float(loss.detach())
            if value < best_loss:
                best_loss, best = value, (factors[0].detach().clone(), factors[1].detach().clone())
            if epoch == epochs:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return best


@register_quantizer("lwc", version="3", needs_calibration=True, params={"epochs": at_least(0), "lr": positive()})
def quantize_lwc(w: torch.Tensor, option: Option, calib: LayerCalib) -> QuantizedWeight:
    epochs = option.param("epochs", 40 if option.bits <= 2 else 20, int)
    upper, lower = train_clipping(w, option, calib.hessian(), epochs, option.param("lr", 0.05, float))
    wg = formats.to_groups(w, option.group_size)
    with torch.no_grad():
        if option.fmt == "int" and not option.sym:
            lo, hi = formats.asym_range(wg.amin(-1) * lower, wg.amax(-1) * upper)
            flat = hi <= lo
            scales = formats.to_storage(torch.where(flat, torch.ones_like(hi), (hi - lo) / (2**option.bits - 1)),
                                        "scales")
            zeros = torch.clamp(torch.round(-lo / scales), 0, 2**option.bits - 1)
        else:
            scales, zeros = formats.fit_scales(wg, option.fmt, option.bits, option.sym, upper)
    return quantize_with_scales(w, option, scales, zeros)
