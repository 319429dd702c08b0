"""Approximate floating-point multiplication (AxCore-style), simulated in float32.

An approximate multiplier replaces the mantissa product of a * b by the sum of
the operands' logarithms, as Mitchell (1962) did: with a = 2^ea (1 + fa) and
b = 2^eb (1 + fb), log2(1 + f) ~ f gives

    a * b ~ 2^(ea+eb) (1 + fa + fb)        if fa + fb < 1
            2^(ea+eb+1) (fa + fb)          otherwise,

which hardware computes by adding the two numbers' bit patterns as integers
(exponent and mantissa fields together) and subtracting the exponent bias: no
multiplier array.  The result is never too large and at most 11.1 % too small;
AxCore-style units add a constant correction to the mantissa sum so that the
error is zero on average: `compensation` is that constant (found here for
mantissas spread uniformly, as they are on average).  Products of exact zeros are
zero and signs multiply exactly.

These are pure functions; a backend (kernels/) wraps `approx_matmul` to evaluate
a model whose GEMMs use such a unit (weights and activations already in their
FP formats: the multiplier approximates products, not the formats).
"""
from __future__ import annotations

import functools

import torch


def mitchell_multiply(a: torch.Tensor, b: torch.Tensor, compensation: float = 0.0) -> torch.Tensor:
    """Elementwise approximate product of float tensors (broadcasting like a * b)."""
    ma, ea = torch.frexp(a.float())  # a = ma * 2^ea, |ma| in [0.5, 1)
    mb, eb = torch.frexp(b.float())
    fa, fb = 2 * ma.abs() - 1, 2 * mb.abs() - 1  # a = 2^(ea-1) (1 + fa)
    total = fa + fb + compensation
    carry = total >= 1
    mantissa = torch.where(carry, 2 * total, 1 + total)  # 2 * (fa + fb) = 2^1 * (fa + fb) on carry
    magnitude = torch.ldexp(mantissa, (ea - 1) + (eb - 1))
    sign = torch.sign(a) * torch.sign(b)
    return sign * magnitude


@functools.lru_cache(maxsize=None)
def mean_compensation(steps: int = 512) -> float:
    """The constant added to fa + fb that makes the mean relative error zero over uniform mantissas."""
    f = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    fa, fb = torch.meshgrid(f, f, indexing="ij")
    exact = (1 + fa) * (1 + fb)
    lo, hi = 0.0, 0.25
    for _ in range(50):  # bisection: the mean error rises monotonically with the constant
        c = (lo + hi) / 2
        total = fa + fb + c
        approx = torch.where(total >= 1, 2 * total, 1 + total)
        if float(((approx - exact) / exact).mean()) < 0:
            lo = c
        else:
            hi = c
    return (lo + hi) / 2


def approx_matmul(x: torch.Tensor, w: torch.Tensor, compensated: bool = True, chunk: int = 8) -> torch.Tensor:
    """x [..., in] @ w[out, in]^T with every product approximate and exact float32 accumulation, returned in
    x's dtype on x's device (as the exact product would be).

    Memory is bounded by processing `chunk` input channels at a time ([tokens, chunk, out]).
    """
    c = mean_compensation() if compensated else 0.0
    flat = x.reshape(-1, x.shape[-1]).float()
    wt = w.float().T
    out = torch.zeros(flat.shape[0], w.shape[0], device=x.device)
    for start in range(0, flat.shape[1], chunk):
        end = min(start + chunk, flat.shape[1])
        out += mitchell_multiply(flat[:, start:end, None], wt[None, start:end, :], c).sum(1)
    return out.reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)
