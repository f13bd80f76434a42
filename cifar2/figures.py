"""Every PNG figure the pipeline draws. Functions take plain data and write one file each."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from cifar2.outputs import atomic_path  # noqa: E402

_DPI = 110


def _save(figure: plt.Figure, path: str | Path) -> None:
    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(figure)


def gradcheck_errors(rows: Sequence[Mapping[str, Any]], path: str | Path,
                     tolerances: Mapping[str, float]) -> None:
    """Bar chart, log scale, of each case's per-layer relative errors against both references."""
    labels = [f"{row['case']} L{row['layer']}" for row in rows]
    positions = np.arange(len(rows))
    floor = 1e-18  # an exact match (error 0) still gets a visible bar on the log axis
    figure, axis = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.5))
    for offset, (key, label) in enumerate((("error_autograd", "vs autograd"),
                                           ("error_finite_diff", "vs finite differences"))):
        values = [max(row[key], floor) for row in rows]
        axis.barh(positions + (offset - 0.5) * 0.4, values, height=0.4, label=label)
    for key, style in (("autograd", ":"), ("finite_diff", "--")):
        axis.axvline(tolerances[key], color="black", linestyle=style, linewidth=1,
                     label=f"tolerance {key.replace('_', ' ')} ({tolerances[key]:g})")
    axis.set_xscale("log")
    axis.set_yticks(positions, labels)
    axis.invert_yaxis()
    axis.set_xlabel("relative error ||g_ref - g|| / (||g_ref|| + ||g||)")
    axis.set_title("Manual backpropagation: relative error per layer")
    axis.legend(fontsize="small", loc="lower right")
    _save(figure, path)


def compare_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]],
                   differences: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Plot the training loss of each run, and each run's per-epoch parameter difference to ``torch``."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"torch": "-", "manual_update": "--", "manual": ":"}
    for name, history in histories.items():
        epochs = [row["epoch"] for row in history]
        left.plot(epochs, [row["train_loss"] for row in history], styles.get(name, "-."),
                  linewidth=2 if name in styles else 1, label=name)
    left.set_xlabel("epoch")
    left.set_ylabel("training loss (cross-entropy)")
    left.set_title("Training loss")
    left.legend()

    epochs = [row["epoch"] for row in differences]
    names = [name for name in histories if name != "torch"]
    for name in names:
        values = [max(row[f"param_diff_{name}"], 1e-18) for row in differences]
        right.plot(epochs, values, marker=".", label=f"{name} vs torch")
    right.set_yscale("log")
    right.set_xlabel("epoch")
    right.set_ylabel("relative parameter difference (1e-18 = equal)")
    right.set_title("Per-epoch difference to torch")
    right.legend()
    _save(figure, path)


def learning_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                    selected: str | None = None) -> None:
    """Validation accuracy and training loss per epoch, one line per sweep configuration."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, history in histories.items():
        epochs = [row["epoch"] for row in history]
        width = 2.5 if name == selected else 1.2
        label = f"{name} (selected)" if name == selected else name
        left.plot(epochs, [row["val_accuracy"] for row in history], linewidth=width, label=label)
        right.plot(epochs, [row["train_loss"] for row in history], linewidth=width, label=label)
    left.set_xlabel("epoch")
    left.set_ylabel("validation accuracy")
    left.set_title("Validation accuracy")
    right.set_xlabel("epoch")
    right.set_ylabel("training loss (cross-entropy)")
    right.set_yscale("log")
    right.set_title("Training loss")
    right.legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    _save(figure, path)


def confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path,
                     title: str = "Test confusion matrix") -> None:
    """Confusion matrix with the count in every cell; rows are true labels, columns predicted."""
    counts = np.asarray(matrix)
    figure, axis = plt.subplots(figsize=(1.6 * len(class_names) + 1.5, 1.4 * len(class_names) + 1))
    image = axis.imshow(counts, cmap="Blues")
    for (row, column), count in np.ndenumerate(counts):
        dark_cell = image.norm(count) > 0.5  # position of the count in the colour scale
        axis.text(column, row, str(count), ha="center", va="center",
                  color="white" if dark_cell else "black", fontsize=13)
    axis.set_xticks(range(len(class_names)), class_names)
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, fraction=0.046)
    _save(figure, path)


def image_grid(images: np.ndarray, titles: Sequence[str], path: str | Path, title: str,
               columns: int = 8) -> None:
    """Grid of images ``(N, 3, H, W)`` with values in [0, 1], each with its own caption."""
    count = max(len(images), 1)
    rows = int(np.ceil(count / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.5 * columns, 1.75 * rows + 0.4),
                                squeeze=False)
    for position, axis in enumerate(axes.flat):
        axis.axis("off")
        if position < len(images):
            axis.imshow(np.clip(images[position].transpose(1, 2, 0), 0.0, 1.0),
                        interpolation="nearest")
            axis.set_title(titles[position], fontsize=7)
    if not len(images):
        axes.flat[0].text(0.5, 0.5, "no images", ha="center", va="center")
    figure.suptitle(title)
    _save(figure, path)
