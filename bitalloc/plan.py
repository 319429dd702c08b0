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

Loading validates everything it can without the model; `check_against` then
checks layer names, tie groups and the budget against the loaded model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import atomic
from .cost import LayerShape, assignment_bytes
from .errors import BitallocError
from .quant.option import FP16, Option, parse
from .quant.registry import check_option

FORMAT = "bitalloc-plan"
VERSION = 1
REQUIRED = {"format", "version", "model", "layers"}
OPTIONAL = {"fingerprint", "default", "tie_groups", "budget", "predicted", "solver", "calibration",
            "evaluation", "measured"}


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
        for key in ("fingerprint", "budget", "predicted", "solver", "calibration", "evaluation", "measured"):
            value = getattr(self, key)
            if value:
                data[key] = value
        return data

    def save(self, path) -> None:
        atomic.write_json(path, self.to_json())

    @classmethod
    def from_json(cls, data, source: str = "plan") -> "Plan":
        if not isinstance(data, dict):
            raise BitallocError(f"{source}: expected a JSON object at the top level")
        missing = REQUIRED - set(data)
        if missing:
            raise BitallocError(f"{source}: missing key '{sorted(missing)[0]}'")
        unknown = set(data) - REQUIRED - OPTIONAL
        if unknown:
            raise BitallocError(f"{source}: unknown key '{sorted(unknown)[0]}'")
        if data["format"] != FORMAT:
            raise BitallocError(f"{source}: 'format' must be '{FORMAT}'")
        if data["version"] != VERSION or isinstance(data["version"], bool):
            raise BitallocError(f"{source}: unsupported plan version {data['version']!r} (this bitalloc reads {VERSION})")
        if not isinstance(data["model"], str) or not data["model"]:
            raise BitallocError(f"{source}: 'model' must be a non-empty string")
        layers = data["layers"]
        if not isinstance(layers, dict):
            raise BitallocError(f"{source}: 'layers' must map layer names to option strings")
        for name, text in layers.items():
            if not isinstance(text, str):
                raise BitallocError(f"{source}: layer {name}: option must be a string")
            try:
                check_option(parse(text))
            except BitallocError as err:
                raise BitallocError(f"{source}: layer {name}: {err}") from None
        default = data.get("default", str(FP16))
        if not isinstance(default, str):
            raise BitallocError(f"{source}: 'default' must be an option string")
        check_option(parse(default))
        ties = data.get("tie_groups", [])
        if not isinstance(ties, list) or not all(
            isinstance(g, list) and all(isinstance(n, str) for n in g) for g in ties
        ):
            raise BitallocError(f"{source}: 'tie_groups' must be a list of lists of layer names")
        for key in ("budget", "predicted", "solver", "calibration", "evaluation", "measured"):
            if key in data and not isinstance(data[key], dict):
                raise BitallocError(f"{source}: '{key}' must be an object")
        fingerprint = data.get("fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise BitallocError(f"{source}: 'fingerprint' must be a string")
        return cls(
            model=data["model"], layers=dict(layers), fingerprint=fingerprint, default=default,
            tie_groups=ties, **{k: data.get(k) or ({} if k != "budget" else None)
                                for k in ("budget", "predicted", "solver", "calibration", "evaluation", "measured")},
        )

    @classmethod
    def load(cls, path) -> "Plan":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BitallocError(f"plan file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise BitallocError(f"cannot read plan {path}: {err}") from None
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except ValueError as err:
            raise BitallocError(f"plan {path} is not valid JSON: {err}") from None
        except RecursionError:
            raise BitallocError(f"plan {path} is nested too deeply to be a plan") from None
        return cls.from_json(data, source=f"plan {path}")

    def check_against(self, shapes: list[LayerShape], fingerprint: str | None = None) -> dict[str, Option]:
        """Validate against the model's layers; returns the full layer -> option assignment."""
        names = {s.name for s in shapes}
        for layer in self.layers:
            if layer not in names:
                raise BitallocError(f"plan names layer '{layer}', which the model does not have")
        if fingerprint and self.fingerprint and fingerprint != self.fingerprint:
            raise BitallocError(
                f"plan was made for model weights {self.fingerprint}, but the loaded model is {fingerprint}"
            )
        assignment = self.assignment([s.name for s in shapes])
        for group in self.tie_groups:
            unknown = [n for n in group if n not in names]
            if unknown:
                raise BitallocError(f"tie group names layer '{unknown[0]}', which the model does not have")
            if len({str(assignment[n]) for n in group}) > 1:
                raise BitallocError(f"tie group {group[0]} ... must share one option, but the plan gives them different ones")
        if self.budget and self.budget.get("kind") == "bytes":
            used = assignment_bytes(shapes, assignment)
            limit = self.budget.get("limit")
            if isinstance(limit, (int, float)) and used > limit:
                raise BitallocError(f"plan uses {used} bytes, over its own budget of {limit} bytes")
        return assignment


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed in a plan")


def uniform_plan(model: str, fingerprint: str | None, option: Option) -> Plan:
    return Plan(model=model, layers={}, fingerprint=fingerprint, default=str(option))


__all__ = ["Plan", "uniform_plan", "FORMAT", "VERSION"]
