"""Calibration statistics of one linear layer's inputs, accumulated batch by batch."""
from __future__ import annotations

import torch


class LayerCalib:
    """Streaming statistics of a layer's inputs x [tokens, in].

    Keeps X^T X (for GPTQ-style Hessians), per-channel mean |x| and max |x|
    (for AWQ/SmoothQuant/outlier selection), and up to `max_rows` sampled rows
    of x for methods that search against the layer's real outputs.  Memory
    stays bounded whatever the calibration size.  Each batch's X^T X is a
    float32 matmul (fast on CPUs) summed into a float64 total, so rounding does
    not grow with the number of batches.  Layers that read the very same input
    tensor (q/k/v) may share one LayerCalib; quantizers never modify it.
    """

    def __init__(self, in_features: int, max_rows: int = 4096, seed: int = 0, hessian: bool = True):
        self.in_features = in_features
        self.max_rows = max_rows
        self.count = 0
        # hessian=False: per-channel statistics only, for callers that never ask for X^T X (its
        # in_features^2 float64 are 6.6 GB at 28672 inputs)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64) if hessian else None
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.abs_max = torch.zeros(in_features, dtype=torch.float32)
        self._rows: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.in_features).float().cpu()
        if self.xtx is not None:
            self.xtx += (x.T @ x).double()
        magnitude = x.abs()
        self.abs_sum += magnitude.sum(0, dtype=torch.float64)
        self.abs_max = torch.maximum(self.abs_max, magnitude.amax(0))
        self.count += x.shape[0]
        kept = sum(r.shape[0] for r in self._rows)
        if kept < self.max_rows:
            take = min(self.max_rows - kept, x.shape[0])
            idx = torch.randperm(x.shape[0], generator=self._generator)[:take].sort().values
            self._rows.append(x[idx])

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n: the curvature of the layer's squared output error."""
        if self.xtx is None:
            raise ValueError("this LayerCalib was made with hessian=False")
        return (2.0 * self.xtx / max(self.count, 1)).float()

    def act_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()

    def rows(self) -> torch.Tensor:
        return torch.cat(self._rows) if self._rows else torch.zeros(0, self.in_features)


def output_error(dw: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per output row, E[(dW x)^2] * 2 = dW H dW^T on the diagonal: the exact squared output error
    over every calibration token, from X^T X alone (no stored activations)."""
    return ((dw @ hessian) * dw).sum(-1)
