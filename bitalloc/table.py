"""The sensitivity table: the contract between profiling and search.

Rows are (layer, option, error, bytes, numel); the metadata says which model,
calibration, metric and quantizer versions produced them, so a table made for
something else is recognised instead of silently reused.  `error` is the metric
solvers minimise; a profile that measured several metrics keeps each as an
extra column named after it (meta["metrics"]), and `with_metric` makes any of
them the `error`.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from . import atomic
from .errors import BitallocError
from .quant.option import Option, parse

FIELDS = ("layer", "option", "error", "bytes", "numel")


@dataclass
class SensitivityTable:
    meta: dict
    rows: list[dict] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(r["layer"] for r in self.rows))

    @property
    def options(self) -> list[Option]:
        return [parse(o) for o in dict.fromkeys(r["option"] for r in self.rows)]

    def lookup(self) -> dict[tuple[str, str], dict]:
        return {(r["layer"], r["option"]): r for r in self.rows}

    def error(self, layer: str, option: Option | str) -> float:
        return self.lookup()[(layer, str(option))]["error"]

    @property
    def metrics(self) -> list[str]:
        return list(self.meta.get("metrics", [self.meta.get("metric", "error")]))

    def with_metric(self, metric: str) -> "SensitivityTable":
        """The same table with `metric` as every row's error."""
        if metric not in self.metrics or any(metric not in r for r in self.rows):
            raise BitallocError(f"the sensitivity table has no metric '{metric}' (it has {', '.join(self.metrics)})")
        return SensitivityTable({**self.meta, "metric": metric}, [{**r, "error": r[metric]} for r in self.rows])

    def to_json(self) -> dict:
        return {"meta": self.meta, "rows": self.rows}

    def to_csv(self) -> str:
        buffer = io.StringIO()
        extra = [m for m in self.metrics if m not in FIELDS and all(m in r for r in self.rows)]
        extra += ["unit"] if any("unit" in r for r in self.rows) else []
        fields = list(FIELDS) + extra
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in fields} for r in self.rows)
        return buffer.getvalue()

    def save(self, path: str | Path) -> None:
        """Write `path` (JSON) and the same rows beside it as CSV, each atomically."""
        path = Path(path)
        atomic.write_json(path, self.to_json())
        atomic.write_text(path.with_suffix(".csv"), self.to_csv())

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        try:
            data = json.loads(Path(path).read_text())
            table = cls(data["meta"], data["rows"])
            for row in table.rows:
                if set(FIELDS) - set(row):
                    raise KeyError(f"row lacks {sorted(set(FIELDS) - set(row))}")
                parse(row["option"])
            return table
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise BitallocError(f"cannot read sensitivity table {path}: {err}") from None
