"""The report's PNG figures (matplotlib, Agg backend: no display needed), from plain numbers per row.

Each function writes one PNG and returns its path, or None when no row has the numbers it plots (the
report says so instead of showing an empty figure).
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, whatever the environment's default backend
import matplotlib.pyplot as plt  # noqa: E402

DPI = 110


def _grid(count: int) -> tuple[int, int]:
    cols = min(count, 3)
    return math.ceil(count / cols), cols


def _save(fig: plt.Figure, path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)  # a reader never sees half a PNG
    return path


def reliability(bins_by_row: Mapping[str, Sequence[Mapping[str, float]]], path: str) -> str | None:
    """One reliability diagram per row: accuracy against mean q per bin (fwm.calibration.reliability_bins,
    pooled over seeds), marker area by the bin's count, the diagonal for perfect calibration."""
    rows = {label: bins for label, bins in bins_by_row.items() if bins}
    if not rows:
        return None
    nrows, ncols = _grid(len(rows))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (label, bins) in zip(axes.flat, rows.items()):
        total = sum(b["count"] for b in bins)
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ax.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["accuracy"] for b in bins],
               width=[b["hi"] - b["lo"] for b in bins], alpha=0.25, color="tab:blue", edgecolor="tab:blue")
        ax.scatter([b["mean_q"] for b in bins], [b["accuracy"] for b in bins],
                   s=[20 + 200 * b["count"] / total for b in bins], color="tab:blue", zorder=3)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="q (mean in bin)", ylabel="success rate", title=label)
        ax.title.set_fontsize(9)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle("Reliability of q (every step, pooled over seeds)")
    return _save(fig, path)


def risk_coverage(curves_by_row: Mapping[str, Sequence[tuple[float, float]]], path: str) -> str | None:
    """Accuracy against coverage (the share answered when the agent answers only at q >= threshold), one line
    per row (means over seeds)."""
    rows = {label: curve for label, curve in curves_by_row.items() if curve}
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, curve in rows.items():
        ax.plot([c for c, _ in curve], [a for _, a in curve], marker="o", markersize=3, label=label)
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="coverage (share answered)", ylabel="accuracy when answering",
           title="Risk-coverage by the last step's q")
    ax.legend(fontsize=7)
    return _save(fig, path)


def rl_curves(curves_by_row: Mapping[str, Sequence[Sequence[tuple[int, float, float]]]], path: str) -> str | None:
    """Success (`correct`) and reward over RL optimiser steps, from each row's rl stage metrics.jsonl: one line
    per row and seed (seeds of a row share its colour)."""
    rows = {label: seeds for label, seeds in curves_by_row.items() if any(seeds)}
    if not rows:
        return None
    fig, (ax_success, ax_reward) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, seeds) in enumerate(rows.items()):
        colour = colours[i % len(colours)]
        for j, points in enumerate(p for p in seeds if p):
            steps = [s for s, _, _ in points]
            kwargs = {"color": colour, "label": label if j == 0 else None, "marker": "o", "markersize": 2}
            ax_success.plot(steps, [c for _, _, c in points], **kwargs)
            ax_reward.plot(steps, [r for _, r, _ in points], **kwargs)
    ax_success.set(xlabel="RL step (optimiser updates)", ylabel="success (rollout mean)", title="RL success")
    ax_reward.set(xlabel="RL step (optimiser updates)", ylabel="reward R_E (rollout mean)", title="RL reward")
    ax_success.legend(fontsize=7)
    return _save(fig, path)


def table_bars(labels: Sequence[str], metrics: Mapping[str, Sequence[tuple[float | None, float | None]]],
               path: str) -> str | None:
    """The table as grouped bars: one panel per metric (names ending in '%' hold percentages), one bar per
    row (mean over seeds, error bar the spread); rows without the metric are left out of its panel."""
    shown = {name: values for name, values in metrics.items() if any(mean is not None for mean, _ in values)}
    if not shown:
        return None
    nrows, ncols = _grid(len(shown))
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(3.2, 0.5 * len(labels) + 1.6) * ncols, 3.6 * nrows),
                             squeeze=False)
    for ax, (name, values) in zip(axes.flat, shown.items()):
        xs = [i for i, (mean, _) in enumerate(values) if mean is not None]
        ax.bar(xs, [values[i][0] for i in xs], yerr=[values[i][1] or 0.0 for i in xs], capsize=3,
               color=[plt.rcParams["axes.prop_cycle"].by_key()["color"][i % 10] for i in xs])
        top = max((values[i][0] + (values[i][1] or 0.0) for i in xs), default=0.0)
        # A metric at 0 everywhere still gets a readable axis: its whole range (percent metrics end in '%').
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), top * 1.1 if top > 0 else (100.0 if name.endswith("%") else 1.0))
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("Rows x metrics (mean over seeds, bars: spread)")
    fig.tight_layout()
    return _save(fig, path)
