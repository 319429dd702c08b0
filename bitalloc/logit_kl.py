"""The `kl` metric: run a candidate's block output through the rest of the network.

A few calibration windows (the first `windows`) are carried from the block
being measured through every later block, each later block loaded from its
weight source in turn, then through the model's own final norm and head; the
metric is KL(P_ref || P_candidate) of the next-token distributions, averaged
over the predicted positions as `evaluate` averages it.  With `stride` > 1 only
every stride-th position goes through the head (the head of a large-vocabulary
model costs as much as several blocks; every position still feeds the blocks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .blocks import BlockBatch, final_logits, run_block


def kl_per_token(reference: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Mean KL(P_ref || P) over positions; both [windows, seq, vocab] log-probabilities."""
    return float((reference.exp() * (reference - logprobs)).sum(-1).clamp_min(0).double().mean())


class LogitKL:
    def __init__(self, model, ids: torch.Tensor, stream: BlockBatch, blocks, weights, device, as_tuple: bool,
                 stride: int = 1):
        self.model, self.kwargs, self.stride = model, stream.kwargs, stride
        self.ids = ids[:, :-1][:, ::stride]
        self.blocks, self.weights, self.device, self.as_tuple = blocks, weights, device, as_tuple
        self.reference = self._logprobs(self._carry(-1, [stream.hidden])[0])

    @torch.no_grad()
    def _carry(self, index: int, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """Hidden states after block `index`, carried through blocks index+1 .. last."""
        for later in range(index + 1, len(self.blocks)):
            block = self.weights.load(later, self.blocks[later], self.device)
            states = [run_block(block, BlockBatch(h, self.kwargs)) for h in states]
            self.weights.release(later, self.blocks[later])
        return states

    @torch.no_grad()
    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = final_logits(self.model, self.ids, hidden[:, :-1][:, :: self.stride], self.as_tuple)
        return F.log_softmax(logits.float(), dim=-1)

    def measure(self, index: int, outputs: list[torch.Tensor]) -> list[float]:
        """KL per token for each candidate output of block `index` on the KL windows."""
        return [kl_per_token(self.reference, self._logprobs(h)) for h in self._carry(index, outputs)]
