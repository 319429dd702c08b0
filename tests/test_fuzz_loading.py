"""Hostile or oversized model inputs: pickle checkpoints are refused without being unpickled, the code
base loads nothing unsafely, and a model that will not fit stops before loading with the bytes it needs."""
import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from bitalloc import apply, preflight
from bitalloc.errors import BitallocError
from bitalloc.models import _from_pretrained, load_model
from conftest import all_files, run_cli, tiny_llama

REPO = Path(__file__).resolve().parents[1]
UNSAFE = [
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"\b(c?pickle|dill|joblib|marshal)\.loads?\("), "unpickling"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy pickle loading"),
    (re.compile(r"trust_remote_code\s*=\s*True"), "running a model repository's code"),
    (re.compile(r"use_safetensors\s*=\s*False"), "pickle checkpoints through transformers"),
]


class Trap:
    """Unpickling this creates a file: proof that a loader ran code from the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def pickle_dir(tmp_path, tokenizer):
    path = tmp_path / "pickled"
    tiny_llama(vocab_size=len(tokenizer)).config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Trap(tmp_path / "owned")}))
    return path


def test_pickle_checkpoints_are_refused_unopened(pickle_dir, tmp_path):
    with pytest.raises(BitallocError, match="weights only as pickle files \\(pytorch_model.bin\\)"):
        load_model(str(pickle_dir))
    with pytest.raises(OSError):  # transformers itself is told to accept safetensors only
        _from_pretrained(str(pickle_dir), None, torch.float32)
    assert not (tmp_path / "owned").exists()


def test_no_unsafe_loader_in_the_code_base():
    sources = [p for d in ("bitalloc", "scripts", "inference", "flops", "search") for p in (REPO / d).rglob("*.py")]
    found = [f"{p.relative_to(REPO)}:{n}: {why}" for p in sources
             for n, line in enumerate(p.read_text().splitlines(), 1) for rx, why in UNSAFE if rx.search(line)]
    assert not found, found


def test_weight_bytes_come_from_headers_without_loading(tiny_dir):
    params = sum(p.numel() for p in load_model(str(tiny_dir)).model.parameters())
    assert preflight.weight_bytes(str(tiny_dir)) == 4 * params
    assert preflight.weight_bytes("org/not-downloaded") is None


def test_a_model_too_big_for_memory_stops_before_loading(tiny_dir, cli_env, capsys, monkeypatch):
    needed = 2 * preflight.weight_bytes(str(tiny_dir))
    monkeypatch.setattr(preflight, "available_bytes", lambda device: needed - 1)
    monkeypatch.setattr(apply, "load_model", lambda spec: pytest.fail("loaded a model that cannot fit"))
    plan = cli_env / "plan.json"
    plan.write_text(json.dumps({"format": "bitalloc-plan", "version": 1, "model": str(tiny_dir), "layers": {}}))
    before = all_files(cli_env)
    code, _, err = run_cli(apply.main, ["--plan", str(plan), "--quiet", "--json", "out.json"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: model ")
    assert f"needs about 0.00 GiB ({needed} bytes) of cpu memory" in err and f"({needed - 1} bytes) free" in err
    assert all_files(cli_env) == before


def test_a_model_that_fits_passes(tiny_dir):
    preflight.check_fits(str(tiny_dir), torch.device("cpu"))  # a few MB against this machine's GiBs
