"""Figures a person would rather look at than read: TensorBoard events plus PNG copies."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from . import atomic
from .quant.option import Option
from .table import SensitivityTable

log = logging.getLogger(__name__)


def _short(layer: str) -> str:
    parts = layer.split(".")
    return f"{parts[-3]}.{parts[-1]}" if len(parts) >= 3 and parts[-3].isdigit() else layer


def _tag(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./-]+", "_", text).strip("_")


def _save(figure, path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def heatmap_figure(table: SensitivityTable):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, options = table.layers, [str(o) for o in table.options if o.quantized]
    lookup = table.lookup()
    data = np.array([[lookup[(l, o)]["error"] for o in options] for l in layers])
    figure, axis = plt.subplots(figsize=(2 + 1.3 * len(options), max(4, 0.11 * len(layers))))
    image = axis.imshow(np.log10(np.maximum(data, 1e-12)), aspect="auto", cmap="viridis")
    axis.set_xticks(range(len(options)), options, rotation=30, ha="right", fontsize=8)
    step = max(1, len(layers) // 60)
    axis.set_yticks(range(0, len(layers), step), [_short(l) for l in layers[::step]], fontsize=6)
    axis.set_title("sensitivity: log10 relative block-output error")
    figure.colorbar(image, ax=axis, label="log10 error")
    return figure


def bits_figure(assignments: dict[str, dict[str, Option]], bits_of):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(12, 3.5))
    for name, assignment in assignments.items():
        layers = list(assignment)
        axis.step(range(len(layers)), [bits_of(l, assignment[l]) for l in layers], where="mid", label=name)
    axis.set_xlabel("layer (block order)")
    axis.set_ylabel("bits per weight (incl. scales)")
    axis.set_title("bits per layer")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return figure


def pareto_figure(front: dict):
    """The predicted front (size vs predicted loss), the sampled budgets, each variant and the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 1e6 if front["kind"] == "bytes" else 1.0
    unit = "MB" if front["kind"] == "bytes" else front["kind"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    if "curve" in front:
        axis.step(np.array(front["curve"]["size"]) / scale, front["curve"]["objective"], where="post",
                  color="0.6", lw=1, label=f"whole front ({front.get('plans_on_front', '')} plans)")
    points = front["points"]
    axis.plot([p["size"] / scale for p in points], [p["loss"] for p in points], "o", ms=3,
              label=f"{len(points)} budgets ({front['method']})")
    for name, point in front.get("variants", {}).items():
        axis.plot(point["size"] / scale, point["loss"], "*", ms=10, label=name)
    if front.get("budget"):
        axis.axvline(front["budget"] / scale, color="k", ls="--", lw=0.8, label="budget")
    axis.set_yscale("log")
    axis.set_xlabel(f"{front['kind']} of the quantized linears ({unit})")
    axis.set_ylabel("predicted loss (summed sensitivity)")
    axis.set_title("Pareto front of the sensitivity table")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3, which="both")
    return figure


def trials_figure(trials: list[dict]):
    """Optuna trials: measured loss by trial, and measured against predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    numbers = [t["number"] for t in trials]
    measured = [t["measured"] for t in trials]
    left.plot(numbers, measured, ".", label="trial")
    left.plot(numbers, np.minimum.accumulate(measured), "-", label="best so far")
    left.set_xlabel("trial")
    left.set_ylabel("measured KL (held windows)")
    left.legend(fontsize=8)
    right.plot([t["predicted"] for t in trials], measured, ".")
    right.set_xlabel("predicted loss")
    right.set_ylabel("measured KL (held windows)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.suptitle("Optuna refinement")
    return figure


def write_run(run_dir: Path, table: SensitivityTable, assignments: dict[str, dict[str, Option]], bits_of,
              scalars: dict[str, float], front: dict | None = None, trials: list[dict] | None = None) -> None:
    """Heatmap, bits per layer, the Pareto front, Optuna trials and headline scalars (events + PNG)."""
    import matplotlib.pyplot as plt
    from tensorboardX import SummaryWriter

    figures = [("sensitivity_heatmap", lambda: heatmap_figure(table)),
               ("bits_per_layer", lambda: bits_figure(assignments, bits_of))]
    if front is not None:
        figures.append(("pareto", lambda: pareto_figure(front)))
    if trials:
        figures.append(("optuna_trials", lambda: trials_figure(trials)))
    with atomic.atomic_files(run_dir) as events_dir:  # event files appear complete or not at all
        writer = SummaryWriter(logdir=str(events_dir))
        try:
            for trial in trials or []:
                writer.add_scalar("optuna/measured", trial["measured"], trial["number"])
                writer.add_scalar("optuna/predicted", trial["predicted"], trial["number"])
            for tag, make in figures:
                figure = make()
                _save(figure, run_dir / f"{tag}.png")
                writer.add_figure(tag, figure, close=True)
                plt.close(figure)
            for name, assignment in assignments.items():
                for step, layer in enumerate(assignment):
                    writer.add_scalar(_tag(f"bits_per_layer/{name}"), bits_of(layer, assignment[layer]), step)
            for tag, value in scalars.items():
                writer.add_scalar(_tag(tag), value, 0)
        finally:
            writer.close()
