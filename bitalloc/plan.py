"""plan.json: the contract between search and apply.

    {
      "format": "bitalloc-plan", "version": 1,
      "model": "smollm2-135m", "fingerprint": "…",       # what it was solved for
      "default": "fp16",                                   # for layers not listed
      "layers": {"model.layers.0.self_attn.q_proj": "rtn:int4:g64:asym", …},
      "tie_groups": [["…q_proj", "…k_proj", "…v_proj"], …],   # must share an option
      "budget": {"kind": "bytes", "limit": 1.0e7, "spec": "4.5"},
      "predicted": {"bytes": …, "avg_bits": …, "loss": …},
      "solver": {…}, "calibration": {…}, "evaluation": {…}, "measured": {…}
    }

Loading validates everything it can without the model (strict JSON, keys,
types, options, tie groups); `check_against` then checks layer names, tie
groups, the budget and the weights' fingerprint against the loaded model.
Every failure is a BitallocError naming the key or layer at fault.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

from . import atomic, safe_json
from .cost import LayerShape, assignment_bytes
from .errors import BitallocError
from .quant.option import FP16, Option, parse
from .quant.registry import check_option
from .safe_json import quote

FORMAT = "bitalloc-plan"
VERSION = 1
REQUIRED = {"format", "version", "model", "layers"}
RECORDS = ("budget", "predicted", "solver", "calibration", "evaluation", "measured")
OPTIONAL = {"fingerprint", "default", "tie_groups", *RECORDS}
MAX_NAME = 1000  # characters in a model spec, fingerprint or layer name

# Keys of the records that apply reads back, and what each must hold; other keys pass through.
_INT, _POSITIVE, _NUMBER, _TEXT, _FLAG = "an integer", "a positive integer", "a number", "a string", "true or false"
FIELDS = {
    "budget": {"kind": _TEXT, "limit": _NUMBER, "spec": _TEXT},
    "predicted": {"bytes": _INT, "avg_bits": _NUMBER, "loss": _NUMBER, "objective": _NUMBER, "bops": _NUMBER,
                  "latency": _NUMBER, "weighting": _TEXT},
    "calibration": {"source": _TEXT, "nsamples": _POSITIVE, "seqlen": _POSITIVE, "seed": _INT,
                    "data_dir": _TEXT},
    "evaluation": {"corpus": _TEXT, "split": _TEXT, "seqlen": _POSITIVE, "windows": _POSITIVE, "subset": _FLAG},
}


@dataclass
class Plan:
    model: str
    layers: dict[str, str]
    fingerprint: str | None = None
    default: str = str(FP16)
    tie_groups: list[list[str]] = field(default_factory=list)
    budget: dict | None = None
    predicted: dict = field(default_factory=dict)
    solver: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)

    def option(self, layer: str) -> Option:
        return parse(self.layers.get(layer, self.default))

    def assignment(self, layer_names) -> dict[str, Option]:
        return {name: self.option(name) for name in layer_names}

    def to_json(self) -> dict:
        data = {"format": FORMAT, "version": VERSION, "model": self.model, "layers": dict(self.layers),
                "default": self.default, "tie_groups": self.tie_groups}
        for key in ("fingerprint", *RECORDS):
            value = getattr(self, key)
            if value:
                data[key] = value
        return data

    def save(self, path) -> None:
        atomic.write_json(path, self.to_json())

    @classmethod
    def from_json(cls, data, source: str = "plan") -> "Plan":
        """Validate plain data (a parsed plan.json) and build the Plan; see the module docstring."""
        if not isinstance(data, dict):
            raise BitallocError(f"{source}: expected a JSON object at the top level, got {_kind(data)}")
        missing = REQUIRED - set(data)
        if missing:
            raise BitallocError(f"{source}: missing key '{sorted(missing)[0]}'")
        unknown = set(data) - REQUIRED - OPTIONAL
        if unknown:
            raise BitallocError(f"{source}: unknown key {quote(sorted(unknown)[0])}")
        if data["format"] != FORMAT:
            raise BitallocError(f"{source}: 'format' must be '{FORMAT}', got {_shown(data['format'])}")
        if type(data["version"]) is not int or data["version"] != VERSION:
            raise BitallocError(f"{source}: unsupported plan version {_shown(data['version'])} "
                                f"(this bitalloc reads version {VERSION})")
        model = _name(data["model"], f"{source}: 'model'")
        fingerprint = data.get("fingerprint")
        if fingerprint is not None:
            _name(fingerprint, f"{source}: 'fingerprint'")
        layers = data["layers"]
        if not isinstance(layers, dict):
            raise BitallocError(f"{source}: 'layers' must map layer names to option strings, got {_kind(layers)}")
        for name, text in layers.items():
            _name(name, f"{source}: a layer name")
            _option(text, f"{source}: layer {quote(name)}")
        default = data.get("default", str(FP16))
        _option(default, f"{source}: 'default'")
        records = {key: _record(data.get(key), key, source) for key in RECORDS}
        plan = cls(model=model, layers=dict(layers), fingerprint=fingerprint, default=default,
                   tie_groups=_tie_groups(data.get("tie_groups", []), source), **records)
        plan._check_ties(source)
        return plan

    @classmethod
    def load(cls, path) -> "Plan":
        path = Path(path)
        return cls.from_json(safe_json.load_json(path, "plan"), source=f"plan {path}")

    def _check_ties(self, source: str) -> None:
        for group in self.tie_groups:
            first = self.option(group[0])
            for name in group[1:]:
                if self.option(name) != first:
                    raise BitallocError(
                        f"{source}: tie group of {quote(group[0])} must share one option (fused kernels need it), "
                        f"but {quote(group[0])} has {first} and {quote(name)} has {self.option(name)}")

    def check_against(self, shapes: list[LayerShape], fingerprint: str | None = None) -> dict[str, Option]:
        """Validate against the model's layers; returns the full layer -> option assignment."""
        names = [s.name for s in shapes]
        known = set(names)
        for layer in [*self.layers, *(n for g in self.tie_groups for n in g)]:
            if layer not in known:
                guess = difflib.get_close_matches(layer, names, n=1, cutoff=0.8)
                hint = f" (did you mean {quote(guess[0])}?)" if guess else ""
                raise BitallocError(f"plan names layer {quote(layer)}, which the model does not have{hint}")
        if fingerprint and self.fingerprint and fingerprint != self.fingerprint:
            raise BitallocError(
                f"plan was made for model weights {self.fingerprint}, but the loaded model is {fingerprint}"
            )
        assignment = self.assignment(names)
        limit = _bytes_limit(self.budget or {})
        if limit is not None:
            used = assignment_bytes(shapes, assignment)
            if used > limit:
                raise BitallocError(f"plan uses {used} bytes, over its own budget of {limit:.0f} bytes "
                                    f"({quote(self.budget.get('spec', 'bytes'))})")
        return assignment


