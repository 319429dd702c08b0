"""Where decoder-block weights wait between uses, so only one block need be on the accelerator.

`InMemory` keeps every block in host memory and moves one at a time to the
device.  `LazySafetensors` serves models larger than host memory: the model is
built with empty parameters, everything outside the blocks (embeddings, final
norm, head) is read at once, and each block's tensors are read from the
safetensors shards when the block is needed and dropped afterwards.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from .errors import BitallocError
from .models import LoadedModel, find_blocks, fingerprint_path

log = logging.getLogger(__name__)


class InMemory:
    """Blocks live in host memory; `load` moves one to the device, `release` moves it back."""

    def load(self, index: int, block: nn.Module, device) -> nn.Module:
        return block.to(device)

    def release(self, index: int, block: nn.Module) -> None:
        block.to("cpu")


def shard_index(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    index_file = directory / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise BitallocError(f"{directory} has no model.safetensors or model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as handle:
        return {name: single for name in handle.keys()}


def _read(files: dict[str, Path], names: list[str], device, dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for file, wanted in by_file.items():
        with safe_open(str(file), "pt", device="cpu") as handle:
            for name in wanted:
                tensor = handle.get_tensor(name)
                tensors[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    return tensors


def _checkpoint_name(files: dict[str, Path], name: str) -> str:
    """Parameter name as stored: checkpoints differ on whether the base-model prefix is kept."""
    if name in files:
        return name
    for candidate in (name.split(".", 1)[-1], f"model.{name}"):
        if candidate in files:
            return candidate
    raise BitallocError(f"tensor {name} is in the model but not in its safetensors shards")


class LazySafetensors:
    """Block weights read from the shards on demand (see module docstring)."""

    def __init__(self, directory: Path, model: nn.Module, dtype: torch.dtype):
        self.files = shard_index(directory)
        self.dtype = dtype
        self.prefix, _ = find_blocks(model)

    def load(self, index: int, block: nn.Module, device) -> nn.Module:
        names = {n: _checkpoint_name(self.files, f"{self.prefix}.{index}.{n}") for n, _ in block.named_parameters()}
        tensors = _read(self.files, list(names.values()), device, self.dtype)
        block.load_state_dict({n: tensors[c] for n, c in names.items()}, strict=False, assign=True)
        for param in block.parameters():
            param.requires_grad_(False)
        return block

    def release(self, index: int, block: nn.Module) -> None:
        block.to("meta")


def load_lazy(directory: str | Path, dtype: torch.dtype = torch.float32) -> tuple[LoadedModel, LazySafetensors]:
    """A Hugging Face directory with empty blocks, plus the source that fills them one at a time."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise BitallocError(f"lazy loading needs a Hugging Face directory with config.json, got {directory}")
    config = AutoConfig.from_pretrained(directory)
    config.use_cache = False
    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    source = LazySafetensors(directory, model, dtype)
    outside = [n for n, _ in model.named_parameters() if not n.startswith(source.prefix + ".")]
    names = {n: _checkpoint_name(source.files, n) for n in outside if n in source.files or not _tied(model, n)}
    tensors = _read(source.files, list(dict.fromkeys(names.values())), "cpu", dtype)
    model.load_state_dict({n: tensors[c] for n, c in names.items()}, strict=False, assign=True)
    model.tie_weights()
    for param in model.parameters():
        param.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(directory) if (directory / "tokenizer_config.json").is_file() else None
    log.info("lazy model %s: blocks are read from %d shard file(s) when needed", directory,
             len(set(source.files.values())))
    return LoadedModel(model, tokenizer, str(directory), fingerprint_path(directory)), source


def _tied(model: nn.Module, name: str) -> bool:
    """The output head tied to the input embeddings is not stored separately."""
    head = model.get_output_embeddings()
    return head is not None and model.config.tie_word_embeddings and name.startswith(
        next(n for n, m in model.named_modules() if m is head))
