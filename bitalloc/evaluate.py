"""Perplexity, and KL divergence / top-1 agreement against the unquantized model.

PPL follows the GPTQ protocol: windows from `data.eval_windows`, each scored on
its own, PPL = exp(mean NLL over every predicted token).  The unquantized
model's token distributions are cached on disk (`reference.ReferenceCache`:
keyed, atomic, checksummed, bounded), so every later evaluation of a quantized
variant compares against them without recomputing.  Results also carry
per-window statistics (PPL, mean KL, top-1 of each window) and, for quantized
variants, dPPL against the unquantized model.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import atomic
from .errors import BitallocError
from .guards import check_activations
from .reference import ReferenceCache, compare
from .safe_json import is_finite_number

log = logging.getLogger(__name__)

MAX_DEFAULT_SEQLEN = 2048
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")

__all__ = ["evaluate", "Evaluator", "Evaluation", "ReferenceCache", "default_seqlen"]


def default_seqlen(model) -> int:
    """The model's context length, capped at 2048 (the length papers report)."""
    config = getattr(model, "config", None)
    context = next((getattr(config, k) for k in CONTEXT_KEYS if isinstance(getattr(config, k, None), int)), None)
    return min(context or MAX_DEFAULT_SEQLEN, MAX_DEFAULT_SEQLEN)


def _stats(values: torch.Tensor) -> dict:
    values = values.double()
    if values.numel() > 2**24:  # torch.quantile's limit: estimate p99 on an even subsample
        values = values[:: math.ceil(values.numel() / 2**24)]
    return {"mean": float(values.mean()), "median": float(values.median()),
            "p99": float(torch.quantile(values, 0.99))}


def _rounded(values: list[float]) -> list[float]:
    return [float(f"{v:.6g}") for v in values]


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, reference: ReferenceCache | None = None, is_reference: bool = False,
             batch_size: int = 4, device="cpu", progress: bool = True, desc: str = "eval") -> dict:
    """PPL over `windows`; with a reference, also KL(P_ref || P) and top-1 agreement per token.

    With `is_reference`, this model *is* the reference: its log-probs are stored.
    """
    window_nll, window_kl, window_top1, kls = [], [], [], []
    for index, batch in enumerate(tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=not progress)):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        check_activations(model, logits, f"evaluation batch {index}", lambda: model(input_ids=batch, use_cache=False))
        logprobs = F.log_softmax(logits, dim=-1)
        targets = batch[:, 1:]
        window_nll += (-logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().mean(-1)).tolist()
        if reference is None:
            continue
        if is_reference:
            reference.put(index, logprobs)
        stored = {"logprobs": logprobs} if is_reference else reference.get(index)
        for row in range(batch.shape[0]):
            kl, same = compare({k: v[row] for k, v in stored.items()}, logprobs[row])
            kls.append(kl.cpu())
            window_kl.append(float(kl.double().mean()))
            window_top1.append(float(same.double().mean()))
    nll = sum(window_nll) / len(window_nll)  # windows are equally long: the token mean
    result = {"ppl": math.exp(nll), "nll": nll, "tokens": len(window_nll) * (windows.shape[1] - 1),
              "windows": int(windows.shape[0]), "per_window": {"ppl": _rounded([math.exp(v) for v in window_nll])}}
    if reference is not None:
        result.update({"kl": _stats(torch.cat(kls)), "top1": sum(window_top1) / len(window_top1)})
        if reference.topk:
            result["kl_topk"] = reference.topk
        result["per_window"].update({"kl_mean": _rounded(window_kl), "top1": _rounded(window_top1)})
    return result


def _is_reference_result(result) -> bool:
    """`result` has what `evaluate` writes for a reference run and its readers use (PPL, KL, top-1, per window)."""
    numbers = ("ppl", "nll", "top1", "tokens", "windows")
    if not isinstance(result, dict) or not all(is_finite_number(result.get(k)) for k in numbers):
        return False
    kl, per_window = result.get("kl"), result.get("per_window")
    return (isinstance(kl, dict) and all(is_finite_number(kl.get(k)) for k in ("mean", "median", "p99"))
            and isinstance(per_window, dict) and isinstance(per_window.get("ppl"), list)
            and all(map(is_finite_number, per_window["ppl"])))


