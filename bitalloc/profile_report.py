"""Figures of a sensitivity table: a heatmap (layer x option) and per-block curves for each metric,
as TensorBoard events and PNG copies."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import atomic
from .models import block_index
from .table import SensitivityTable
from .tb import _save, _tag, heatmap_figure


def block_totals(table: SensitivityTable, metric: str) -> dict[str, np.ndarray]:
    """Per option, the metric summed over each block's layers (index = block)."""
    blocks = sorted({block_index(r["layer"]) for r in table.rows})
    totals = {str(o): np.zeros(len(blocks)) for o in table.options}
    position = {b: i for i, b in enumerate(blocks)}
    for row in table.rows:
        totals[row["option"]][position[block_index(row["layer"])]] += row[metric]
    return totals


def curves_figure(table: SensitivityTable, metric: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 3.8))
    for option, values in block_totals(table, metric).items():
        axis.semilogy(np.arange(len(values)), np.maximum(values, 1e-12), marker=".", label=option)
    axis.set_xlabel("block")
    axis.set_ylabel(f"{metric}, summed over the block's layers")
    axis.set_title(f"sensitivity per block: {metric}")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return figure


def write_report(out: Path, table: SensitivityTable) -> list[Path]:
    """Heatmap and per-block curves of every metric in the table into `out` (events + PNG)."""
    import matplotlib.pyplot as plt
    from tensorboardX import SummaryWriter

    written = []
    with atomic.atomic_files(out) as events_dir:  # event files appear complete or not at all
        writer = SummaryWriter(logdir=str(events_dir))
        try:
            for metric in table.metrics:
                view = table.with_metric(metric)
                for kind, make in (("heatmap", heatmap_figure), ("blocks", lambda t: curves_figure(t, metric))):
                    figure = make(view)
                    if kind == "heatmap":
                        figure.axes[0].set_title(f"sensitivity: log10 {metric}")
                    path = out / f"profile_{kind}_{metric}.png"
                    _save(figure, path)
                    written.append(path)
                    writer.add_figure(_tag(f"profile/{kind}/{metric}"), figure, close=True)
                    plt.close(figure)
                for option, values in block_totals(view, metric).items():
                    for block, value in enumerate(values):
                        writer.add_scalar(_tag(f"profile_blocks/{metric}/{option}"), float(value), block)
        finally:
            writer.close()
    return written
