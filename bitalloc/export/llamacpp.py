"""A plan as a llama-quantize `--tensor-type-file`: one `regex=ggml_type` per planned GGUF tensor.

llama-quantize lower-cases each pattern, searches it in every tensor name (`blk.3.ffn_down.weight`)
and gives the first match the named type; entries are separated by whitespace.  Names come from
the gguf package's HF -> GGUF tensor map for the model's architecture; each pattern is anchored to
exactly one tensor.  With a GGUF file at hand, every name is checked against its tensor list.

Bits map to ggml types by width only (ggml's blocks fix their own group sizes and scales):
2 -> q2_K, 3 -> q3_K, 4 -> q4_K, 5 -> q5_K, 6 -> q6_K, 8 -> q8_0, fp16 -> f16.  K-quants need rows
that are a multiple of 256 columns; for other rows the narrowest type of at least the planned bits
whose 32-column block fits is used (4 -> q4_0, 5 -> q5_0, 2/3/6/7 -> a wider type).  Storing a
tensor with more bits than planned is refused unless `allow_wider` is set, and always listed.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import BitallocError
from . import ExportInput, register_exporter

# (ggml type, nominal bits, columns per block), narrowest first
GGML_TYPES = (("q2_K", 2, 256), ("q3_K", 3, 256), ("q4_K", 4, 256), ("q4_0", 4, 32), ("q5_K", 5, 256),
              ("q5_0", 5, 32), ("q6_K", 6, 256), ("q8_0", 8, 32), ("f16", 16, 1))
ARCH_ALIASES = {"mistral": "llama"}  # transformers model_type -> llama.cpp architecture where they differ


def ggml_type(bits: int, columns: int) -> tuple[str, int]:
    """The narrowest ggml type with at least `bits` whose block divides the row: (name, its bits)."""
    return next((name, width) for name, width, block in GGML_TYPES if width >= bits and columns % block == 0)


def gguf_names(model_type: str, blocks: int):
    """A function HF layer name -> GGUF tensor name (without '.weight') for this architecture."""
    import gguf

    arch_name = ARCH_ALIASES.get(model_type, model_type)
    arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name), None)
    if arch is None:
        raise BitallocError(f"llama.cpp has no architecture '{model_type}'; there is no GGUF tensor naming for it")
    mapping = gguf.get_tensor_name_map(arch, blocks)

    def name_of(layer: str) -> str:
        name = mapping.get_name(layer)
        if name is None:
            raise BitallocError(f"layer {layer} has no GGUF tensor name in llama.cpp's '{arch_name}' layout")
        return name

    return name_of


def gguf_tensors(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape as torch writes it ([rows, columns]; GGUF lists the innermost dimension first)."""
    from gguf import GGUFReader

    try:
        return {tensor.name: tuple(int(n) for n in reversed(tensor.shape.tolist()))
                for tensor in GGUFReader(str(path)).tensors}
    except (OSError, ValueError) as err:
        raise BitallocError(f"cannot read GGUF file {path}: {err}") from None


def check_against_gguf(entries: list[tuple[str, str]], shapes: dict[str, tuple[int, int]], path: Path) -> None:
    """The plan's tensors are the GGUF's block matrices, name for name and shape for shape: a plan of another
    model (fewer blocks, other widths) would otherwise leave tensors at llama-quantize's default type."""
    present = gguf_tensors(path)
    missing = [tensor for tensor, _ in entries if tensor not in present]
    if missing:
        raise BitallocError(f"tensor {missing[0]} (and {len(missing) - 1} more) is not in {path}")
    for tensor, _ in entries:
        if present[tensor] != shapes[tensor]:
            raise BitallocError(f"tensor {tensor} is {'x'.join(map(str, present[tensor]))} in {path}, but the "
                                f"plan's layer is {'x'.join(map(str, shapes[tensor]))}: the plan is for another model")
    planned = {tensor for tensor, _ in entries}
    uncovered = [name for name, shape in present.items()
                 if name.startswith("blk.") and len(shape) == 2 and name not in planned]
    if uncovered:
        raise BitallocError(f"{path} has {len(uncovered)} block matrices the plan does not cover, e.g. {uncovered[0]}: "
                            "the plan is for another model")


def wider_notes(wider: list[tuple[str, int, int, str]]) -> list[str]:
    """One line per kind of widening (row width, planned bits, GGML type), with its count and an example."""
    kinds: dict[tuple[int, int, str], list[str]] = {}
    for tensor, columns, bits, chosen in wider:
        kinds.setdefault((columns, bits, chosen), []).append(tensor)
    return [f"wider than planned: {len(tensors)} tensor{'s' * (len(tensors) != 1)} of {columns} columns, "
            f"{bits} bits -> {chosen} (e.g. {tensors[0]})" for (columns, bits, chosen), tensors in kinds.items()]


@register_exporter("llamacpp")
def export_llamacpp(data: ExportInput, allow_wider: bool = False) -> tuple[str, list[str]]:
    """--tensor-type-file text, and notes (including every tensor stored wider than planned)."""
    name_of = gguf_names(data.model_type, data.blocks)
    entries, wider, shapes = [], [], {}
    for layer, option in data.assignment.items():
        tensor = f"{name_of(layer)}.weight"
        shapes[tensor] = (data.shapes[layer].out_features, data.shapes[layer].in_features)
        bits = option.bits if option.quantized else 16
        columns = data.shapes[layer].in_features
        chosen, width = ggml_type(bits, columns)
        if width > bits:
            wider.append((tensor, columns, bits, chosen))
        entries.append((tensor, chosen))
    if wider and not allow_wider:
        tensor, columns, bits, chosen = wider[0]
        raise BitallocError(f"{len(wider)} tensors need more bits in llama.cpp than the plan gives, e.g. {tensor} "
                            f"({columns} columns): {bits} bits -> {chosen} "
                            f"(K-quants need rows of a multiple of 256); pass --allow-wider to accept that")
    notes = [f"{len(entries)} tensor types; unlisted tensors (embeddings, output) follow llama-quantize's type argument"]
    if data.gguf is not None:
        check_against_gguf(entries, shapes, data.gguf)
        notes.append(f"all {len(entries)} tensor names and shapes checked against {data.gguf}")
    notes += wider_notes(wider)
    text = "".join(f"^{re.escape(tensor)}$={chosen}\n" for tensor, chosen in entries)
    return text, notes
