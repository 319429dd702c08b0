"""lm-evaluation-harness through its Python API on a tiny model: local tasks offline, unreachable data in one line."""
import json
import logging

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.harness import read_local_task, run_tasks
from bitalloc.models import from_module
from conftest import tiny_llama

pytest.importorskip("lm_eval")

QUESTIONS = [
    ("The river", ["is long", "city of", "north song"], 0),
    ("A team of the", ["season", "was and", "island"], 0),
    ("She was in the", ["village", "of a", "film"], 2),
    ("The first album", ["song", "is the", "party"], 1),
    ("His church and", ["school", "station", "league"], 1),
    ("The war was", ["in the", "north", "club"], 0),
]


@pytest.fixture(autouse=True)
def offline(offline_hub):
    yield


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "tiny_mc.jsonl"
    path.write_text("\n".join(json.dumps({"query": q, "choices": c, "gold": g}) for q, c, g in QUESTIONS))
    return path


@torch.no_grad()
def direct_accuracy(model, tokenizer) -> float:
    """Accuracy computed without lm-eval: the choice with the highest log-likelihood after the query."""
    right = 0
    for query, choices, gold in QUESTIONS:
        scores = []
        for choice in choices:
            context = tokenizer(query)["input_ids"]
            whole = tokenizer(f"{query} {choice}")["input_ids"]
            logprobs = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        right += max(range(len(choices)), key=scores.__getitem__) == gold
    return right / len(QUESTIONS)


def test_local_task_runs_offline_and_matches_a_direct_computation(task_file, tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer))
    result = run_tasks(from_module(model, tokenizer), [], [str(task_file)], num_fewshot=0, batch_size=2)
    task = result["tasks"]["local_tiny_mc"]
    assert result["unavailable"] == {}
    assert task["samples"] == len(QUESTIONS) and task["num_fewshot"] == 0
    assert task["metrics"]["acc"]["value"] == pytest.approx(direct_accuracy(model, tokenizer))
    assert 0 <= task["metrics"]["acc_norm"]["value"] <= 1


def test_unreachable_task_data_is_one_line_and_the_rest_still_runs(task_file, tokenizer, tmp_path, caplog):
    remote = tmp_path / "remote_demo.yaml"
    remote.write_text("task: remote_demo\ndataset_path: no-such-org/no-such-dataset\ntest_split: test\n"
                      "output_type: multiple_choice\ndoc_to_text: '{{query}}'\ndoc_to_choice: '{{choices}}'\n"
                      "doc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n")
    model = tiny_llama(vocab_size=len(tokenizer))
    with caplog.at_level(logging.WARNING, logger="bitalloc.harness"):
        result = run_tasks(from_module(model, tokenizer), [], [str(remote), str(task_file)], num_fewshot=1,
                           limit=3)
    assert list(result["unavailable"]) == ["remote_demo"]
    lines = [r.getMessage() for r in caplog.records if r.name == "bitalloc.harness"]
    assert len(lines) == 1 and "remote_demo" in lines[0] and "cannot be reached" in lines[0]
    assert "\n" not in lines[0]
    assert result["tasks"]["local_tiny_mc"]["num_fewshot"] == 1
    assert result["tasks"]["local_tiny_mc"]["samples"] == 3


@pytest.mark.parametrize("row, message", [
    ({"query": "q", "choices": ["a"], "gold": 0}, "expected"),
    ({"query": "q", "choices": ["a", "b"], "gold": 2}, "'gold' must index 'choices'"),
])
def test_bad_local_task_rows_are_named(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"query": "fine", "choices": ["a", "b"], "answer": "b"}) + "\n" + json.dumps(row))
    with pytest.raises(BitallocError, match=f"bad.jsonl:2: {message}"):
        read_local_task(path)
