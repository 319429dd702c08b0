"""Save a quantized model as safetensors plus configs; load it back without quantizing again.

A saved directory (written whole or not at all, `atomic.atomic_dir`) holds:

    model.safetensors   every tensor of the model: the packed layers' stored tensors
                        (exactly `kernels/layout.py`'s, so their bytes are the cost
                        model's) and the rest of the model in its own dtype
    config.json         the Hugging Face config the architecture is rebuilt from
    bitalloc.json       format, version, per-layer option/shape/backend, byte counts,
                        and where the model came from (spec, fingerprint, plan)
    tokenizer files     when the model had a tokenizer

`load` rebuilds the architecture from config.json, swaps in empty QuantLinear
shells of the recorded options, and fills every tensor from the file.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model as load_tensors
from safetensors.torch import save_model as save_tensors

from . import atomic
from .blocks import replace_module
from .errors import BitallocError
from .fuse import four_tokens, fuse_packed
from .kernels.quant_linear import QuantLinear
from .models import LoadedModel, fingerprint_path
from .quant.option import parse

log = logging.getLogger(__name__)

FORMAT = "bitalloc-model"
VERSION = 1
TENSORS = "model.safetensors"
META = "bitalloc.json"


def quant_layers(model: torch.nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def layer_record(layer: QuantLinear) -> dict:
    return {"option": str(layer.option), "in_features": layer.in_features, "out_features": layer.out_features,
            "bias": layer.bias is not None, "act_scale": layer.act_scale is not None, "backend": layer.backend}


def check_target(directory) -> Path:
    """The directory a save may replace: new, empty, or an earlier save; anything else holds the user's files
    (a run directory, a model) that the whole-directory swap would delete.  Returns it resolved."""
    path = Path(directory).resolve()
    if path.exists() and not path.is_dir():
        raise BitallocError(f"cannot save to {directory}: it is a file")
    if path.is_dir() and any(path.iterdir()) and not (path / META).is_file():
        raise BitallocError(f"cannot save to {directory}: it holds other files and is not a saved bitalloc model "
                            f"(no {META}); choose a new or empty directory")
    if path.parent == path:
        raise BitallocError(f"cannot save to {directory}: a filesystem root")
    return path


def save(loaded: LoadedModel, directory, plan: str | None = None) -> dict:
    """Write `loaded` (after `quantize_model`) to `directory`, replacing an earlier save there; returns the
    metadata written."""
    directory = check_target(directory)
    model = loaded.model
    layers = quant_layers(model)
    if not layers:
        raise BitallocError("nothing to save: the model has no quantized layers (run quantize_model first)")
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    meta = {"format": FORMAT, "version": VERSION, "source": loaded.spec, "source_fingerprint": loaded.fingerprint,
            "plan": plan, "dtype": str(floats[0] if floats else torch.float32).removeprefix("torch."),
            "layers": {name: layer_record(m) for name, m in layers.items()}}
    with atomic.atomic_dir(directory) as tmp:
        save_tensors(model, str(tmp / TENSORS))
        model.config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        meta["bytes"] = saved_bytes(tmp, layers)
        atomic.write_json(tmp / META, meta)
    log.debug("saved %d packed layers to %s (%d tensor bytes)", len(layers), directory, meta["bytes"]["total"])
    return meta


def saved_bytes(directory, layers) -> dict:
    """Bytes of the tensors in the saved file: the packed layers', the rest's, and the total."""
    prefixes = tuple(f"{name}." for name in layers)
    total = linears = 0
    with safe_open(str(Path(directory) / TENSORS), framework="pt") as handle:
        for key in handle.keys():
            piece = handle.get_slice(key)
            count = 1
            for size in piece.get_shape():
                count *= size
            size = count * _DTYPE_BYTES[piece.get_dtype()]
            total += size
            linears += size if key.startswith(prefixes) else 0
    return {"linears": linears, "other": total - linears, "total": total}


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_meta(directory) -> dict:
    path = Path(directory) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise BitallocError(f"{directory} is not a saved bitalloc model (no {META})") from None
    except json.JSONDecodeError as err:
        raise BitallocError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise BitallocError(f"{path}: expected format '{FORMAT}' version {VERSION}")
    return meta


def load(directory, device="cpu", backend: str | None = None, fuse: bool = False) -> LoadedModel:
    """Rebuild a saved model; `backend` overrides the saved per-layer backends ("auto" picks per layer);
    `fuse` stacks the packed layers that read one input and share an option into one (`bitalloc.fuse`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    meta = read_meta(directory)
    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, meta.get("dtype", "float32")))
    for name, record in meta["layers"].items():
        shell = QuantLinear(parse(record["option"]), record["in_features"], record["out_features"],
                            record["bias"], record["act_scale"], record["backend"])
        try:
            replace_module(model, name, shell)
        except AttributeError:
            raise BitallocError(f"{directory}: layer {name} does not exist in the rebuilt model") from None
    missing, unexpected = load_tensors(model, str(directory / TENSORS), strict=False)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise BitallocError(f"{directory / TENSORS} does not match its config ({what})")
    model.eval().to(device)
    for layer in quant_layers(model).values():
        layer.set_backend(backend or layer.backend)
    if fuse:
        with torch.no_grad():
            fuse_packed(model, four_tokens(model))
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory)
    return LoadedModel(model, tokenizer, str(directory), fingerprint_path(directory / TENSORS))
