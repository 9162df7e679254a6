"""Metrics a reviewer asks for, from scikit-learn, in the shape `metrics.json` stores them.

Every run's metrics.json has the same names: overall `accuracy`, `balanced_accuracy`, `macro_f1`,
`macro_auroc`; per class `precision`/`ppv`, `recall`/`sensitivity`, `specificity`, `npv`, `f1`,
`support`, `auroc`, `average_precision`; `confusion_matrix` (rows true, columns predicted);
`calibration`; and `intervals` (stratified bootstrap 95% CIs).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (accuracy_score, average_precision_score, classification_report,
                             confusion_matrix, f1_score, log_loss, multilabel_confusion_matrix,
                             roc_auc_score)

ECE_BINS = 15
BOOTSTRAP_RESAMPLES = 1000


def _safe_auroc(y_true_binary: np.ndarray, scores: np.ndarray) -> float | None:
    """AUROC, or None when only one class is present (it is undefined then)."""
    if y_true_binary.min() == y_true_binary.max():
        return None
    return float(roc_auc_score(y_true_binary, scores))


def per_class_metrics(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    labels = list(range(len(classes)))
    # One 2x2 matrix per class, one class against the rest: [[tn, fp], [fn, tp]].
    matrices = multilabel_confusion_matrix(y_true, probabilities.argmax(axis=1), labels=labels)
    ratio = lambda a, b: float(a / b) if b else 0.0  # noqa: E731
    table = {}
    for i, name in enumerate(classes):
        (tn, fp), (fn, tp) = matrices[i]
        precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
        positives = (y_true == i).astype(int)
        table[name] = {
            "precision": precision, "recall": recall,
            "f1": ratio(2 * precision * recall, precision + recall),
            "support": int(tp + fn),
            "sensitivity": recall, "specificity": ratio(tn, tn + fp), "ppv": precision, "npv": ratio(tn, tn + fn),
            "auroc": _safe_auroc(positives, probabilities[:, i]),
            "average_precision": float(average_precision_score(positives, probabilities[:, i])) if positives.any() else None,
        }
    return table


def macro_auroc(y_true: np.ndarray, probabilities: np.ndarray) -> float | None:
    values = [_safe_auroc((y_true == i).astype(int), probabilities[:, i]) for i in range(probabilities.shape[1])]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def pairwise_auroc(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, float | None]:
    """For each pair of classes a, b: among images of class a or b, how well p(b) / (p(a) + p(b))
    ranks the b images above the a images ("covid_vs_pneumonia": can the model tell pneumonia
    from covid, whatever it thinks of the other classes)."""
    table = {}
    for a in range(len(classes)):
        for b in range(a + 1, len(classes)):
            members = (y_true == a) | (y_true == b)
            pair = probabilities[members][:, [a, b]]
            score = pair[:, 1] / np.maximum(pair.sum(axis=1), 1e-12)
            table[f"{classes[a]}_vs_{classes[b]}"] = _safe_auroc((y_true[members] == b).astype(int), score) \
                if members.any() else None
    return table


def _clip_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Keep log-loss finite for a confident mistake, rows still summing to one."""
    clipped = np.clip(probabilities.astype(np.float64), 1e-7, 1.0)
    return clipped / clipped.sum(axis=1, keepdims=True)


