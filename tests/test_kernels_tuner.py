"""The launch tuner's bookkeeping (timing itself needs a GPU: tests/test_kernels_gpu.py)."""
import json

from bitalloc.kernels import tuner


def test_untuned_choice_is_the_first_and_is_reported_as_plain_data(monkeypatch):
    monkeypatch.setenv("BITALLOC_TRITON_TUNE", "0")
    monkeypatch.setattr(tuner, "CHOSEN", {})
    key = ("triton", 4, 128, True, (4096, 512), 1, "torch.float16")
    ran = []
    assert tuner.choose(key, [("gemv-mma", (8, 1, 4, 2)), ("gemv-pairs", (4, 4, 1, 2))], ran.append) == \
        ("gemv-mma", (8, 1, 4, 2))
    assert ran == []  # nothing is timed without tuning
    assert tuner.choose(key, [("gemv-pairs", (4, 4, 1, 2))], ran.append) == ("gemv-mma", (8, 1, 4, 2))  # kept
    made = tuner.choices_made()
    assert made == {"triton 4 128 True (4096, 512) 1 torch.float16": "('gemv-mma', (8, 1, 4, 2))"}
    assert json.loads(json.dumps(made)) == made
