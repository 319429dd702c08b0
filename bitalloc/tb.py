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


def write_run(run_dir: Path, table: SensitivityTable, assignments: dict[str, dict[str, Option]], bits_of,
              scalars: dict[str, float]) -> None:
    """Heatmap, bits per layer and headline scalars into `run_dir` (events + PNG)."""
    import matplotlib.pyplot as plt
    from tensorboardX import SummaryWriter

    with atomic.atomic_files(run_dir) as events_dir:  # event files appear complete or not at all
        writer = SummaryWriter(logdir=str(events_dir))
        try:
            for tag, make in (("sensitivity_heatmap", lambda: heatmap_figure(table)),
                              ("bits_per_layer", lambda: bits_figure(assignments, bits_of))):
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