def calibration_metrics(y_true: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> dict:
    """ECE (top-label confidence, `bins` equal-width bins, weighted by bin size), multi-class Brier
    score (mean over images of the summed squared error), and negative log-likelihood."""
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    reliability, ece = [], 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            gap = abs(correct[members].mean() - confidence[members].mean())
            ece += members.mean() * gap
            reliability.append({"bin": [float(edges[b]), float(edges[b + 1])], "count": int(members.sum()),
                                "confidence": float(confidence[members].mean()),
                                "accuracy": float(correct[members].mean())})
    one_hot = np.eye(probabilities.shape[1])[y_true]
    return {
        "ece": float(ece), "ece_bins": bins, "ece_binning": "equal-width bins of top-label confidence",
        "brier": float(np.mean(np.sum((probabilities - one_hot) ** 2, axis=1))),
        "nll": float(log_loss(y_true, _clip_probabilities(probabilities), labels=list(range(probabilities.shape[1])))),
        "reliability": reliability,
    }


def headline(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, float | None]:
    """The numbers the bootstrap gives intervals for (None where undefined); tests check every value
    equals scikit-learn's."""
    values = headlines(y_true[None], probabilities[None], classes)
    return {key: None if np.isnan(v[0]) else float(v[0]) for key, v in values.items()}


def headlines(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, np.ndarray]:
    """`headline` of many label sets at once: `y_true` (sets, images), `probabilities` (sets, images,
    classes); each value an array over the sets, NaN where undefined.

    From confusion matrices and rank sums (Mann-Whitney U), all sets in one array operation: a
    bootstrap of 1,000 resamples is a few array operations, not 1,000 calls."""
    sets, n = y_true.shape
    k = len(classes)
    y_pred = probabilities.argmax(axis=2)
    cells = (np.arange(sets)[:, None] * k + y_true) * k + y_pred
    matrix = np.bincount(cells.ravel(), minlength=sets * k * k).reshape(sets, k, k).astype(float)
    tp = np.diagonal(matrix, axis1=1, axis2=2)
    support, predicted = matrix.sum(axis=2), matrix.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        aurocs = np.empty((sets, k))
        for i in range(k):
            positives = y_true == i
            n_pos = positives.sum(axis=1)
            ranks = rankdata(probabilities[:, :, i], axis=1)
            u = (ranks * positives).sum(axis=1) - n_pos * (n_pos + 1) / 2
            aurocs[:, i] = np.where((n_pos > 0) & (n_pos < n), u / (n_pos * (n - n_pos)), np.nan)
    defined = ~np.isnan(aurocs)
    values = {"accuracy": tp.sum(axis=1) / n, "macro_f1": f1.mean(axis=1),
              "macro_auroc": np.where(defined.any(axis=1), np.nansum(aurocs, axis=1) / np.maximum(defined.sum(axis=1), 1),
                                      np.nan)}
    for i, name in enumerate(classes):
        values[f"sensitivity/{name}"] = np.where(support[:, i] > 0, recall[:, i], np.nan)
        values[f"auroc/{name}"] = aurocs[:, i]
    return values


def stratified_resamples(y_true: np.ndarray, resamples: int, seed: int):
    """Index arrays, each drawing with replacement within every true class (class counts kept)."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y_true == c) for c in np.unique(y_true)]
    for _ in range(resamples):
        yield np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])


def interval(point: float | None, draws: np.ndarray) -> dict:
    """{"value": point, "ci95": [2.5th, 97.5th percentile of the defined (not NaN) draws]}."""
    defined = np.asarray(draws, dtype=float)
    defined = defined[~np.isnan(defined)]
    return {"value": point, "ci95": [float(np.percentile(defined, 2.5)), float(np.percentile(defined, 97.5))]
            if defined.size else None}


BOOTSTRAP_CHUNK_VALUES = 4_000_000  # resampled probabilities held at once (float64: 32 MB)


def bootstrap_draws(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str], resamples: int,
                    seed: int) -> dict[str, np.ndarray]:
    """`headlines` of `resamples` stratified resamples: metric name -> array over the resamples."""
    step = max(1, BOOTSTRAP_CHUNK_VALUES // max(1, probabilities.size))
    draws = stratified_resamples(y_true, resamples, seed)
    chunks = []
    for start in range(0, resamples, step):
        rows = np.stack([next(draws) for _ in range(min(step, resamples - start))])
        chunks.append(headlines(y_true[rows], probabilities[rows], classes))
    return {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}


def bootstrap_intervals(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str],
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Percentile 95% intervals of `headline` metrics under stratified bootstrap resampling."""
    point = headline(y_true, probabilities, classes)
    draws = bootstrap_draws(y_true, probabilities, classes, resamples, seed)
    return {key: interval(point[key], draws[key]) for key in point}


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str],
                           resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Everything metrics.json holds about predictions `probabilities` for labels `y_true`."""
    labels = list(range(len(classes)))
    y_pred = probabilities.argmax(axis=1)
    metrics = {
        "classes": list(classes),
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # Mean recall over the classes present (scikit-learn's definition, without its warning
        # when a subgroup lacks a class that is still predicted).
        "balanced_accuracy": float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)])),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "macro_auroc": macro_auroc(y_true, probabilities),
        "pairwise_auroc": pairwise_auroc(y_true, probabilities, classes),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "per_class": per_class_metrics(y_true, probabilities, classes),
        "calibration": calibration_metrics(y_true, probabilities),
    }
    if resamples:
        metrics["intervals"] = bootstrap_intervals(y_true, probabilities, classes, resamples, seed)
        metrics["bootstrap"] = {"resamples": resamples, "seed": seed, "method": "stratified by true class, percentile"}
    return metrics


def report_text(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> str:
    return classification_report(y_true, probabilities.argmax(axis=1), labels=list(range(len(classes))),
                                 target_names=classes, digits=3, zero_division=0)


CONFORMAL_COVERAGES = (0.9, 0.95)
COVERAGE_SLACK = 0.02  # how far below nominal a class's coverage may fall before the report says so


def set_coverage(y_true: np.ndarray, sets: np.ndarray, classes: list[str], coverage: float) -> dict:
    """Empirical coverage (the true class in the set) and mean set size, overall and per class,
    with the classes whose coverage fell more than COVERAGE_SLACK below `coverage`."""
    covered, sizes = sets[np.arange(len(y_true)), y_true], sets.sum(axis=1)
    per_class = {c: {"n": int((y_true == i).sum()),
                     "coverage": float(covered[y_true == i].mean()) if (y_true == i).any() else None,
                     "mean_set_size": float(sizes[y_true == i].mean()) if (y_true == i).any() else None}
                 for i, c in enumerate(classes)}
    return {"nominal": coverage, "coverage": float(covered.mean()), "mean_set_size": float(sizes.mean()),
            "empty_share": float((sizes == 0).mean()), "all_classes_share": float((sizes == len(classes)).mean()),
            "per_class": per_class,
            "below_nominal": [c for c, m in per_class.items()
                              if m["coverage"] is not None and m["coverage"] < coverage - COVERAGE_SLACK]}