def budget_kinds(budget: dict | None) -> list[str]:
    """The cost kinds a plan's budget limited: one, or several for combined budgets."""
    budget = budget or {}
    limits = budget.get("limits")
    return list(limits) if isinstance(limits, dict) else [budget["kind"]] if "kind" in budget else []


def _bytes_limit(budget: dict) -> float | None:
    """The bytes a plan promised to stay within: a bytes budget, or the bytes part of combined ones."""
    limits = budget.get("limits")
    if isinstance(limits, dict) and isinstance(limits.get("bytes"), (int, float)):
        return limits["bytes"]
    return budget["limit"] if budget.get("kind") == "bytes" and "limit" in budget else None


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number")


def _shown(value) -> str:
    if isinstance(value, (dict, list)):
        return _kind(value)
    return quote(value, 60) if isinstance(value, str) else repr(value)[:60]


def _name(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BitallocError(f"{where} must be a non-empty string, got {_shown(value)}")
    if len(value) > MAX_NAME:
        raise BitallocError(f"{where} {quote(value)} is longer than {MAX_NAME} characters")
    if not value.isprintable():
        raise BitallocError(f"{where} {quote(value)} holds control or invisible characters")
    return value


def _option(text, where: str) -> None:
    if not isinstance(text, str):
        raise BitallocError(f"{where}: option must be a string like 'rtn:int4:g64:asym', got {_shown(text)}")
    try:
        check_option(parse(text))
    except BitallocError as err:
        raise BitallocError(f"{where}: {err}") from None


def _record(value, key: str, source: str) -> dict | None:
    if value is None:
        return None if key == "budget" else {}
    if not isinstance(value, dict):
        raise BitallocError(f"{source}: '{key}' must be an object, got {_kind(value)}")
    for name, expected in FIELDS.get(key, {}).items():
        if name in value and not _holds(value[name], expected):
            raise BitallocError(f"{source}: '{key}.{name}' must be {expected}, got {_shown(value[name])}")
    if key == "budget" and not (isinstance(value.get("kind"), str) and "limit" in value and value["limit"] > 0):
        raise BitallocError(f"{source}: 'budget' needs a 'kind' and a positive 'limit'")
    if key == "evaluation" and value.get("subset") and "windows" not in value:
        raise BitallocError(f"{source}: 'evaluation.subset' is true, so 'evaluation.windows' must say how many")
    return value


def _holds(value, expected: str) -> bool:
    if expected == _TEXT:
        return isinstance(value, str)
    if expected == _FLAG:
        return isinstance(value, bool)
    if not safe_json.is_finite_number(value):  # also an integer too long for a float
        return False
    if expected == _NUMBER:
        return True
    return isinstance(value, int) and (expected == _INT or value >= 1)


def _tie_groups(ties, source: str) -> list[list[str]]:
    if not isinstance(ties, list) or not all(isinstance(g, list) and all(isinstance(n, str) for n in g)
                                            for g in ties):
        raise BitallocError(f"{source}: 'tie_groups' must be a list of lists of layer names")
    seen: set[str] = set()
    for group in ties:
        if len(set(group)) < 2 or len(set(group)) != len(group):
            raise BitallocError(f"{source}: tie group {quote(group[0] if group else '')} must list at least two "
                                f"different layers, each once")
        for name in group:
            _name(name, f"{source}: a tie-group layer name")
            if name in seen:
                raise BitallocError(f"{source}: layer {quote(name)} is in two tie groups")
            seen.add(name)
    return ties


def uniform_plan(model: str, fingerprint: str | None, option: Option) -> Plan:
    return Plan(model=model, layers={}, fingerprint=fingerprint, default=str(option))


__all__ = ["Plan", "uniform_plan", "budget_kinds", "FORMAT", "VERSION"]