class Evaluator:
    """One evaluation protocol (corpus, seqlen, windows) bound to one model and its reference.

    With `keep_reference=False` only perplexity is measured and nothing is cached
    (an unquantized-only run needs no reference).
    """

    def __init__(self, loaded, windows: torch.Tensor, protocol: dict, cache_dir: Path | None,
                 batch_size: int = 4, device="cpu", progress: bool = True, keep_reference: bool = True):
        self.loaded, self.windows, self.protocol = loaded, windows, protocol
        self.batch_size, self.device, self.progress = batch_size, device, progress
        vocab = getattr(getattr(loaded.model, "config", None), "vocab_size", None)
        self.cache = ReferenceCache(cache_dir, loaded.fingerprint, windows, batch_size, vocab) if keep_reference \
            else None
        self._base: dict | None = None

    def _result_path(self) -> Path | None:
        return None if self.cache is None or self.cache.dir is None else self.cache.dir / "result.json"

    def _cached_result(self) -> dict | None:
        """The stored unquantized result if it and every reference batch can be trusted; else None (recompute)."""
        path = self._result_path()
        if path is None or not path.is_file() or not self.cache.complete():
            return None
        try:
            result = json.loads(path.read_text())
        except (ValueError, OSError):  # ValueError covers bad JSON and bad UTF-8
            result = None
        if not _is_reference_result(result):
            log.warning("reference result %s is unreadable or malformed; recomputing the reference", path)
            return None
        return result if self.cache.verify() else None

    def unquantized(self) -> dict:
        """The unquantized model's result; computes (and caches) the reference log-probs if needed.

        Call while the model is still unquantized.
        """
        cached = self._cached_result()
        if cached is not None:
            self.cache.touch()
            self._base = cached
            return self._base
        path = self._result_path()
        name = self.protocol.get("corpus", "")
        self._base = evaluate(self.loaded.model, self.windows, self.cache, self.cache is not None, self.batch_size,
                              self.device, self.progress, desc=f"eval unquantized {name}".strip())
        if path is not None:
            atomic.write_json(path, self._base)
            self.cache.prune()
        return self._base

    def __call__(self, desc: str = "eval") -> dict:
        if self._base is None or self.cache is None or not self.cache.complete():
            raise RuntimeError("Evaluator.unquantized() must run before a quantized evaluation")
        self.cache.touch()
        result = evaluate(self.loaded.model, self.windows, self.cache, False, self.batch_size, self.device,
                          self.progress, desc=desc)
        result["dppl"] = result["ppl"] - self._base["ppl"]
        return result


class Evaluation:
    """Several corpora behind the interface of one Evaluator (`protocol`, `unquantized()`, `__call__`).

    Results are those of the first corpus, with every corpus' result under
    "corpora"; corpora that could not be found are listed there as
    {"available": false, "reason": ...} and skipped.
    """

    def __init__(self, evaluators: dict[str, Evaluator], unavailable: dict[str, str]):
        if not evaluators:
            reasons = "; ".join(unavailable.values())
            raise BitallocError(f"no evaluation corpus is available: {reasons}")
        self.evaluators, self.unavailable = evaluators, unavailable
        for name, reason in unavailable.items():
            log.warning("skipping %s: %s", name, reason)
        first = next(iter(evaluators.values())).protocol
        self.protocol = dict(first)
        if len(evaluators) + len(unavailable) > 1:
            self.protocol["corpus"] = ",".join([*evaluators, *unavailable])
            self.protocol["corpora"] = {**{n: e.protocol for n, e in evaluators.items()},
                                        **{n: {"available": False, "reason": r} for n, r in unavailable.items()}}

    def _merge(self, results: dict[str, dict]) -> dict:
        if len(results) + len(self.unavailable) == 1:
            return next(iter(results.values()))
        merged = dict(next(iter(results.values())))
        merged["corpora"] = {**results, **{n: {"available": False, "reason": r} for n, r in self.unavailable.items()}}
        return merged

    def unquantized(self) -> dict:
        return self._merge({name: e.unquantized() for name, e in self.evaluators.items()})

    def __call__(self, desc: str = "eval") -> dict:
        return self._merge({name: e(f"{desc} {name}" if len(self.evaluators) > 1 else desc)
                            for name, e in self.evaluators.items()})
