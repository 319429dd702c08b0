"""Report figures: sensitivity by block and layer type, bits per layer, size/quality front, predicted vs measured.

Each function returns a matplotlib figure built from plain data, so the report,
the plot scripts and TensorBoard can share them; `save` writes a PNG atomically.
"""
from __future__ import annotations

import math
import re

import numpy as np

from . import atomic

MARKERS = "os^Dv<>pXh*"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, path) -> None:
    with atomic.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(figure)


def split_layer(name: str) -> tuple[int, str]:
    """('model.layers.3.self_attn.q_proj') -> (3, 'self_attn.q_proj')."""
    match = re.search(r"\.(\d+)\.(.+)$", name)
    return (int(match.group(1)), match.group(2)) if match else (0, name)


def _grid(layers: list[str], value_of) -> tuple[list[str], int, np.ndarray]:
    """Layer types x blocks matrix of `value_of(layer)`; NaN where a block lacks a type."""
    types = list(dict.fromkeys(split_layer(l)[1] for l in layers))
    blocks = max(split_layer(l)[0] for l in layers) + 1
    grid = np.full((len(types), blocks), np.nan)
    for layer in layers:
        block, kind = split_layer(layer)
        grid[types.index(kind), block] = value_of(layer)
    return types, blocks, grid


def sensitivity_figure(errors: dict[tuple[str, str], float], layers: list[str], options: list[str]):
    """One panel per option: log10 sensitivity, layer types (rows) x blocks (columns), one colour scale."""
    plt = pyplot()
    grids = [_grid(layers, lambda l, o=o: math.log10(max(errors[(l, o)], 1e-12)))[2] for o in options]
    types, blocks, _ = _grid(layers, lambda l: 0.0)
    low, high = np.nanmin(grids), np.nanmax(grids)
    figure, axes = plt.subplots(len(options), 1, figsize=(max(8, 0.32 * blocks + 3), 1.0 + 0.36 * len(types) * len(options)),
                                squeeze=False, sharex=True)
    for axis, option, grid in zip(axes[:, 0], options, grids):
        image = axis.imshow(grid, aspect="auto", cmap="magma", vmin=low, vmax=high, interpolation="nearest")
        axis.set_yticks(range(len(types)), [t.split(".")[-1] for t in types], fontsize=8)
        axis.set_title(option, fontsize=9, loc="left")
    axes[-1, 0].set_xticks(range(blocks), [str(b) for b in range(blocks)], fontsize=7)
    axes[-1, 0].set_xlabel("block")
    figure.colorbar(image, ax=axes[:, 0].tolist(), label="log10 sensitivity (predicted loss)", shrink=0.8)
    figure.suptitle("Sensitivity of each layer to each option (darker = less damage)", fontsize=11)
    return figure


