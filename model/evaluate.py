"""Metrics and plots from predictions: numpy in, numbers and PNG files out.

`classification_metrics` is pure numpy so the export, serving and mobile checks can reuse it
on their own predictions; the plotting functions import matplotlib (Agg, no screen) lazily.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """int64 [C, C]: row = true class, column = predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Accuracy, loss (mean cross-entropy), per-class accuracy and the confusion matrix.

    Args:
      labels: int [N] true classes.
      probabilities: float [N, C] predicted class probabilities.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    num_classes = probabilities.shape[1]
    predictions = probabilities.argmax(axis=1)
    matrix = confusion_matrix(labels, predictions, num_classes)
    per_class_total = matrix.sum(axis=1)
    per_class = np.divide(
        np.diag(matrix), per_class_total, out=np.zeros(num_classes), where=per_class_total > 0
    )
    picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1.0)
    return {
        "accuracy": float((predictions == labels).mean()),
        "loss": float(-np.log(picked).mean()),
        "per_class_accuracy": {str(c): round(float(a), 6) for c, a in enumerate(per_class)},
        "confusion_matrix": matrix.tolist(),
        "count": int(len(labels)),
    }


def read_history(path: Path) -> list[dict[str, float]]:
    """Rows of Keras' CSVLogger file as dicts of floats (epoch as int)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = []
        for row in csv.DictReader(fh):
            parsed = {k: float(v) for k, v in row.items() if v not in ("", None)}
            parsed["epoch"] = int(parsed.get("epoch", len(rows)))
            rows.append(parsed)
    return rows


def plot_training_curves(history: Sequence[dict[str, float]], path: Path, best_epoch: int | None = None) -> None:
    """Loss and accuracy per epoch, training vs validation, best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] + 1 for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        if history and key in history[0]:
            ax_loss.plot(epochs, [row[key] for row in history], label=label)
    for key, label in (("accuracy", "train"), ("val_accuracy", "validation")):
        if history and key in history[0]:
            ax_acc.plot(epochs, [row[key] for row in history], label=label)
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        if best_epoch is not None:
            ax.axvline(best_epoch + 1, color="grey", linestyle=":", label="best epoch")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion_matrix(matrix: np.ndarray, path: Path, labels: Sequence[str], title: str) -> None:
    """The confusion matrix with counts in each cell (log colour scale to show the errors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(matrix + 1, cmap="Blues", norm=LogNorm())
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(
                j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                color="white" if matrix[i, j] > threshold else "black",
            )
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
