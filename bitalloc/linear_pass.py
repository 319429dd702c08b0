"""The linear pass: each layer's own output error and its Fisher weighting, from one backward sweep.

1. Forward sweep: the calibration windows go through the blocks one at a time;
   the hidden states at every block boundary are kept in host memory.
2. Labels are sampled from the model's own next-token distributions (seeded),
   and the gradient of their summed negative log-likelihood with respect to the
   last block's output is taken through the final norm and head.  Its outer
   product is, in expectation, the Fisher information: the Hessian of the KL
   divergence the quantized model will have.
3. Backward sweep, last block first, one block on the device: the block is run
   again with autograd on, the gradient is pushed through it, and every
   linear's input x, output y and output gradient g are caught on the way.
   Each candidate's output error d = Q(x) - y (through the same QuantLinear as
   apply) then gives the `metrics` module's terms; the diagonal Fisher of each
   weight comes from the per-window weight gradients g^T x.

Blocks below the lowest one still to measure are never visited; a gradient
frontier saved after each block lets a killed sweep resume where it stopped.
Without gradient metrics only the forward sweep runs.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .blocks import BlockBatch, advance, final_logits, run_block
from .guards import check_activations
from .metrics import LinearTerms, weight_fisher_terms
from .models import block_linears, weight_matrix

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _frozen(module):
    """No weight gradients are wanted: turn them off for the duration, then restore."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def forward_sweep(blocks, weights, batches: list[BlockBatch], device, upto: int, progress: bool, prefix: str = ""):
    """Hidden states entering blocks 0..upto (index i: the inputs of block i), kept on the host
    (`batches`: block 0's inputs as `capture_inputs(host=True)` gives them)."""
    boundaries = [list(batches)]
    for index in tqdm(range(upto), desc="forward sweep", unit="block", disable=not progress):
        block = weights.load(index, blocks[index], device)
        outputs = [run_block(block, b, device) for b in boundaries[-1]]
        check_activations(block, outputs, f"block {index}",
                          lambda: [run_block(block, b, device) for b in boundaries[-1]], f"{prefix}.{index}")
        boundaries.append(advance(boundaries[-1], outputs))
        weights.release(index, blocks[index])
    return boundaries


def label_gradients(model, ids_batches, final: list[BlockBatch], device, as_tuple: bool, samples: int,
                    seed: int) -> list[list[torch.Tensor]]:
    """d(sum of NLL of model-sampled labels)/d(last block output): [sample][batch] tensors on the host."""
    generator = torch.Generator(device=device).manual_seed(seed)
    grads = [[] for _ in range(samples)]
    with _frozen(model):
        for ids, batch in zip(ids_batches, final):
            per_window = [[] for _ in range(samples)]
            for w in range(batch.hidden.shape[0]):  # one window at a time: logits are vocabulary-sized
                hidden = batch.hidden[w : w + 1].to(device).detach().requires_grad_(True)
                logits = final_logits(model, ids[w : w + 1], hidden, as_tuple)[:, :-1].float()
                logprobs = F.log_softmax(logits, dim=-1).flatten(0, 1)
                del logits
                probs = logprobs.detach().exp()
                for k in range(samples):
                    labels = torch.multinomial(probs, 1, generator=generator)
                    loss = -logprobs.gather(1, labels).sum()
                    (grad,) = torch.autograd.grad(loss, hidden, retain_graph=k + 1 < samples)
                    per_window[k].append(grad.detach().to("cpu"))
            for k in range(samples):
                grads[k].append(torch.cat(per_window[k]))
    return grads


def _by_window(t: torch.Tensor, windows: int) -> torch.Tensor:
    """[windows, seq, features] whatever the layout a block gives its linears ([tokens, features] in OPT)."""
    return t.reshape(windows, -1, t.shape[-1])


class _Catch:
    """Inputs, outputs and output gradients of a block's linears during one forward/backward."""

    def __init__(self, block):
        self.inputs, self.outputs, self.grads, self.handles = {}, {}, {}, []
        for name, module in block_linears(block).items():
            self.handles.append(module.register_forward_hook(lambda m, a, o, n=name: self._seen(n, a[0], o)))

    def _seen(self, name, x, y):
        self.inputs[name], self.outputs[name] = x.detach(), y.detach()
        self.grads[name] = []
        if y.requires_grad:
            y.register_hook(lambda g, n=name: self.grads[n].append(g.detach()))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def measure_block_linears(block, candidates, boundary: list[BlockBatch], upstream: list[list[torch.Tensor]] | None,
                          device, fisher_diag: bool) -> tuple[dict, dict, list[list[torch.Tensor]] | None]:
    """Linear-pass terms of every (layer, option) candidate of one block.

    `upstream`: gradients at the block's output ([sample][batch]) or None (no gradient metrics).
    Returns (terms per (layer, option), weight-Fisher terms per (layer, option), gradients at the block's input).
    """
    terms = {key: LinearTerms() for key in candidates.keys()}
    diag = {name: None for name, _ in candidates.keys()} if fisher_diag else {}
    below = None if upstream is None else [[] for _ in upstream]
    catch = _Catch(block)
    try:
        with _frozen(block):
            for b, batch in enumerate(boundary):
                hidden = batch.hidden.to(device).detach()
                if upstream is not None:
                    hidden.requires_grad_(True)
                with torch.set_grad_enabled(upstream is not None):
                    out = run_block(block, BlockBatch(hidden, batch.kwargs), device)
                for k, grads in enumerate(upstream or []):
                    torch.autograd.backward(out, grads[b].to(device), retain_graph=k + 1 < len(upstream))
                    below[k].append(hidden.grad.detach().to("cpu"))
                    hidden.grad = None
                windows = hidden.shape[0]
                for name, option in candidates.keys():
                    x, y, g = catch.inputs[name], catch.outputs[name], catch.grads[name]
                    with torch.no_grad():
                        delta = candidates.run(name, option, x) - y
                    terms[(name, option)].add(_by_window(delta, windows), _by_window(y, windows),
                                              [_by_window(t, windows) for t in g] or None)
                for name in diag:
                    x = _by_window(catch.inputs[name], windows).float()
                    per_window = [torch.einsum("wto,wti->woi", _by_window(g, windows).float(), x).pow(2).sum(0)
                                  for g in catch.grads[name]]
                    total = sum(per_window) / len(per_window)
                    diag[name] = total if diag[name] is None else diag[name] + total
                del out
    finally:
        catch.remove()
    weight_terms = {}
    if fisher_diag:
        for name, option in candidates.keys():
            weight = weight_matrix(block.get_submodule(name)).detach().float()
            weight_terms[(name, option)] = (candidates.weight_error(name, option, weight), diag[name])
    return terms, weight_terms, below


def weight_values(weight_terms: dict, predicted_tokens: int) -> dict:
    return {key: weight_fisher_terms(error, fisher, predicted_tokens) for key, (error, fisher) in weight_terms.items()}
