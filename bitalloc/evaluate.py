"""Perplexity, and KL divergence / top-1 agreement against the unquantized model.

PPL follows the GPTQ protocol: windows from `data.eval_windows`, each scored on
its own, PPL = exp(mean NLL over every predicted token).  The unquantized
model's log-probabilities are cached on disk (float16, one file per batch) keyed
by model fingerprint and windows, so every later evaluation of a quantized
variant compares against them without recomputing.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import atomic
from .data import ids_hash
from .guards import check_activations

log = logging.getLogger(__name__)


class ReferenceCache:
    """Unquantized log-probabilities per evaluation batch, on disk."""

    def __init__(self, root: Path | None, fingerprint: str, windows: torch.Tensor, batch_size: int):
        key = f"{fingerprint}-{ids_hash(windows)}-b{batch_size}"
        self.dir = None if root is None else Path(root) / "reference" / key
        self.batches = math.ceil(windows.shape[0] / batch_size)
        self._memory: dict[int, torch.Tensor] = {}

    def _path(self, index: int) -> Path:
        return self.dir / f"batch_{index:05d}.safetensors"

    def complete(self) -> bool:
        if self.dir is None:
            return len(self._memory) == self.batches
        return all(self._path(i).is_file() for i in range(self.batches))

    def put(self, index: int, logprobs: torch.Tensor) -> None:
        stored = logprobs.to(torch.float16).cpu().contiguous()
        if self.dir is None:
            self._memory[index] = stored
            return
        with atomic.atomic_path(self._path(index)) as tmp:
            save_file({"logprobs": stored}, str(tmp))

    def get(self, index: int) -> torch.Tensor:
        if self.dir is None:
            return self._memory[index]
        return load_file(str(self._path(index)))["logprobs"]


def _stats(values: torch.Tensor) -> dict:
    values = values.double()
    return {"mean": float(values.mean()), "median": float(values.median()),
            "p99": float(torch.quantile(values, 0.99)) if values.numel() <= 2**24 else float("nan")}


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, reference: ReferenceCache | None = None, is_reference: bool = False,
             batch_size: int = 4, device="cpu", progress: bool = True, desc: str = "eval") -> dict:
    """PPL over `windows`; with a reference, also KL(P_ref || P) and top-1 agreement per token.

    With `is_reference`, this model *is* the reference: its log-probs are stored.
    """
    total_nll, total_tokens = 0.0, 0
    kls, agree = [], 0
    batches = windows.split(batch_size)
    for index, batch in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress)):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        check_activations(model, logits, f"evaluation batch {index}", lambda: model(input_ids=batch, use_cache=False))
        logprobs = F.log_softmax(logits, dim=-1)
        targets = batch[:, 1:]
        total_nll -= float(logprobs.gather(-1, targets.unsqueeze(-1)).sum())
        total_tokens += targets.numel()
        if reference is None:
            continue
        if is_reference:
            reference.put(index, logprobs)
            ref = logprobs
        else:
            ref = reference.get(index).to(logprobs.device).float()
        kls.append((ref.exp() * (ref - logprobs)).sum(-1).flatten().cpu())
        agree += int((ref.argmax(-1) == logprobs.argmax(-1)).sum())
    nll = total_nll / total_tokens
    result = {"ppl": math.exp(nll), "nll": nll, "tokens": total_tokens, "windows": int(windows.shape[0])}
    if reference is not None:
        kl = torch.cat(kls).clamp_min(0)
        result.update({"kl": _stats(kl), "top1": agree / total_tokens})
    return result


class Evaluator:
    """One evaluation protocol (corpus, seqlen, windows) bound to one model and its reference."""

    def __init__(self, loaded, windows: torch.Tensor, protocol: dict, cache_dir: Path | None,
                 batch_size: int = 4, device="cpu", progress: bool = True):
        self.loaded, self.windows, self.protocol = loaded, windows, protocol
        self.batch_size, self.device, self.progress = batch_size, device, progress
        self.cache = ReferenceCache(cache_dir, loaded.fingerprint, windows, batch_size)

    def _result_path(self) -> Path | None:
        return None if self.cache.dir is None else self.cache.dir / "result.json"

    def unquantized(self) -> dict:
        """The unquantized model's result; computes (and caches) the reference log-probs if needed.

        Call while the model is still unquantized.
        """
        path = self._result_path()
        if self.cache.complete() and path is not None and path.is_file():
            import json

            return json.loads(path.read_text())
        result = evaluate(self.loaded.model, self.windows, self.cache, True, self.batch_size, self.device,
                          self.progress, desc="eval unquantized")
        if path is not None:
            atomic.write_json(path, result)
        return result

    def __call__(self, desc: str = "eval") -> dict:
        if not self.cache.complete():
            raise RuntimeError("Evaluator.unquantized() must run before a quantized evaluation")
        return evaluate(self.loaded.model, self.windows, self.cache, False, self.batch_size, self.device,
                        self.progress, desc=desc)
