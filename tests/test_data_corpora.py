"""Corpus joins and evaluation windows of every protocol, checked by hand on a word-level tokenizer."""
import gzip
import json
import random
import re

import pytest
import torch

from bitalloc.data import C4_WINDOWS, CorpusUnavailable, calibration_ids, eval_windows, load_text
from bitalloc.errors import BitallocError
from bitalloc.evaluate import default_seqlen


class WordTokenizer:
    """One token per word and one per newline, ids in order of first appearance: easy to compute by hand."""

    def __init__(self):
        self.vocab = {}

    def ids(self, text):
        return [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r"\S+|\n", text)]

    def __call__(self, text, return_tensors="pt"):
        return {"input_ids": torch.tensor([self.ids(text)])}


@pytest.fixture(autouse=True)
def offline(offline_hub):
    yield


def test_wikitext2_is_tokenized_whole_with_its_blank_lines(tmp_path):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "test.txt").write_text("a b c\n\nd e\n\nf g h i")
    tok = WordTokenizer()  # a=0 b=1 c=2 \n=3 d=4 e=5 f=6 g=7 h=8 i=9
    w = eval_windows(tok, "wikitext2", seqlen=4, directory=tmp_path)
    assert w.tolist() == [[0, 1, 2, 3], [3, 4, 5, 3], [3, 6, 7, 8]]  # 13 tokens -> 3 windows, tail dropped


def test_ptb_sentences_are_joined_with_single_spaces_then_windowed(tmp_path):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "test.txt").write_text(" the cat <unk> \n sat on N mats \n the end \n")
    tok = WordTokenizer()
    assert load_text("ptb", "test", tmp_path) == "the cat <unk> sat on N mats the end"
    w = eval_windows(tok, "ptb", seqlen=3, directory=tmp_path)
    # the=0 cat=1 <unk>=2 sat=3 on=4 N=5 mats=6 end=7: 9 tokens, no newline token survives the join
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 0, 7]]
    assert eval_windows(tok, "ptb", 3, max_windows=2, directory=tmp_path).tolist() == [[0, 1, 2], [6, 0, 7]]


def _c4_shard(path, documents):
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wt") as handle:
        for text in documents:
            handle.write(json.dumps({"text": text, "url": "x"}) + "\n")


def test_c4_windows_come_from_documents_longer_than_seqlen(tmp_path):
    # one document of seqlen+1 tokens is the only one long enough: each of the 256 windows is its first 4 tokens
    _c4_shard(tmp_path / "c4" / "c4-validation.00000-of-00008.json.gz", ["x y", "p q r s t", "u v w", "z"])
    tok = WordTokenizer()
    w = eval_windows(tok, "c4", seqlen=4, directory=tmp_path)
    assert w.shape == (C4_WINDOWS, 4)
    p, q, r, s = (tok.vocab[t] for t in "pqrs")
    assert all(row == [p, q, r, s] for row in w.tolist())


def test_c4_sampling_matches_the_gptq_loop(tmp_path):
    docs = [" ".join(f"w{d}_{i}" for i in range(3 + 2 * d)) for d in range(12)]
    shard = tmp_path / "c4-validation.00000-of-00008.json.gz"
    _c4_shard(shard, docs)
    tok = WordTokenizer()
    w = eval_windows(tok, str(shard), seqlen=8)  # a path to the shard: the C4 protocol too
    random.seed(0)  # GPTQ's datautils, written out: random doc until long enough, then a random offset
    expected = []
    for _ in range(C4_WINDOWS):
        while True:
            ids = tok.ids(docs[random.randint(0, len(docs) - 1)])
            if len(ids) > 8:
                break
        start = random.randint(0, len(ids) - 8 - 1)
        expected.append(ids[start : start + 8])
    assert w.tolist() == expected
    assert eval_windows(tok, str(shard), 8, max_windows=3).tolist() == [expected[0], expected[128], expected[255]]


def test_c4_new_joins_the_first_documents_with_spaces(tmp_path):
    _c4_shard(tmp_path / "c4-validation.00000-of-00008.json", ["a b", "c d e", "f"])
    tok = WordTokenizer()
    assert eval_windows(tok, "c4-new", seqlen=2, directory=tmp_path).tolist() == [[0, 1], [2, 3], [4, 5]]


def test_missing_c4_is_a_skippable_one_line_error(tmp_path):
    with pytest.raises(CorpusUnavailable, match=r"corpus c4/validation not available: put it at .*c4-validation"):
        eval_windows(WordTokenizer(), "c4", 8, directory=tmp_path)
    assert issubclass(CorpusUnavailable, BitallocError)


def test_document_corpora_calibrate_by_sampling_documents(tmp_path):
    rows = [{"text": " ".join(f"t{i}" for i in range(n))} for n in (3, 40, 5, 60)]
    (tmp_path / "pileval").mkdir()
    (tmp_path / "pileval" / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tok = WordTokenizer()
    a = calibration_ids(tok, "pileval", nsamples=6, seqlen=16, seed=0, directory=tmp_path)
    b = calibration_ids(tok, "pileval", nsamples=6, seqlen=16, seed=1, directory=tmp_path)
    assert a.shape == (6, 16) and not torch.equal(a, b)
    assert all(row == list(range(row[0], row[0] + 16)) for row in a.tolist())  # contiguous slices of one document
    _c4_shard(tmp_path / "c4" / "c4-train.00000-of-01024.json.gz", [r["text"] for r in rows])
    assert calibration_ids(tok, "c4", 2, 16, seed=0, directory=tmp_path).shape == (2, 16)


def test_seqlen_defaults_to_the_context_capped_at_2048():
    from transformers import GPT2Config, LlamaConfig

    class Fake:
        def __init__(self, config):
            self.config = config

    assert default_seqlen(Fake(LlamaConfig(max_position_embeddings=8192))) == 2048
    assert default_seqlen(Fake(GPT2Config(n_positions=1024))) == 1024
