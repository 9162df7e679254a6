"""Evaluate a trained model on labelled data and write metrics, plots and the classification report."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from lungxray.data.records import DataError, Dataset, Record, load_dataset
from lungxray.evaluate.metrics import classification_metrics, report_text
from lungxray.evaluate.plots import plot_confusion_matrix
from lungxray.io import atomic_path, write_json, write_text
from lungxray.predict import Predictor


def select_records(dataset: Dataset, split: str | None) -> list[Record]:
    """The records to evaluate: the reference layout's `test` split by default; all images of a
    class-folder layout; a CSV's rows (of `split` when given)."""
    if split is None and dataset.layout == "splits":
        split = "test"
    if split is None:
        return dataset.records
    if not any(r.split for r in dataset.records):
        raise DataError(f"{dataset.source} has no splits; drop --split to evaluate all its images")
    records = dataset.split(split)
    if not records:
        raise DataError(f"{dataset.source} has no images in split '{split}'")
    return records


def evaluate(predictor: Predictor, data, out: Path, split: str | None = None) -> dict:
    """Predict `data` (a path or a Dataset) and write metrics.json, predictions.csv, the
    classification report and the two confusion matrices into `out`."""
    dataset = data if isinstance(data, Dataset) else load_dataset(data, classes=predictor.classes)
    records = select_records(dataset, split)
    probabilities, errors = predictor.predict_files([r.path for r in records], desc="evaluating")
    ok = ~np.isnan(probabilities).any(axis=1)
    if not ok.any():
        raise DataError(f"none of the {len(records)} images in {dataset.source} could be read")
    labels = dataset.labels(records)
    metrics = classification_metrics(labels[ok], probabilities[ok], predictor.classes)
    metrics["data"] = {"source": dataset.source, "split": split, "images": len(records),
                       "unreadable": [{"file": e.path, "reason": e.reason} for e in errors]}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions.csv", records, probabilities, predictor.classes)
    write_json(out / "metrics.json", metrics)
    write_text(out / "classification_report.txt", report_text(labels[ok], probabilities[ok], predictor.classes))
    plot_confusion_matrix(metrics["confusion_matrix"], predictor.classes, out / "confusion_matrix.png")
    plot_confusion_matrix(metrics["confusion_matrix"], predictor.classes, out / "confusion_matrix_normalized.png",
                          normalized=True)
    return metrics


def write_predictions(path: Path, records: list[Record], probabilities: np.ndarray, classes: list[str]) -> None:
    """One row per image: file, true label, predicted class, each class's probability, extra columns."""
    extra_columns = sorted({k for r in records for k in r.extra})
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "predicted", *[f"p_{c}" for c in classes], *extra_columns])
        for record, row in zip(records, probabilities):
            predicted = "" if np.isnan(row).any() else classes[int(row.argmax())]
            writer.writerow([record.file or str(record.path), record.label, predicted,
                             *["" if np.isnan(p) else f"{p:.6f}" for p in row],
                             *[record.extra.get(k, "") for k in extra_columns]])
