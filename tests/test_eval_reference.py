"""The reference cache (keyed, checksummed, bounded), top-K KL, per-window statistics and several corpora."""
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from bitalloc.data import eval_windows
from bitalloc.errors import BitallocError
from bitalloc.evaluate import Evaluation, Evaluator, evaluate
from bitalloc.models import from_module
from bitalloc.reference import ReferenceCache, compare
from conftest import tiny_llama


@pytest.fixture
def setup(corpus_dir, tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer))
    return model, eval_windows(tokenizer, "wikitext2", 32, 4, corpus_dir)


def _perturb(model):
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3)


def test_per_window_statistics_add_up(setup):
    model, w = setup
    result = evaluate(model, w, batch_size=3, progress=False)
    per_window = result["per_window"]["ppl"]
    assert len(per_window) == 4
    assert math.exp(sum(math.log(p) for p in per_window) / 4) == pytest.approx(result["ppl"], rel=1e-5)


def test_topk_kl_approaches_the_exact_kl_from_below():
    torch.manual_seed(0)
    ref = F.log_softmax(torch.randn(50, 300) * 3, -1)
    other = F.log_softmax(ref + 0.3 * torch.randn(50, 300), -1)
    exact, same = compare({"logprobs": ref}, other)
    by_k = {}
    for k in (5, 50, 300):
        cache = ReferenceCache(None, "fp", torch.zeros(1, 51, dtype=torch.long), 1, topk=k)
        cache.put(0, ref.unsqueeze(0))
        kl, top = compare({n: t[0] for n, t in cache.get(0).items()}, other)
        assert torch.equal(top, same)
        by_k[k] = float(kl.mean())
    assert by_k[5] <= by_k[50] <= by_k[300] * (1 + 1e-3)  # coarse-graining never increases KL
    assert by_k[300] == pytest.approx(float(exact.mean()), rel=5e-3)
    assert by_k[50] == pytest.approx(float(exact.mean()), rel=0.1)


def test_reference_too_big_for_the_limit_is_stored_as_topk(setup, tmp_path):
    model, w = setup
    full = ReferenceCache(tmp_path, "fp", w, 2, vocab_size=320, max_bytes=10**9)
    small = ReferenceCache(tmp_path, "fp", w, 2, vocab_size=320, max_bytes=10**4)
    assert full.topk == 0 and small.topk == 256 and full.key != small.key


def test_corrupted_reference_is_detected_and_recomputed(setup, tmp_path):
    model, w = setup
    loaded = from_module(model)
    evaluator = Evaluator(loaded, w, {"corpus": "wikitext2"}, tmp_path, batch_size=2, progress=False)
    base = evaluator.unquantized()
    _perturb(model)
    first = evaluator()
    batch = evaluator.cache.dir / "batch_00001.safetensors"
    raw = bytearray(batch.read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside the tensor data: the header still parses
    batch.write_bytes(bytes(raw))
    with pytest.raises(BitallocError, match="batch_00001.safetensors is corrupted"):
        evaluator()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.div_(3)
    again = Evaluator(loaded, w, {"corpus": "wikitext2"}, tmp_path, batch_size=2, progress=False)
    assert again.unquantized()["ppl"] == pytest.approx(base["ppl"])  # recomputed, not trusted
    assert again.cache.verify()
    _perturb(model)
    assert again()["kl"]["mean"] == pytest.approx(first["kl"]["mean"], rel=1e-4)
    assert again()["dppl"] == pytest.approx(first["ppl"] - base["ppl"], rel=1e-4)


def test_cache_is_keyed_by_model_and_windows(setup, tmp_path, corpus_dir, tokenizer):
    model, w = setup
    other = eval_windows(tokenizer, "wikitext2", 32, 3, corpus_dir)
    keys = {ReferenceCache(tmp_path, fp, win, 2, 320).key for fp, win in (("a", w), ("b", w), ("a", other))}
    assert len(keys) == 3


def test_old_references_are_pruned_to_the_limit(setup, tmp_path):
    model, w = setup
    root = tmp_path / "reference"
    for name, age in (("old", 7200), ("recent", 60)):
        (root / name).mkdir(parents=True)
        (root / name / "batch_00000.safetensors").write_bytes(b"x" * 5000)
        stamp = time.time() - age
        os.utime(root / name / "batch_00000.safetensors", (stamp, stamp))
    cache = ReferenceCache(tmp_path, "fp", w, 2, vocab_size=320, topk=8, max_bytes=6000)
    evaluate(model, w, cache, is_reference=True, batch_size=2, progress=False)
    removed = cache.prune()
    assert [p.name for p in removed] == ["old"]
    assert (root / "recent").is_dir() and cache.complete()


def test_several_corpora_report_each_and_skip_the_missing(setup, tmp_path, corpus_dir, tokenizer):
    model, w = setup
    loaded = from_module(model)
    ptb = eval_windows(tokenizer, "ptb", 32, 3, corpus_dir)
    evaluation = Evaluation({"wikitext2": Evaluator(loaded, w, {"corpus": "wikitext2", "windows": 4}, tmp_path,
                                                    progress=False),
                             "ptb": Evaluator(loaded, ptb, {"corpus": "ptb", "windows": 3}, tmp_path, progress=False)},
                            {"c4": "corpus c4/validation not available"})
    assert evaluation.protocol["corpus"] == "wikitext2,ptb,c4"
    base = evaluation.unquantized()
    _perturb(model)
    result = evaluation()
    assert result["ppl"] == result["corpora"]["wikitext2"]["ppl"]
    assert result["corpora"]["ptb"]["windows"] == 3 and result["corpora"]["ptb"]["kl"]["mean"] > 0
    assert result["corpora"]["c4"] == {"available": False, "reason": "corpus c4/validation not available"}
    assert base["corpora"]["ptb"]["top1"] == 1
    with pytest.raises(BitallocError, match="no evaluation corpus is available: corpus c4"):
        Evaluation({}, {"c4": "corpus c4/validation not available"})
