"""Shared fixtures: tiny random models built from configs, a tiny corpus and a tokenizer made offline."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = ("the of and to in a is was for on as by with he she it that from at his her an were are which this "
         "be or has had first new two after their one its year city river music film game team season war "
         "album song school church station island village league club party state county series north south").split()


@pytest.fixture(autouse=True)
def _no_tuner_cache(monkeypatch):
    """No test reads or writes the user's tuner cache (tests/test_kernels_tuner.py points it at a temp file)."""
    monkeypatch.setenv("BITALLOC_TUNER_CACHE", "off")


def make_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    sentences, words = [], 0
    while words < n_words:
        length = rng.randint(5, 14)
        sentence = " ".join(rng.choice(WORDS) for _ in range(length))
        sentences.append(sentence.capitalize() + ".")
        words += length
    paragraphs = [" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6)]
    return "\n\n".join(paragraphs)


def make_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab_size=320, hidden=96, layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=160, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tiny_opt(vocab_size=320, seed=0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=vocab_size, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)
    return OPTForCausalLM(config).eval()


def tiny_gpt2(vocab_size=320, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A data directory with the layout of shared/data, filled with generated text."""
    root = tmp_path_factory.mktemp("data")
    for rel, seed, words in (("wikitext2/test.txt", 1, 6000), ("calib/wiki.txt", 2, 8000),
                             ("ptb/test.txt", 3, 3000), ("ptb/train.txt", 4, 3000)):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(make_text(words, seed))
    return root


@pytest.fixture(scope="session")
def tokenizer(corpus_dir):
    return make_tokenizer([(corpus_dir / "calib/wiki.txt").read_text()])


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama saved as a Hugging Face directory (safetensors + tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def cli_env(monkeypatch, tmp_path, corpus_dir):
    """Isolated cache and data directory for command-line tests."""
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BITALLOC_DATA", str(corpus_dir))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def offline_hub(monkeypatch):
    """No hub for `datasets` or lm-eval: corpora and tasks must come from local files (fails at once)."""
    from bitalloc import data

    data.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    data.hub_reachable.cache_clear()


def run_cli(main, argv, capsys):
    """Run a CLI main in-process; returns (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code or 0, captured.out, captured.err


def requires_default_model():
    from bitalloc.errors import BitallocError
    from bitalloc.models import embedded_path

    try:
        embedded_path("smollm2-135m")
    except BitallocError as err:
        return pytest.mark.skip(reason=str(err))
    if not SHARED_DATA.is_dir():
        return pytest.mark.skip(reason=f"shared data not found at {SHARED_DATA}")
    return pytest.mark.slow


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for servers and rendezvous a test starts)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def all_files(root: Path) -> set[Path]:
    return {p for p in Path(root).rglob("*") if p.is_file()}


def load_script(relative: str):
    """A script of the repo (scripts/, inference/: no packages) as a module of its own name-spaced name, so
    that an installed package of the same name (`kernels`, which transformers requires) never shadows it."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(f"repo_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
