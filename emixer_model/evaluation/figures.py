"""The evaluation's PNG figures, drawn with matplotlib's object API and the Agg canvas.

No pyplot: figures are never shown and no global backend state is touched, so the CLI, tests and
a notebook importing this module do not interfere. Missing values (None) are drawn as "n/a".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110)
    return path


def grouped_bars(
    path: Path,
    title: str,
    categories: Sequence[str],
    series: Mapping[str, Sequence[Mapping]],
    ylabel: str,
    reference_line: float | None = None,
) -> Path:
    """One group of bars per category, one bar per series of figures ({"value", "low", "high"}),
    with the interval as an error bar; undefined values are labelled n/a."""
    figure = Figure(figsize=(max(5.0, 1.1 * len(categories) + 2.0), 4.0))
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(series))
    x = np.arange(len(categories))
    for i, (name, entries) in enumerate(series.items()):
        offsets = x - 0.4 + width * (i + 0.5)
        heights = np.array([np.nan if e["value"] is None else e["value"] for e in entries])
        spans = np.array(
            [
                [h - e["low"], e["high"] - h] if e["low"] is not None else [np.nan, np.nan]
                for h, e in zip(heights, entries, strict=True)
            ]
        ).reshape(-1, 2)
        axes.bar(offsets, heights, width=width, label=name, yerr=spans.T, capsize=2)
        for offset, height in zip(offsets, heights, strict=True):
            if np.isnan(height):
                axes.text(offset, 0.02, "n/a", ha="center", va="bottom", rotation=90, fontsize=7)
    if reference_line is not None:
        axes.axhline(reference_line, color="grey", linestyle="--", linewidth=1)
    axes.set_xticks(x, categories, rotation=30, ha="right")
    axes.set_ylim(0.0, 1.05)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=8)
    return _save(figure, path)


def training_curves(path: Path, sites: Mapping[str, Mapping]) -> Path:
    """Cumulative epsilon per round, one line per site, from the manifest's signed privacy
    history (and any loss a history carries; a release carries none: losses stay at the sites)."""
    histories = {name: site.get("history") or [] for name, site in sites.items()}
    loss_names = sorted(
        {k for h in histories.values() for entry in h for k in entry.get("losses", {})}
    )
    panels = ["epsilon", *loss_names]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(4.0 * columns, 3.0 * rows))
    for index, panel in enumerate(panels, start=1):
        axes = figure.add_subplot(rows, columns, index)
        for name, history in sorted(histories.items()):
            points = [
                (
                    entry["round"],
                    entry["epsilon"] if panel == "epsilon" else entry.get("losses", {})[panel],
                )
                for entry in history
                if panel == "epsilon" or panel in entry.get("losses", {})
            ]
            if points:
                rounds, values = zip(*points, strict=True)
                axes.plot(rounds, values, marker="o", label=name)
        axes.set_title("cumulative epsilon" if panel == "epsilon" else f"loss: {panel}")
        axes.set_xlabel("round")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not any(histories.values()):
            axes.text(
                0.5,
                0.5,
                "no training history in the manifest",
                ha="center",
                transform=axes.transAxes,
            )
        elif index == 1:
            axes.legend(fontsize=8)
    return _save(figure, path)


def image_grid(path: Path, images: np.ndarray, captions: Sequence[str], columns: int = 6) -> Path:
    """Images [N,R,R] in [-1,1] in a grid, each titled with its caption (e.g. its labels)."""
    rows = max(1, -(-len(images) // columns))
    figure = Figure(figsize=(2.0 * columns, 2.3 * rows))
    for index, (image, caption) in enumerate(zip(images, captions, strict=True), start=1):
        axes = figure.add_subplot(rows, columns, index)
        axes.imshow(image, cmap="gray", vmin=-1.0, vmax=1.0)
        axes.set_title(caption, fontsize=7, wrap=True)
        axes.axis("off")
    return _save(figure, path)
