"""Shortcut probes: can frozen backbone features tell a nuisance variable (hospital, age group)
within a single class? If "which source" is predictable from the picture when the diagnosis is
held fixed, a classifier can learn the source instead of the disease."""

from __future__ import annotations

import collections

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lungxray.data.records import Dataset
from lungxray.errors import DataError
from lungxray.model.features import FeatureExtractor

MIN_PER_VALUE = 10  # values with fewer images in a class are left out of that class's probe


def probe(dataset: Dataset, column: str, extractor: FeatureExtractor, seed: int = 0) -> dict:
    if not any(column in r.extra for r in dataset.records):
        raise DataError(f"--by {column}: no such column in {dataset.origin}; probes need a manifest CSV")
    extraction = extractor.extract([r.path for r in dataset.records], desc="probe features")
    features = extraction.vectors["orig"]
    result = {"column": column, "classes": {}}
    for label in dataset.classes:
        rows = [i for i, r in enumerate(dataset.records)
                if r.label == label and r.extra.get(column) and not np.isnan(features[i]).any()]
        counts = collections.Counter(dataset.records[i].extra[column] for i in rows)
        values = sorted(v for v, n in counts.items() if n >= MIN_PER_VALUE)
        rows = [i for i in rows if dataset.records[i].extra[column] in values]
        entry = {"counts": dict(counts), "values_probed": values}
        if len(values) < 2:
            entry["note"] = f"fewer than two values with >= {MIN_PER_VALUE} images: nothing to probe"
        else:
            y = np.array([values.index(dataset.records[i].extra[column]) for i in rows])
            folds = StratifiedKFold(n_splits=min(5, int(np.bincount(y).min())), shuffle=True, random_state=seed)
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
            predicted = cross_val_predict(model, features[rows], y, cv=folds)
            majority = np.bincount(y).max() / len(y)
            entry.update({"n": len(rows), "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
                          "chance_balanced_accuracy": 1 / len(values),
                          "accuracy": float(np.mean(predicted == y)), "majority_baseline_accuracy": float(majority)})
        result["classes"][label] = entry
    return result


def format_probe(result: dict) -> str:
    lines = [f"Can backbone features predict '{result['column']}' within each class? "
             "(5-fold cross-validated logistic regression)", "",
             "| class | n | values | balanced accuracy | chance | accuracy | majority baseline |",
             "|---|---|---|---|---|---|---|"]
    for label, e in result["classes"].items():
        if "balanced_accuracy" not in e:
            lines.append(f"| {label} | | {', '.join(e['counts'])} | {e['note']} | | | |")
            continue
        lines.append(f"| {label} | {e['n']} | {', '.join(e['values_probed'])} | {e['balanced_accuracy']:.3f} | "
                     f"{e['chance_balanced_accuracy']:.3f} | {e['accuracy']:.3f} | {e['majority_baseline_accuracy']:.3f} |")
    return "\n".join(lines)
