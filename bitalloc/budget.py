"""Budgets as users write them, resolved against the model's layers.

    4.5, 4.5bits              average bits per quantizable weight, scales and zeros included, biases not (kind bytes)
    60MB, 57MiB, 123456B      bytes of the quantized linears (B, kB, MB, GB, TB; KiB, MiB, GiB, TiB)
    12GBOPs, 3.5e9BOPs        bit operations of the decoder linears per token, the sum of
                              bits_w x bits_a x MACs (prefixes k, M, G, T, decimal)     (kind bops)
    3ms, 250us, 0.004s        summed latency of the decoder linears, from a latency
                              table (--latency-table; schema in bitalloc.cost)          (kind latency)
    rtn:int3:g64:asym         the bytes of that option applied to every layer
    rtn:int3:g64:asym@bops    the BOPs (@latency: the latency, @bytes: the bytes) of that option everywhere

Units and prefixes are case-insensitive.  FLOPs and MACs are not budgets: every
option multiplies the same matrices, so they cannot steer the allocation.  The
plan's bytes are always computed and reported, whatever the budget's kind.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from .cost import LatencyLookup, LatencyTable, LayerShape, bias_bytes, layer_bops, layer_bytes
from .errors import BitallocError
from .quant.option import Option, parse
from .solve.problem import CostFn

UNITS = {"bytes": "bytes", "bops": "BOPs per token", "latency": "ms"}
_NUMBER = r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)"
_BYTE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_PREFIXES = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_SECONDS_IN_MS = {"s": 1e3, "ms": 1.0, "us": 1e-3, "µs": 1e-3}


def cost_function(kind: str, latency: LatencyLookup | None = None) -> CostFn:
    """The per-layer cost of a budget kind."""
    if kind == "bytes":
        return layer_bytes
    if kind == "bops":
        return layer_bops
    if kind == "latency":
        if latency is None:
            raise BitallocError("a latency budget needs a latency table (--latency-table FILE)")
        return latency
    raise BitallocError(f"unknown budget kind '{kind}' (known: {', '.join(UNITS)})")


@dataclass(frozen=True)
class Budget:
    kind: str  # a cost kind: "bytes", "bops" or "latency"
    limit: float
    spec: str
    uniform: Option | None = None  # set when the budget was given as a uniform option
    latency: LatencyLookup | None = None  # the table a latency budget is counted in

    @property
    def cost(self) -> CostFn:
        return cost_function(self.kind, self.latency)

    def cost_fns(self) -> dict[str, CostFn]:
        """For build_problem: the budget's kind, and bytes (always reported)."""
        return {"bytes": layer_bytes, self.kind: self.cost}

    def describe(self, value: float | None = None) -> str:
        value = self.limit if value is None else value
        if self.kind == "bytes":
            return f"{value / 1e6:.3f} MB of quantized linears"
        if self.kind == "bops":
            return f"{value / 1e9:.3f} GBOPs per token in the decoder linears"
        return f"{value:.4f} ms in the decoder linears ({self.latency.backend}, batch {self.latency.batch})"

    def check_reachable(self, shapes: list[LayerShape], options: list[Option]) -> None:
        """Stop before any work when even the cheapest option everywhere is over the budget."""
        smallest = sum(min(self.cost(s, o) for o in options) for s in shapes)
        if self.limit < smallest:
            raise BitallocError(f"budget {self.spec} ({self.describe()}) is below the smallest plan the option "
                                f"space allows ({self.describe(smallest)})")

    def to_json(self) -> dict:
        data = {"kind": self.kind, "limit": self.limit, "spec": self.spec, "unit": UNITS[self.kind]}
        if self.latency is not None:
            data["latency"] = self.latency.to_json()
        return data


def _uniform(spec: str, shapes: list[LayerShape], latency: LatencyLookup | None) -> Budget:
    text, _, kind = spec.partition("@")
    kind = kind.strip().lower() or "bytes"
    cost = cost_function(kind, latency)
    option = parse(text)
    limit = sum(cost(s, option) for s in shapes)
    if isinstance(limit, float):  # measured milliseconds: a solver adding the layers in another order (tie
        limit *= 1 + 1e-12        # groups first) must not find the option's own plan a rounding error over
    return Budget(kind, limit, spec, option, latency if kind == "latency" else None)


def _finite(limit: float, spec: str) -> float:
    if not math.isfinite(limit):
        raise BitallocError(f"budget '{spec}': the number is too large")
    return limit


