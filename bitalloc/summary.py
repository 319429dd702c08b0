"""Plain-text comparison tables printed by search and apply."""
from __future__ import annotations

import math

COLUMNS = ("variant", "MB", "avg bits", "pred. loss", "PPL", "dPPL", "KL mean", "KL p99", "top-1")
# budget kinds beside bytes, shown after "pred. loss" when a run is limited by them: header, scale, format
BUDGET_COLUMNS = {"bops": ("GBOPs", 1e-9, ".3f"), "latency": ("ms", 1.0, ".4f")}


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def other_corpora(measured: dict | None) -> list[str]:
    """The corpora after the first, where several were evaluated: each gets a PPL column of its own
    (PPL, KL and top-1 are the first corpus's)."""
    corpora = list((measured or {}).get("corpora", {}).items())
    return [name for name, result in corpora[1:] if "ppl" in result]


def protocol_text(protocol: dict) -> str:
    return f"{protocol['corpus']} PPL on {protocol['windows']} windows of {protocol['seqlen']} tokens"


def extra_kinds(kinds, weighting: str = "sum") -> list[str]:
    """The columns beyond COLUMNS a run needs: its non-size budget kinds, and the weighted objective
    when the solver minimised something other than the predicted loss."""
    return [k for k in BUDGET_COLUMNS if k in kinds] + (["objective"] if weighting != "sum" else [])


def header(measured: dict | None, extras: list[str] = (), weighting: str = "sum") -> tuple[str, ...]:
    names = [BUDGET_COLUMNS[k][0] if k in BUDGET_COLUMNS else f"objective ({weighting})" for k in extras]
    return (*COLUMNS[:4], *names, *COLUMNS[4:], *(f"PPL {name}" for name in other_corpora(measured)))


def result_row(name: str, bytes_: int | None, avg_bits: float | None, predicted: float | None,
               measured: dict | None, base_ppl: float | None, extras: list[str] = (),
               totals: dict | None = None) -> list[str]:
    """One variant; `totals` holds its value of each of `extras` (a missing one shows as '-')."""
    measured = measured or {}
    ppl = measured.get("ppl")
    kl = measured.get("kl", {})
    others = [_fmt(measured["corpora"][corpus]["ppl"], ".3f") for corpus in other_corpora(measured)]
    extra = []
    for kind in extras:
        _, scale, spec = BUDGET_COLUMNS.get(kind, ("", 1.0, ".4g"))
        value = (totals or {}).get(kind)
        extra.append(_fmt(value * scale if value is not None else None, spec))
    return [
        name,
        _fmt(bytes_ / 1e6 if bytes_ is not None else None, ".3f"),
        _fmt(avg_bits, ".3f"),
        _fmt(predicted, ".4g"),
        *extra,
        _fmt(ppl, ".3f"),
        _fmt(ppl - base_ppl if ppl is not None and base_ppl is not None else None, "+.3f"),
        _fmt(kl.get("mean"), ".4f"),
        _fmt(kl.get("p99"), ".3f"),
        _fmt(measured.get("top1"), ".4f"),
        *others,
    ]


def render(rows: list[list[str]], header=COLUMNS) -> str:
    widths = [max(len(str(r[i])) for r in [list(header), *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
