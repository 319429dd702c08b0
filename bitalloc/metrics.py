"""Sensitivity metrics: what one (layer, option) candidate costs, several ways.

Block-pass metrics compare the block's output with the candidate quantized to
the unquantized block's output on the calibration windows (Y_q vs Y, per
token t):

    rel     mean_t ||Y_q[t] - Y[t]||^2 / ||Y[t]||^2   per-token relative error (the
            attention-sink tokens of middle blocks would otherwise dominate)
    mse     sum ||Y_q - Y||^2 / sum ||Y||^2           one global relative error
    kl      KL(P || P_q) of the final next-token distributions, nats per token, with
            the candidate's block output run through the rest of the network
            (subsampled windows)

Linear-pass metrics look at the layer's own output x W_q^T - x W^T = d (per
token) and, where named, at the gradient g of the language-model loss with
respect to that output, the loss taken on labels sampled from the model itself
so that E[g g^T] is the Fisher information, whose quadratic form is twice the
KL divergence (to second order).  Values of the Fisher metrics are predicted
KL in nats per token:

    layer_out   mean_t ||d[t]||^2 / ||x W^T [t]||^2     the layer's own relative error
    fisher      1/2 mean over windows w of (sum_t g[t] . d[t])^2, per token
    fisher_tok  1/2 sum_t (g[t] . d[t])^2, per token    (drops cross-position terms)
    wfisher     1/2 sum_ij F_ij dW_ij^2, F the diagonal Fisher of the weights
    hawq        1/2 (trace F / n) ||dW||^2              HAWQ-style trace proxy

The first-order change of the loss a unit causes is the sum of its layers'
g . d, so tie-group and whole-block units combine their layers' terms before
squaring.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BitallocError


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "block": block pass; "linear": linear pass (forward sweep, backward if `gradients`)
    gradients: bool
    help: str


METRICS = {m.name: m for m in (
    Metric("rel", "block", False, "per-token relative error of the block output"),
    Metric("mse", "block", False, "global relative error of the block output"),
    Metric("kl", "block", False, "final-logit KL divergence, rest of the network run (subsampled windows)"),
    Metric("layer_out", "linear", False, "per-token relative error of the layer's own output"),
    Metric("fisher", "linear", True, "Fisher-weighted layer output error per window (predicted KL)"),
    Metric("fisher_tok", "linear", True, "Fisher-weighted layer output error per token (predicted KL)"),
    Metric("wfisher", "linear", True, "diagonal weight-Fisher weighted weight error (predicted KL)"),
    Metric("hawq", "linear", True, "Fisher-trace proxy times weight error (HAWQ-style)"),
)}
DEFAULT_METRIC = "rel"  # ranks plans best in search runs on SmolLM2 (docs/RESULTS.md, issue 3)


def parse_metrics(text: str | list[str]) -> list[str]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise BitallocError(f"unknown metric '{unknown[0] if unknown else text}' (known: {', '.join(METRICS)})")
    return list(dict.fromkeys(names))


class BlockErrors:
    """Accumulates the block-pass metrics of one candidate over calibration batches."""

    def __init__(self):
        self.rel = 0.0
        self.squared = 0.0
        self.tokens = 0

    def add(self, candidate: torch.Tensor, reference: torch.Tensor, inverse_energy: torch.Tensor) -> None:
        err = (candidate.float() - reference.float()).pow(2).sum(-1).double()
        self.rel += float((err * inverse_energy).sum())
        self.squared += float(err.sum())
        self.tokens += err.numel()

    def values(self, energy: float) -> dict[str, float]:
        return {"rel": self.rel / max(self.tokens, 1), "mse": self.squared / max(energy, 1e-30)}


class LinearTerms:
    """Per-window and per-token first-order loss changes and relative errors of one (layer, option)."""

    def __init__(self):
        self.window: list[torch.Tensor] = []  # [samples, windows] per batch: sum_t g . d
        self.token: list[torch.Tensor] = []  # [samples, tokens] per batch: g[t] . d[t]
        self.rel = 0.0
        self.tokens = 0

    def add(self, delta: torch.Tensor, reference: torch.Tensor, grads: list[torch.Tensor] | None) -> None:
        """delta, reference: [windows, seq, out]; grads: one [windows, seq, out] per label sample."""
        d = delta.float()
        energy = reference.float().pow(2).sum(-1).clamp_min(1e-30)
        self.rel += float((d.pow(2).sum(-1) / energy).double().sum())
        self.tokens += energy.numel()
        if grads:
            dots = torch.stack([(g.float() * d).sum(-1) for g in grads]).double()  # [samples, windows, seq]
            self.window.append(dots.sum(-1).cpu())
            self.token.append(dots.flatten(1).cpu())


def combine(terms: list[LinearTerms], predicted_tokens: int) -> dict[str, float]:
    """Linear-pass metrics of a unit made of these layers' terms (see module docstring)."""
    values = {"layer_out": sum(t.rel / max(t.tokens, 1) for t in terms)}
    if terms[0].window:
        window = sum(torch.cat(t.window, dim=1) for t in terms)
        token = sum(torch.cat(t.token, dim=1) for t in terms)
        values["fisher"] = float(0.5 * window.pow(2).sum(1).mean() / predicted_tokens)
        values["fisher_tok"] = float(0.5 * token.pow(2).sum(1).mean() / predicted_tokens)
    return values


def weight_fisher_terms(weight_error: torch.Tensor, fisher_diag: torch.Tensor, predicted_tokens: int) -> dict:
    """wfisher and hawq of one layer from its weight error and the diagonal Fisher of its weight."""
    squared = weight_error.float().pow(2)
    return {
        "wfisher": float(0.5 * (fisher_diag * squared).double().sum() / predicted_tokens),
        "hawq": float(0.5 * fisher_diag.double().mean() * squared.double().sum() / predicted_tokens),
    }
