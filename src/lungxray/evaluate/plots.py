"""Plots with class names on the axes and honest colour scales."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from lungxray.io import atomic_path  # noqa: E402


def save_figure(figure, path: Path) -> None:
    """Write `figure` to `path` atomically and free it."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    plt.close(figure)


def plot_confusion_matrix(matrix, classes: list[str], path: Path, normalized: bool = False) -> None:
    """Counts, or row-normalised shares with a 0-1 colour scale (the reference's bar showed counts)."""
    matrix = np.asarray(matrix, dtype=float)
    if normalized:
        rows = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    figure, axis = plt.subplots(figsize=(1.6 * len(classes) + 2.5, 1.4 * len(classes) + 2))
    display = ConfusionMatrixDisplay(matrix if normalized else matrix.astype(int), display_labels=classes)
    display.plot(ax=axis, cmap="Blues", values_format=".2f" if normalized else "d", colorbar=True)
    if normalized:
        display.im_.set_clim(0.0, 1.0)
    axis.set_title("Confusion matrix (row-normalised)" if normalized else "Confusion matrix (counts)")
    axis.set_xlabel("Predicted class")
    axis.set_ylabel("True class")
    save_figure(figure, path)


def plot_history(history: dict[str, list[float]], metric: str, path: Path) -> None:
    """Train and validation `metric` per epoch."""
    figure, axis = plt.subplots(figsize=(6, 4))
    epochs = np.arange(1, len(history[metric]) + 1)
    axis.plot(epochs, history[metric], marker="o", label=f"train {metric}")
    if f"val_{metric}" in history:
        axis.plot(epochs, history[f"val_{metric}"], marker="o", label=f"validation {metric}")
    axis.set_xlabel("epoch")
    axis.set_ylabel(metric)
    axis.set_title(f"{metric.capitalize()} per epoch")
    axis.grid(alpha=0.3)
    axis.legend()
    save_figure(figure, path)


def plot_roc_curves(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str], path: Path) -> None:
    """One-vs-rest ROC curve per class, AUROC in the legend."""
    from sklearn.metrics import RocCurveDisplay

    figure, axis = plt.subplots(figsize=(5.5, 5))
    for i, name in enumerate(classes):
        if 0 < (y_true == i).sum() < len(y_true):
            RocCurveDisplay.from_predictions(y_true == i, probabilities[:, i], name=name, ax=axis)
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    axis.set_title("ROC curves (one class vs the rest)")
    axis.legend(loc="lower right")
    save_figure(figure, path)


def plot_pr_curves(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str], path: Path) -> None:
    """Precision-recall curve per class, average precision in the legend."""
    from sklearn.metrics import PrecisionRecallDisplay

    figure, axis = plt.subplots(figsize=(5.5, 5))
    for i, name in enumerate(classes):
        if (y_true == i).any():
            PrecisionRecallDisplay.from_predictions(y_true == i, probabilities[:, i], name=name, ax=axis)
    axis.set_title("Precision-recall curves (one class vs the rest)")
    axis.legend(loc="lower left")
    save_figure(figure, path)


def plot_reliability(calibrations: dict[str, dict], path: Path) -> None:
    """Reliability diagram: accuracy against mean confidence per bin, for each named calibration."""
    figure, axis = plt.subplots(figsize=(5.5, 5))
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    for label, calibration in calibrations.items():
        bins = calibration["reliability"]
        axis.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                  label=f"{label} (ECE {calibration['ece']:.3f})")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("mean confidence of the predicted class")
    axis.set_ylabel("accuracy")
    axis.set_title(f"Reliability diagram ({calibrations[next(iter(calibrations))]['ece_bins']} equal-width bins)")
    axis.legend(loc="upper left")
    save_figure(figure, path)
