"""Model selection over the sweep and the scores of the selected model on the test set."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from cifar2.errors import SelectionError


def select_best(results: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """Pick the configuration with the highest final validation accuracy.

    Diverged configurations and those without a finite validation accuracy are excluded. Ties go
    to the lower final validation loss, then to the configuration listed first in the sweep, so
    the choice never depends on file order or floating-point noise in unrelated columns.

    Raises:
        SelectionError: when no configuration is eligible.
    """
    eligible = [
        (position, result) for position, result in enumerate(results)
        if not result["diverged"] and result["val_accuracy"] is not None
        and math.isfinite(result["val_accuracy"])
    ]
    if not eligible:
        names = ", ".join(str(result["name"]) for result in results) or "none"
        raise SelectionError(f"Every sweep configuration diverged or has no validation accuracy "
                             f"({names}). Lower train.lr, or the lr or weight_decay of the "
                             "entries in sweep.configs, and run the sweep again.")

    def rank(item: tuple[int, Mapping[str, Any]]) -> tuple[float, float, int]:
        position, result = item
        val_loss = result.get("val_loss")
        loss = val_loss if val_loss is not None and math.isfinite(val_loss) else math.inf
        return (-result["val_accuracy"], loss, position)

    return min(eligible, key=rank)[1]


def classification_scores(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision and recall, and the confusion matrix (rows true, columns predicted)."""
    labels = list(range(len(class_names)))
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, _, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float((y_true == y_pred).mean()),
        "n_samples": int(len(y_true)),
        "per_class": {
            name: {"precision": float(precision[k]), "recall": float(recall[k]),
                   "support": int(support[k])}
            for k, name in enumerate(class_names)
        },
        "confusion_matrix": matrix.tolist(),
    }


def confusion_records(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> list[dict[str, str]]:
    """One ``{"actual", "predicted"}`` record per sample, the input of DVC's ``confusion`` template."""
    return [{"actual": class_names[t], "predicted": class_names[p]}
            for t, p in zip(y_true.tolist(), y_pred.tolist())]
