import math

import pytest
import torch
import torch.nn.functional as F

from bitalloc.data import calibration_ids, eval_windows, load_text, windows
from bitalloc.errors import BitallocError
from bitalloc.evaluate import ReferenceCache, evaluate
from conftest import tiny_llama


def test_windows_follow_the_gptq_protocol():
    ids = torch.arange(23)
    w = windows(ids, seqlen=5)
    assert w.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    assert windows(ids, 5, max_windows=2).tolist() == [[0, 1, 2, 3, 4], [15, 16, 17, 18, 19]]
    assert windows(ids, 5, max_windows=3)[:, 0].tolist() == [0, 10, 15]
    with pytest.raises(BitallocError, match="fewer than seqlen"):
        windows(ids, 30)


def test_ptb_test_sentences_are_joined_with_single_spaces(tmp_path):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "test.txt").write_text(" the cat <unk> \n sat on N mats \n")
    assert load_text("ptb", "test", tmp_path) == "the cat <unk> sat on N mats"


def test_missing_corpus_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(BitallocError, match=r"wikitext2/test not available: put it at .*wikitext2/test.txt.*hub"):
        load_text("wikitext2", "test", tmp_path)


def test_calibration_is_seeded(corpus_dir, tokenizer):
    a = calibration_ids(tokenizer, "wiki", 4, 32, seed=0, directory=corpus_dir)
    b = calibration_ids(tokenizer, "wiki", 4, 32, seed=0, directory=corpus_dir)
    c = calibration_ids(tokenizer, "wiki", 4, 32, seed=1, directory=corpus_dir)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_user_calibration_files(tmp_path, tokenizer):
    (tmp_path / "mine.jsonl").write_text('{"text": "the river and the city"}\n{"text": "a song of the north"}\n')
    ids = calibration_ids(tokenizer, str(tmp_path / "mine.jsonl"), 2, 4, seed=0)
    assert ids.shape == (2, 4)
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(BitallocError, match="bad.jsonl:1"):
        calibration_ids(tokenizer, str(tmp_path / "bad.jsonl"), 2, 4)


def test_perplexity_equals_a_direct_computation(corpus_dir, tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer))
    w = eval_windows(tokenizer, "wikitext2", 32, 5, corpus_dir)
    result = evaluate(model, w, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(input_ids=w).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
    assert result["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert result["tokens"] == 5 * 31


def test_kl_is_zero_for_the_reference_and_positive_for_a_perturbed_model(corpus_dir, tokenizer, tmp_path):
    model = tiny_llama(vocab_size=len(tokenizer))
    w = eval_windows(tokenizer, "wikitext2", 32, 4, corpus_dir)
    cache = ReferenceCache(tmp_path, "fp", w, 2)
    base = evaluate(model, w, cache, is_reference=True, batch_size=2, progress=False)
    assert cache.complete()
    assert base["kl"]["mean"] == 0 and base["top1"] == 1
    again = evaluate(model, w, ReferenceCache(tmp_path, "fp", w, 2), batch_size=2, progress=False)
    assert again["kl"]["mean"] < 1e-6  # against its own float16-stored reference (renormalised: was ~3e-5)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3)
    worse = evaluate(model, w, ReferenceCache(tmp_path, "fp", w, 2), batch_size=2, progress=False)
    assert worse["kl"]["mean"] > 1e-3 and worse["kl"]["p99"] >= worse["kl"]["median"]
