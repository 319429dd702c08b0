"""Checks made before a model is loaded: its weights come in a safe format, and they fit.

Safe: weights are read from safetensors or GGUF files only.  A `.bin`/`.pt`
checkpoint is a pickle, and unpickling a file runs whatever code it names, so a
model directory that has only those is refused, not loaded.

Fit: the weights' size is read from the files' headers (no tensor is loaded)
and compared with the memory the CPU and the requested device have free, so a
model that cannot fit stops with the bytes it needs before hours of work, not
with an out-of-memory kill in the middle.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from .errors import BitallocError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LOAD_DTYPE_BYTES = 4  # load_model reads weights as float32
# apply and search hold the unquantized weights and the quantized copy being built (dequantized by the
# reference backend) at once
WORKING_COPIES = 2


def require_safe_weights(path: Path) -> None:
    """Refuse a model directory whose weights exist only as pickles."""
    if not path.is_dir():
        return
    files = [p for p in path.iterdir() if p.is_file()]
    if any(p.suffix in (".safetensors", ".gguf") for p in files):
        return
    pickles = sorted(p.name for p in files if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise BitallocError(f"model directory {path} has weights only as pickle files ({pickles[0]}); bitalloc "
                            f"loads safetensors or GGUF only, because unpickling runs code: convert it with "
                            f"transformers' save_pretrained(safe_serialization=True) where you trust the file")


def _gguf_elements(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)


def _safetensors_elements(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return total


def weight_bytes(spec: str) -> int | None:
    """Bytes of the model's weights once loaded (float32), read from file headers; None if unknown here."""
    from .models import locate  # models imports this module

    path = locate(spec).path
    if path is None:
        return None
    try:
        elements = _gguf_elements(path) if path.suffix == ".gguf" else _safetensors_elements(path)
    except Exception as err:  # an unreadable header is reported by the loader itself, more precisely
        log.debug("cannot size %s from its headers: %s", path, err)
        return None
    return elements * LOAD_DTYPE_BYTES or None


def available_bytes(device: torch.device) -> int | None:
    """Free memory of a device: MemAvailable for the CPU, the CUDA allocator's view for a GPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB ({n} bytes)"


def check_fits(spec: str, device: torch.device) -> None:
    """Raise before loading when the model's working set exceeds free CPU memory or free device memory."""
    weights = weight_bytes(spec)
    if weights is None:
        return
    needed = WORKING_COPIES * weights
    for where in dict.fromkeys([torch.device("cpu"), device]):
        free = available_bytes(where)
        if free is not None and needed > free:
            raise BitallocError(f"model {spec} needs about {_gib(needed)} of {where} memory ({WORKING_COPIES} copies "
                                f"of {_gib(weights)} of float32 weights), but {where} has {_gib(free)} free")
