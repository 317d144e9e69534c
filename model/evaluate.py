"""Metrics and plots from predictions: numpy in, numbers and PNG files out.

`classification_metrics` is pure numpy so the export, serving and mobile checks can reuse it
on their own predictions; so are `expected_calibration_error` and `fit_temperature` (the
calibration the training applies); the plotting functions import matplotlib (Agg, no screen)
lazily.
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


ECE_BINS = 15  # Guo et al. (2017) report ECE with 15 equal-width confidence bins


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-class confidence (Naeini et al., AAAI 2015; the
    form of Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, eq. 3).

    Predictions are grouped by confidence (the largest probability) into `bins` equal-width
    bins (lo, hi] over [0, 1]; ECE = sum over bins of (n_bin / N) * |accuracy - mean
    confidence|. 0 is perfect; a model right 99% of the time whose confidence is always
    1.0 has ECE 0.01.

    Args:
      labels: int [N] true classes.
      probabilities: float [N, C], rows summing to 1.
      bins: number of bins (>= 1).
    Returns a float in [0, 1]. Raises ValueError for mismatched or empty inputs.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or len(probabilities) != len(labels) or not len(labels) or bins < 1:
        raise ValueError(f"need labels [N] and probabilities [N, C], N >= 1; got {labels.shape} and {probabilities.shape}")
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    # Bin b holds confidences in (b / bins, (b + 1) / bins]; confidence 0 joins bin 0.
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    gap = np.bincount(which, weights=correct - confidence, minlength=bins)  # sum of (acc - conf)
    return float(np.abs(gap).sum() / len(labels))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, iterations: int = 50) -> float:
    """The temperature T > 0 minimising the mean cross-entropy of softmax(logits / T).

    Temperature scaling (Guo et al., ICML 2017, section 4.2): one scalar fitted on held-out
    data (here the validation split, never the test set). It changes no prediction (the
    argmax is the same), only how confident the probabilities are. Newton's method on
    beta = 1 / T, where the loss is convex: d/dbeta = mean(E_p[z] - z_y), d2/dbeta2 =
    mean(Var_p[z]) >= 0.

    Args:
      logits: float [N, C] (the model's pre-softmax outputs at T = 1).
      labels: int [N].
    Returns T as a float. Raises ValueError for mismatched or empty inputs.
    """
    z = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or len(z) != len(labels) or not len(labels):
        raise ValueError(f"need logits [N, C] and labels [N], N >= 1; got {z.shape} and {labels.shape}")
    picked = z[np.arange(len(labels)), labels]
    beta = 1.0
    for _ in range(iterations):
        scaled = beta * z
        p = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        mean_z = (p * z).sum(axis=1)
        gradient = float((mean_z - picked).mean())
        curvature = float(((p * z * z).sum(axis=1) - mean_z ** 2).mean())
        if curvature <= 1e-12:
            break
        # Newton step, kept within a factor of 2 so a flat start cannot overshoot.
        step = float(np.clip(gradient / curvature, -beta, beta / 2))  # beta at most x2 or /2
        beta -= step
        if abs(step) < 1e-7 * beta:
            break
    return float(1.0 / beta)


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


def plot_reliability(labels: np.ndarray, probabilities: dict[str, np.ndarray], path: Path, bins: int = ECE_BINS) -> None:
    """Reliability diagram: accuracy against mean confidence per confidence bin, one curve
    per entry of `probabilities` (name -> float [N, C]), with each one's ECE in the legend.
    Only the top 30% of the confidence axis is drawn: a good MNIST model lives there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for name, probs in probabilities.items():
        probs = np.asarray(probs, dtype=np.float64)
        confidence = probs.max(axis=1)
        correct = probs.argmax(axis=1) == labels
        which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
        count = np.bincount(which, minlength=bins)
        used = count > 0
        mean_conf = np.bincount(which, weights=confidence, minlength=bins)[used] / count[used]
        accuracy = np.bincount(which, weights=correct, minlength=bins)[used] / count[used]
        ece = expected_calibration_error(labels, probs, bins)
        ax.plot(mean_conf, accuracy, marker="o", label=f"{name} (ECE {ece:.4f})")
    ax.set_xlim(0.7, 1.0)
    ax.set_ylim(0.7, 1.0)
    ax.set_xlabel("mean confidence in the bin")
    ax.set_ylabel("accuracy in the bin")
    ax.set_title(f"Reliability, test set ({bins} bins)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
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
