"""Evaluate a trained model on labelled data: metrics.json, plots, predictions and report.html."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from lungxray.data.records import Dataset, Record, extra_columns, load_dataset
from lungxray.errors import DataError
from lungxray.evaluate.metrics import (CONFORMAL_COVERAGES, calibration_metrics, classification_metrics, report_text,
                                      set_coverage)
from lungxray.evaluate.plots import (plot_confusion_matrix, plot_pr_curves, plot_reliability, plot_roc_curves)
from lungxray.evaluate.evaluation_report import write_html_report
from lungxray.evaluate.schema import METRICS_FILE, Metrics
from lungxray.infer.predictor import Predictor
from lungxray.io import atomic_path, write_json, write_text
from lungxray.parallel import bounded_map, progress


CLASSIFICATION_REPORT = "classification_report.txt"
HTML_REPORT = "report.html"
PREDICTIONS = "predictions.csv"
MIN_GROUP_SIZE = 30  # below this a subgroup's numbers are flagged as too small to mean much
# The region blacked out by the lung-occlusion test, as fractions of (top, left, bottom, right):
# on a PA chest film it covers both lung fields and the heart, and leaves the borders, corners and
# any burned-in text at the edges visible.
OCCLUDED_BOX = (0.10, 0.15, 0.90, 0.85)


def select_records(dataset: Dataset, split: str | None) -> list[Record]:
    """The records to evaluate: the reference layout's `test` split by default; all images of a
    class-folder layout; a CSV's rows (of `split` when given)."""
    if split is None and dataset.layout == "splits":
        split = "test"
    if split is None:
        return dataset.records
    if not any(r.split for r in dataset.records):
        raise DataError(f"{dataset.origin} has no splits; drop --split to evaluate all its images")
    records = dataset.split(split)
    if not records:
        raise DataError(f"{dataset.origin} has no images in split '{split}'")
    return records


def evaluate(predictor: Predictor, data, out: Path, split: str | None = None, by: list[str] = (),
             title: str | None = None, resamples: int = 1000, occlude_lungs: bool = False) -> Metrics:
    """Predict `data` (a path or a Dataset), score it, and write everything into `out`."""
    dataset = data if isinstance(data, Dataset) else load_dataset(data, classes=predictor.classes)
    records = select_records(dataset, split)
    missing = [c for c in by if not any(c in r.extra for r in records)]
    if missing:
        available = extra_columns(records)
        raise DataError(f"--by {missing[0]}: no such column in {dataset.origin}; available: {available or 'none'}")
    predictions = predictor.predict_files([r.path for r in records], desc="evaluating")
    ok = ~np.isnan(predictions.probabilities).any(axis=1)
    if not ok.any():
        raise DataError(f"none of the {len(records)} images in {dataset.origin} could be read")
    labels, classes = dataset.labels(records), predictor.classes
    y, p, raw = labels[ok], predictions.probabilities[ok], predictions.raw[ok]

    metrics = classification_metrics(y, p, classes, resamples=resamples)
    metrics["calibration"]["temperature"] = predictor.temperature
    metrics["calibration_before_scaling"] = calibration_metrics(y, raw)
    metrics["data"] = {"source": dataset.origin, "split": split, "images": len(records), "scored": int(ok.sum()),
                       "counts": {c: int((y == i).sum()) for i, c in enumerate(classes)},
                       "unreadable": [{"file": e.path, "reason": e.reason} for e in predictions.errors]}
    metrics["overlap_with_training"] = training_overlap(predictor, records, predictions.hashes)
    if predictions.ood is not None:
        metrics["ood"] = {"flagged": int(predictions.ood[ok].sum()), "flag_rate": float(predictions.ood[ok].mean()),
                          "threshold": predictor.ood.threshold,
                          "note": "share of these images the out-of-distribution gate flags; on data like the "
                                  "training data this is the false-alarm rate (about 1% by construction)"}
    flags = None if predictions.ood is None else predictions.ood[ok]
    sets = ({coverage: predictor.conformal.sets(raw, coverage) for coverage in CONFORMAL_COVERAGES}
            if predictor.conformal is not None else None)
    if sets is not None:
        metrics["conformal"] = {f"{c:.2f}": set_coverage(y, s, classes, c) for c, s in sets.items()}
    metrics["subgroups"] = {column: subgroup_metrics([r for r, k in zip(records, ok) if k], y, p, classes, column,
                                                     resamples, flags, sets)
                            for column in by}
    if occlude_lungs:
        metrics["occlusion"] = occlusion_test(predictor, [r for r, k in zip(records, ok) if k], y, metrics["accuracy"])

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / PREDICTIONS, records, predictions.probabilities, classes)
    write_json(out / METRICS_FILE, metrics)
    write_text(out / CLASSIFICATION_REPORT, report_text(y, p, classes))
    plot_confusion_matrix(metrics["confusion_matrix"], classes, out / "confusion_matrix.png")
    plot_confusion_matrix(metrics["confusion_matrix"], classes, out / "confusion_matrix_normalized.png", normalized=True)
    plot_roc_curves(y, p, classes, out / "roc_curves.png")
    plot_pr_curves(y, p, classes, out / "pr_curves.png")
    plot_reliability({"before temperature scaling": metrics["calibration_before_scaling"],
                      f"after (T = {predictor.temperature:.2f})": metrics["calibration"]}, out / "reliability.png")
    write_html_report(out / HTML_REPORT, metrics, predictor.info, title or f"Evaluation on {dataset.origin}")
    return metrics


