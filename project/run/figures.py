"""Figures worth looking at rather than reading: confusion matrix, sample predictions, learning curves.

Plain matplotlib on numpy arrays (no pyplot, so no display or global state is needed). The
:class:`~project.run.callbacks.PredictionPlots` callback draws the first two during training; the
learning curves come from a run's ``metrics.csv`` (read by project.run.metrics_file)::

    python -m project curves runs/lenet/<run>        # writes runs/lenet/<run>/learning_curves.png
"""

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from project.run.checkpoints import write_atomically

#: Up to this many classes each cell shows its count; beyond, only the shading (the .csv has the counts).
ANNOTATED_CLASSES = 20


# Not torchmetrics' plot(): at 100 classes, 10,000 counts on a 6.4x4.8 in pyplot figure (measured: unreadable, leaks).
def confusion_matrix_figure(matrix: np.ndarray, class_names: Sequence[str], title: str = "") -> Figure:
    """Rows are true classes, columns predicted ones; each cell is shaded by the row's share and, for
    up to ANNOTATED_CLASSES classes, shows its count. The figure grows with the classes, up to 16 inches."""
    matrix = np.asarray(matrix)
    n = len(class_names)
    if matrix.shape != (n, n):
        raise ValueError(f"a confusion matrix for {n} classes must be {n}x{n}, got {matrix.shape}.")
    row_share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = min(max(4.0, 0.55 * n + 2), 16.0)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    image = ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    label_size = 10 if n <= ANNOTATED_CLASSES else 5
    ax.set_xticks(range(n), class_names, rotation=45 if n <= ANNOTATED_CLASSES else 90, ha="right", fontsize=label_size)
    ax.set_yticks(range(n), class_names, fontsize=label_size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n if n <= ANNOTATED_CLASSES else 0):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{int(matrix[i, j])}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if row_share[i, j] > 0.5 else "black",
            )
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"{title}  (accuracy {accuracy:.1%} of {int(matrix.sum())})".strip())
    fig.tight_layout()
    return fig


def prediction_grid_figure(
    images: np.ndarray, labels: Sequence[int], preds: Sequence[int], class_names: Sequence[str], title: str = ""
) -> Figure:
    """Images (N, H, W, C) in [0, 1], each captioned ``true -> predicted``, green when right and red when wrong."""
    n = len(images)
    if not n == len(labels) == len(preds):
        raise ValueError(f"{n} images need as many labels and predictions, got {len(labels)} and {len(preds)}.")
    cols = min(8, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(1.6 * cols, 1.8 * rows + 0.4))
    for k in range(rows * cols):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(np.clip(images[k], 0, 1), interpolation="nearest")
        true, pred = class_names[int(labels[k])], class_names[int(preds[k])]
        ax.set_title(f"{true}\n-> {pred}", fontsize=8, color="green" if true == pred else "red")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def learning_curves_figure(metrics: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "") -> Figure:
    """One panel per quantity (loss, acc, acc_top5, ...), with its train/val/test series against the step;
    the learning rates of all parameter groups (``lr-SGD/base``, ...) share one panel, ``lr``, on a log scale."""
    panels: dict[str, list[str]] = {}
    for key in sorted(metrics):
        quantity = "lr" if key.startswith("lr-") else key.split("/", 1)[-1].removesuffix("_step").removesuffix("_epoch")
        panels.setdefault(quantity, []).append(key)
    if not panels:
        raise ValueError("no metric columns to plot (is metrics.csv empty?).")
    panels = {q: panels[q] for q in sorted(panels, key=lambda q: (q != "loss", q))}  # loss first
    fig = Figure(figsize=(5 * len(panels), 3.6))
    for i, (quantity, keys) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key in keys:
            steps, values = metrics[key]
            ax.plot(
                steps,
                values,
                marker="o" if len(values) < 30 else None,
                markersize=3,
                label=key,
                alpha=0.5 if key.endswith("_step") else 1.0,
            )
        if quantity == "lr" and all(min(metrics[key][1], default=0) > 0 for key in keys):
            ax.set_yscale("log")  # per-layer rates may differ by orders of magnitude
        ax.set_xlabel("step")
        ax.set_title(quantity)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path, writer: str = "plots") -> Path:
    """``fig`` as a PNG at ``path``, written atomically (project.run.checkpoints.write_atomically)."""
    image = io.BytesIO()
    fig.savefig(image, dpi=100, format=Path(path).suffix.lstrip(".") or "png")
    return write_atomically(image.getbuffer(), path, writer)