def bits_figure(assignments: dict[str, dict[str, float]]):
    """Bits per weight of every layer: one panel per mixed plan (lines drawn on one axis would hide
    each other), uniform plans as dashed reference lines on every panel, block boundaries marked."""
    plt = pyplot()
    layers = list(next(iter(assignments.values())))
    values = {name: [bits[l] for l in layers] for name, bits in assignments.items()}
    uniform = {name: v[0] for name, v in values.items() if len(set(v)) == 1}
    mixed = [name for name in values if name not in uniform] or list(uniform)[:1]
    figure, axes = plt.subplots(len(mixed), 1, figsize=(13, 1.2 + 2.1 * len(mixed)), sharex=True, squeeze=False)
    blocks = [split_layer(l)[0] for l in layers]
    starts = [i for i in range(1, len(layers)) if blocks[i] != blocks[i - 1]]
    for row, name in enumerate(mixed):
        axis = axes[row][0]
        axis.step(range(len(layers)), values[name], where="mid", linewidth=1.6, color="C0", zorder=3)
        for i, (label, level) in enumerate(uniform.items()):
            axis.axhline(level, linestyle="--", linewidth=0.9, color=f"C{i + 1}", label=label, zorder=1)
        for s in starts:
            axis.axvline(s - 0.5, color="0.85", linewidth=0.6, zorder=0)
        axis.set_title(name, fontsize=9, loc="left")
        axis.set_ylabel("bits / weight", fontsize=8)
        axis.grid(axis="y", alpha=0.3)
        if uniform and row == 0:
            axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ticks = [0, *starts]
    step = max(1, len(ticks) // 30)
    bottom = axes[-1][0]
    bottom.set_xticks(ticks[::step], [str(blocks[t]) for t in ticks[::step]], fontsize=7)
    bottom.set_xlabel("block (each block's linears in order: " + ", ".join(
        dict.fromkeys(split_layer(l)[1].split(".")[-1] for l in layers)) + "); bits include scales and zeros",
        fontsize=8)
    figure.suptitle("Bits per layer")
    figure.tight_layout()
    return figure


def front_figure(front: list[tuple[float, float]] | None, points: dict[str, dict]):
    """Left: the predicted size/loss front (a line) with named plans on it; right: the same plans measured.

    `points` maps a plan name to {"avg_bits", "predicted", "kl"}.
    """
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    if front:
        xs, ys = zip(*sorted(front))
        axes[0].plot(xs, ys, "-", color="0.45", linewidth=1.5, marker=".", markersize=4, label="Pareto front",
                     zorder=1)
    for axis, key, label in ((axes[0], "predicted", "predicted loss"), (axes[1], "kl", "measured mean KL")):
        for i, (name, point) in enumerate(points.items()):
            axis.scatter([point["avg_bits"]], [point[key]], s=60, marker=MARKERS[i % len(MARKERS)], label=name,
                         color=f"C{i}", zorder=3)
        axis.set_yscale("log")
        axis.set_xlabel("average bits per weight (scales and zeros included)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3, which="both")
    axes[0].set_title("Size vs predicted loss" + ("" if front else " (no Pareto front in this run)"), fontsize=10)
    axes[1].set_title("Size vs measured loss", fontsize=10)
    axes[0].legend(fontsize=8)
    return figure


def spearman(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    rx, ry = np.argsort(np.argsort(xs)), np.argsort(np.argsort(ys))
    return float(np.corrcoef(rx, ry)[0, 1])


def predicted_measured_figure(points: dict[str, dict]):
    """Predicted loss against measured KL and dPPL, one labelled point per variant."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    names = list(points)
    for axis, key, label in ((axes[0], "kl", "measured mean KL vs unquantized"),
                             (axes[1], "dppl", "measured dPPL")):
        xs = [points[n]["predicted"] for n in names]
        ys = [points[n][key] for n in names]
        by_x = {name: rank for rank, name in enumerate(sorted(names, key=lambda n: points[n]["predicted"]))}
        for i, (name, x, y) in enumerate(zip(names, xs, ys)):
            axis.scatter([x], [y], s=55, marker=MARKERS[i % len(MARKERS)], label=name, zorder=3)
            # neighbours along x alternate above and below their point, so close labels do not overlap
            offset = (6, 5) if by_x[name] % 2 == 0 else (6, -12)
            axis.annotate(name, (x, y), textcoords="offset points", xytext=offset, fontsize=7)
        axis.set_xscale("log")
        if all(y > 0 for y in ys):
            axis.set_yscale("log")
        rho = spearman(xs, ys)
        axis.set_title(label + (f"  (Spearman {rho:.2f})" if rho is not None else ""), fontsize=10)
        axis.set_xlabel("predicted loss (sum of per-layer sensitivities)")
        axis.set_ylabel(label)
        axis.margins(x=0.3, y=0.12)
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7, loc="lower right")  # markers tell apart points too close for their labels
    figure.suptitle("Predicted vs measured loss", fontsize=11)
    return figure


def window_figure(per_window: dict[str, list[float]], base: list[float]):
    """Per-window PPL ratio to the unquantized model, one line per variant."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(10, 3.6), layout="constrained")
    ratios = {name: [p / b for p, b in zip(ppl, base)] for name, ppl in per_window.items()}
    for i, (name, ratio) in enumerate(ratios.items()):
        axis.plot(range(len(ratio)), ratio, marker=MARKERS[i % len(MARKERS)], markersize=3, linewidth=1, label=name)
    values = [r for ratio in ratios.values() for r in ratio]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        axis.set_yscale("log")  # a 2-bit variant's ratios in the thousands would flatten every other line
    axis.axhline(1.0, color="0.5", linewidth=0.8)
    axis.set_xlabel("evaluation window")
    axis.set_ylabel("PPL / unquantized PPL")
    axis.set_title("Per-window perplexity ratio")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def results_figure(rows: list[dict], title: str):
    """PPL against average bits per model, from rows of one protocol of the batch results (a line per model)."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 5))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for i, model in enumerate(models):
        mine = sorted((float(r["avg_bits"]), float(r["ppl"]), r["plan"]) for r in rows if r["model"] == model)
        axis.plot([m[0] for m in mine], [m[1] for m in mine], marker=MARKERS[i % len(MARKERS)], label=model)
        for bits, ppl, plan in mine:
            axis.annotate(plan if len(plan) < 28 else "…" + plan[-26:], (bits, ppl), textcoords="offset points",
                          xytext=(4, 4), fontsize=7)
    axis.set_yscale("log")
    axis.set_xlabel("average bits per weight (scales and zeros included)")
    axis.set_ylabel("perplexity")
    axis.set_title(f"Perplexity vs size: {title}")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    return figure