def parse_budget(text: str, shapes: list[LayerShape], latency: LatencyLookup | None = None) -> Budget:
    """Read a budget (grammar in the module doc); `latency` is needed for latency budgets only."""
    spec = str(text).strip()
    numel = sum(s.numel for s in shapes)
    match = re.fullmatch(_NUMBER + r"\s*(bits?)?", spec, flags=re.I)
    if match:
        bits = float(match.group(1))
        if not 0 < bits <= 32:
            raise BitallocError(f"budget '{spec}': average bits must be in (0, 32]")
        return Budget("bytes", math.floor(_finite(bits * numel / 8, spec)) + bias_bytes(shapes), spec)
    match = re.fullmatch(_NUMBER + r"\s*([kmgt]i?b|b)", spec, flags=re.I)
    if match:
        return Budget("bytes", math.floor(_finite(float(match.group(1)) * _BYTE_UNITS[match.group(2).lower()], spec)),
                      spec)
    match = re.fullmatch(_NUMBER + r"\s*([kmgt]?)bops?", spec, flags=re.I)
    if match:
        return Budget("bops", _finite(float(match.group(1)) * _PREFIXES[match.group(2).lower()], spec), spec)
    match = re.fullmatch(_NUMBER + r"\s*(s|ms|us|µs)", spec, flags=re.I)
    if match:
        cost_function("latency", latency)
        return Budget("latency", _finite(float(match.group(1)) * _SECONDS_IN_MS[match.group(2).lower()], spec), spec,
                      latency=latency)
    if re.fullmatch(_NUMBER + r"\s*[kmgt]?(flops?|macs?)", spec, flags=re.I):
        raise BitallocError(f"budget '{spec}': FLOPs and MACs are the same under every option, so they cannot "
                            "steer the allocation; use BOPs (bits_w x bits_a x MACs) or latency")
    if ":" in spec or spec.partition("@")[0] == "fp16":
        return _uniform(spec, shapes, latency)
    raise BitallocError(f"cannot read budget '{spec}': use average bits (4.5), bytes (60MB), BOPs (12GBOPs), "
                        "latency (3ms) or an option (rtn:int4:g64:asym, rtn:int4:g64:asym@bops)")


def add_budget_args(parser) -> None:
    """--budget and the latency table it may be counted in (search.sh)."""
    parser.add_argument("--budget", action="append", default=None,
                        help="average bits (4.5), bytes (60MB), BOPs per token (12GBOPs), latency (3ms, needs "
                             "--latency-table), or an option whose uniform cost is the budget "
                             "(rtn:int4:g64:asym, ...@bops, ...@latency); grammar in bitalloc/budget.py. Repeat "
                             "to combine budgets of different kinds (default rtn:int4:g64:asym)")
    parser.add_argument("--latency-table", default=None,
                        help="CSV of measured layer latencies (schema in bitalloc/cost.py) for latency budgets")
    parser.add_argument("--latency-backend", default=None,
                        help="backend whose rows of the latency table count (default: the table's only one)")
    parser.add_argument("--latency-batch", type=int, default=1,
                        help="token rows per layer call whose rows of the latency table count")


def latency_from_args(args) -> LatencyLookup | None:
    """The --latency-table rows that count (backend, batch), or None without a table."""
    if not args.latency_table:
        return None
    return LatencyTable.load(args.latency_table).lookup(args.latency_backend, args.latency_batch)


def budgets_from_args(args, shapes: list[LayerShape], latency: LatencyLookup | None = None) -> list[Budget]:
    """Every --budget given (the default when none); the tightest of one kind is the one that binds.
    `latency` is latency_from_args(args), read here when not given."""
    latency = latency or latency_from_args(args)
    return [parse_budget(spec, shapes, latency) for spec in args.budget or ["rtn:int4:g64:asym"]]


def combined_limits(budgets: list[Budget]) -> dict[str, float]:
    limits: dict[str, float] = {}
    for budget in budgets:
        limits[budget.kind] = min(limits.get(budget.kind, budget.limit), budget.limit)
    return limits


def combined_cost_fns(budgets: list[Budget]) -> dict[str, CostFn]:
    fns: dict[str, CostFn] = {}
    for budget in budgets:
        fns.update(budget.cost_fns())
    return fns


def combined_json(budgets: list[Budget]) -> dict:
    """The plan's budget record: one budget as it is, several as their binding limits."""
    if len(budgets) == 1:
        return budgets[0].to_json()
    limits = combined_limits(budgets)
    return {"kind": "+".join(limits), "limit": next(iter(limits.values())), "limits": limits,
            "spec": "+".join(b.spec for b in budgets)}