def occlude(images: np.ndarray, box=OCCLUDED_BOX) -> np.ndarray:
    """Black out the central chest region of a batch of (N, H, W, 3) images."""
    height, width = images.shape[1:3]
    top, left, bottom, right = box
    occluded = images.copy()
    occluded[:, int(top * height):int(bottom * height), int(left * width):int(right * width)] = 0
    return occluded


def occlusion_test(predictor: Predictor, records: list[Record], y: np.ndarray, accuracy: float,
                   batch_size: int = 64) -> dict:
    """Accuracy when the lungs are hidden. A model that still scores well without seeing the lungs
    is reading something else: text, markers, borders, the patient's size."""
    predicted = []
    images = bounded_map(lambda r: predictor.read(r.path), records)
    for start in progress(range(0, len(records), batch_size), -(-len(records) // batch_size), "occluded", "batches"):
        batch = np.stack([next(images) for _ in range(min(batch_size, len(records) - start))])
        predicted.append(predictor.predict_images(occlude(batch)).probabilities.argmax(axis=1))
    occluded_accuracy = float(np.mean(np.concatenate(predicted) == y))
    chance = float(np.bincount(y).max() / len(y))
    return {"box": list(OCCLUDED_BOX), "accuracy": accuracy, "accuracy_occluded": occluded_accuracy,
            "majority_class_accuracy": chance, "share_retained": occluded_accuracy / accuracy if accuracy else None}


def training_overlap(predictor: Predictor, records: list[Record], hashes: list[str | None]) -> dict:
    """How many evaluated images are byte-identical to a training image (by content hash)."""
    if predictor.train_hashes is None:
        return {"known": False, "note": "the model's training images are not recorded (no train_hashes.txt)"}
    shared = [r.file or str(r.path) for r, h in zip(records, hashes) if h and h in predictor.train_hashes]
    return {"known": True, "images": len(shared), "share": len(shared) / max(1, len(records)), "files": shared[:50],
            "method": "SHA-256 of file contents; re-encoded or resized copies are not caught (see `lungxray data audit`)"}


def conformal_lines(metrics: dict) -> list[str]:
    """The conformal sets' coverage, and plainly where it broke (overall, or in a subgroup)."""
    lines = []
    for nominal, result in metrics.get("conformal", {}).items():
        per_class = ", ".join(f"{c} {m['coverage']:.3f}" for c, m in result["per_class"].items() if m["coverage"] is not None)
        lines.append(f"conformal sets at {nominal}: coverage {result['coverage']:.3f} ({per_class}), "
                     f"mean set size {result['mean_set_size']:.2f}")
        broken = [f"{c} overall" for c in result["below_nominal"]]
        for column, groups in metrics.get("subgroups", {}).items():
            broken += [f"{c} in {column}={value}" for value, group in groups.items()
                       for c in group.get("conformal", {}).get(nominal, {}).get("below_nominal", [])
                       if not group["too_small"]]
        if broken:
            lines.append(f"warning: at {nominal} the sets do not hold their promise for {'; '.join(broken)}: "
                         "these images do not come like the validation images (another hospital?)")
    return lines


def subgroup_metrics(records: list[Record], y: np.ndarray, p: np.ndarray, classes: list[str], column: str,
                     resamples: int, ood_flags: np.ndarray | None = None, sets: dict | None = None) -> dict:
    """Every metric per value of `column`, with the share the out-of-distribution gate flagged and
    the conformal sets' coverage (`sets`: coverage -> (n, k) booleans)."""
    groups: dict[str, dict] = {}
    values = np.array([r.extra.get(column, "") for r in records])
    for value in sorted(set(values)):
        members = values == value
        group = classification_metrics(y[members], p[members], classes, resamples=resamples)
        group["counts"] = {c: int((y[members] == i).sum()) for i, c in enumerate(classes)}
        group["too_small"] = bool(members.sum() < MIN_GROUP_SIZE)
        if ood_flags is not None:
            group["ood_flag_rate"] = float(ood_flags[members].mean())
        if sets is not None:
            group["conformal"] = {f"{c:.2f}": set_coverage(y[members], s[members], classes, c) for c, s in sets.items()}
        groups[value or "(empty)"] = group
    return groups


def write_predictions(path: Path, records: list[Record], probabilities: np.ndarray, classes: list[str]) -> None:
    """One row per image: file, true label, predicted class, each class's probability, extra columns."""
    columns = extra_columns(records)
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "predicted", *[f"p_{c}" for c in classes], *columns])
        for record, row in zip(records, probabilities):
            predicted = "" if np.isnan(row).any() else classes[int(row.argmax())]
            writer.writerow([record.file or str(record.path), record.label, predicted,
                             *["" if np.isnan(v) else f"{v:.6f}" for v in row],
                             *[record.extra.get(k, "") for k in columns]])
