"""Dynamic per-token activation quantization (simulated): the A in W8A8/W4A8/W4A4."""
from __future__ import annotations

import torch


def fake_quantize_tokens(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric integer quantization with one scale per token (last dim = channels)."""
    if bits >= 16:
        return x
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qmax
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale
