"""A quantization option: plain data with a short, stable string form.

    rtn:int4:g64:asym          RTN, 4-bit integers, groups of 64 input columns, zero point
    gptq:int3:g128:sym         GPTQ, 3-bit symmetric
    rtn:nf4:g64                NF4 codebook with group scales
    rtn:int8:pc:sym:a8         per-output-channel INT8 weights, INT8 per-token activations
    rtn:int4:g64:asym:afp8     FP8 (E4M3) per-token activations; afp8e5m2 for E5M2
    rtn:int8:pc:sym:a8:outliers=16   16 input channels kept in float16 (MixQ-style)
    gptq:int4:g64:asym:damp=0.01   method parameters as key=value
    fp16                       keep the layer unquantized

The string is what plans, tables and caches store; `parse` is its inverse.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import BitallocError

UNQUANTIZED = "fp16"
_FORMAT_RE = re.compile(r"^(int)([2-8])$|^(fp8e4m3|fp8e5m2|fp4|nf4)$")
FLOAT_FORMAT_BITS = {"fp8e4m3": 8, "fp8e5m2": 8, "fp4": 4, "nf4": 4}
ACT_BITS = (4, 8, 16)
ACT_FORMATS = {"afp8": "fp8e4m3", "afp8e4m3": "fp8e4m3", "afp8e5m2": "fp8e5m2"}


@dataclass(frozen=True, order=True)
class Option:
    method: str = "rtn"
    fmt: str = "int"
    bits: int = 4
    group_size: int = 64  # 0 means one group per output row (per-channel)
    sym: bool = False
    act_bits: int = 16  # 16 = activations stay in floating point
    params: tuple[tuple[str, str], ...] = field(default=())
    act_fmt: str = "int"  # activation format when act_bits < 16: int, fp8e4m3 or fp8e5m2

    @property
    def quantized(self) -> bool:
        return self.method != "none"

    @property
    def format_name(self) -> str:
        return f"int{self.bits}" if self.fmt == "int" else self.fmt

    def param(self, key: str, default=None, cast=str):
        for k, v in self.params:
            if k == key:
                try:
                    return cast(v)
                except ValueError:
                    raise BitallocError(f"option '{self}': parameter {key}={v} is not a valid {cast.__name__}") from None
        return default

    def __str__(self) -> str:
        if not self.quantized:
            return UNQUANTIZED
        parts = [self.method, self.format_name, f"g{self.group_size}" if self.group_size else "pc"]
        if self.fmt == "int":
            parts.append("sym" if self.sym else "asym")
        if self.act_fmt == "fp8e4m3":
            parts.append("afp8")
        elif self.act_fmt != "int":
            parts.append(f"a{self.act_fmt}")
        elif self.act_bits != 16:
            parts.append(f"a{self.act_bits}")
        parts += [f"{k}={v}" for k, v in self.params]
        return ":".join(parts)


FP16 = Option(method="none", fmt="fp16", bits=16, group_size=0, sym=True)


def parse(text: str) -> Option:
    """Inverse of str(Option); raises BitallocError naming what is wrong."""
    if not isinstance(text, str):
        raise BitallocError(f"option must be a string like 'rtn:int4:g64:asym', got {type(text).__name__}")
    text = text.strip()
    if text == UNQUANTIZED:
        return FP16
    parts = text.split(":")
    if len(parts) < 3:
        raise BitallocError(f"option '{text}' is not of the form method:format:group[:sym|asym][:aN][:key=value]")
    method, fmt_token, group_token, *rest = parts
    if not re.fullmatch(r"[a-z][a-z0-9_]*", method) or method == "none":
        raise BitallocError(f"option '{text}': bad method name '{method}'")
    match = _FORMAT_RE.match(fmt_token)
    if not match:
        raise BitallocError(
            f"option '{text}': unsupported format '{fmt_token}' (int2..int8, fp8e4m3, fp8e5m2, fp4, nf4)"
        )
    if match.group(1):
        fmt, bits = "int", int(match.group(2))
    else:
        fmt, bits = fmt_token, FLOAT_FORMAT_BITS[fmt_token]
    if group_token == "pc":
        group = 0
    elif re.fullmatch(r"g[1-9][0-9]{0,5}", group_token):
        group = int(group_token[1:])
    else:
        raise BitallocError(f"option '{text}': group must be gN (N >= 1) or pc, got '{group_token}'")
    sym = fmt != "int"
    act_bits, act_fmt = 16, "int"
    params = []
    given = set()  # symmetry and activations may each be said once
    for token in rest:
        kind = ("symmetry" if token in ("sym", "asym") else
                "activations" if token in ACT_FORMATS or re.fullmatch(r"a[0-9]+", token) else None)
        if kind is not None and kind in given:
            raise BitallocError(f"option '{text}': {kind} given twice")
        given.add(kind)
        if token in ("sym", "asym") and fmt == "int":
            sym = token == "sym"
        elif token in ACT_FORMATS:
            act_bits, act_fmt = 8, ACT_FORMATS[token]
        elif re.fullmatch(r"a[0-9]+", token):
            act_bits = int(token[1:])
            if act_bits not in ACT_BITS:
                raise BitallocError(f"option '{text}': activation bits must be one of {ACT_BITS}")
        elif re.fullmatch(r"[a-z_][a-z0-9_]*=[A-Za-z0-9_.+-]+", token):
            params.append(tuple(token.split("=", 1)))
        else:
            raise BitallocError(f"option '{text}': cannot read '{token}'")
    keys = [k for k, _ in params]
    if len(set(keys)) != len(keys):
        raise BitallocError(f"option '{text}': a parameter is given twice")
    return Option(method, fmt, bits, group, sym, act_bits, tuple(sorted(params)), act_fmt)
