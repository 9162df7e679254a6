"""Drift of a window of records against the reference, after CheXstray's multi-modal concordance
(MMC): each feature is tested against the reference (Kolmogorov-Smirnov for numbers, chi-squared for
categories), each test's statistic is standardised against what windows of the same size drawn from
the reference itself give, and the standardised scores are combined with fixed weights into one score.
A window alarms when that score passes what 99% of the reference's own windows stay under.

Weights: a third each to the model's outputs, the image statistics and the acquisition attributes,
shared equally by the features of each group that both the reference and the window hold. A feature
the reference has no values for (DICOM attributes, for a run trained on PNGs) is not compared.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import special, stats

from lungxray.monitor.records import probabilities

IMAGE = ("image_mean", "image_std", "image_p05", "image_p50", "image_p95", "image_dark", "image_bright", "image_colour")
ACQUISITION_NUMBERS = ("bits_stored", "pixel_spacing_mm")
ACQUISITION_CATEGORIES = ("modality", "view_position", "manufacturer", "manufacturer_model", "photometric", "age_band",
                          "sex")
NULL_WINDOWS = 200  # windows drawn from the reference to standardise each statistic
ALARM_QUANTILE = 0.99


@dataclasses.dataclass(frozen=True)
class Feature:
    name: str
    group: str  # "outputs", "image" or "acquisition"
    kind: str  # "number" or "category"


def features(classes: list[str]) -> list[Feature]:
    outputs = [Feature(f"p_{c}", "outputs", "number") for c in classes]
    outputs += [Feature("ood_score", "outputs", "number"), Feature("set_size", "outputs", "number"),
                Feature("top_class", "outputs", "category"), Feature("analysed", "outputs", "category")]
    return (outputs + [Feature(name, "image", "number") for name in IMAGE]
            + [Feature(name, "acquisition", "number") for name in ACQUISITION_NUMBERS]
            + [Feature(name, "acquisition", "category") for name in ACQUISITION_CATEGORIES])


def columns(records: list[dict], classes: list[str]) -> dict[str, np.ndarray]:
    """Each feature's values over `records` (numbers as floats with NaN, categories as strings with
    None), the top class derived from the probabilities (the decision may be withheld)."""
    p = probabilities(records, classes)
    analysed = ~np.isnan(p).any(axis=1)
    top = np.full(len(records), None, dtype=object)
    top[analysed] = np.asarray(classes, dtype=object)[p[analysed].argmax(axis=1)]
    values: dict[str, np.ndarray] = {"top_class": top,
                                     "analysed": np.array(["yes" if a else "no" for a in analysed], dtype=object)}
    for feature in features(classes):
        if feature.name in values:
            continue
        raw = [record.get(feature.name) for record in records]
        values[feature.name] = (np.array([np.nan if v is None else float(v) for v in raw], dtype=float)
                                if feature.kind == "number" else np.array(raw, dtype=object))
    return values


def present(values: np.ndarray) -> np.ndarray:
    return values[~np.isnan(values)] if values.dtype.kind == "f" else values[values != None]  # noqa: E711


def kolmogorov_smirnov(window: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """The two-sample Kolmogorov-Smirnov D (as `scipy.stats.ks_2samp` computes it) and its
    asymptotic p-value, from SciPy's Kolmogorov distribution. Not `ks_2samp` itself: its argument
    checks and exact p-values took ~1.3 ms a call, most of the time to monitor a million records; this
    takes ~0.15 ms (tests/test_monitor.py checks it against `ks_2samp`)."""
    window, reference = np.sort(window), np.sort(reference)
    both = np.concatenate([window, reference])
    d = float(np.max(np.abs(np.searchsorted(window, both, side="right") / len(window)
                            - np.searchsorted(reference, both, side="right") / len(reference))))
    effective = len(window) * len(reference) / (len(window) + len(reference))
    return d, float(special.kolmogorov(np.sqrt(effective) * d))


def statistic(feature: Feature, window: np.ndarray, reference: np.ndarray) -> tuple[float, float] | None:
    """(statistic, p-value) of `window` against `reference`: KS's D, or chi-squared's Cramer's V;
    None when either holds no value."""
    window, reference = present(window), present(reference)
    if len(window) == 0 or len(reference) == 0:
        return None
    if feature.kind == "number":
        return kolmogorov_smirnov(window, reference)
    categories = sorted(set(window) | set(reference), key=str)
    if len(categories) < 2:
        return 0.0, 1.0
    table = np.array([[np.sum(window == c) for c in categories], [np.sum(reference == c) for c in categories]])
    chi2, p, _, _ = stats.chi2_contingency(table)
    return float(np.sqrt(chi2 / (table.sum() * (min(table.shape) - 1)))), float(p)


class DriftScorer:
    """Scores windows of records against `reference` records (`score`), standardising each feature's
    statistic by the reference's own windows of the same size."""

    def __init__(self, reference: list[dict], classes: list[str], seed: int = 0):
        self.classes, self.reference = classes, columns(reference, classes)
        self.size = len(reference)
        self.features = [f for f in features(classes) if len(present(self.reference[f.name]))]
        self.weights = weights(self.features)
        self.rng = np.random.default_rng(seed)
        self._nulls: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}

    def null(self, n: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Per feature, the mean and spread of the statistic over the reference's own windows of `n`
        records (each drawn, then compared with the rest of the reference, or drawn with replacement
        when the reference is too small to leave a rest); and the combined score's alarm threshold."""
        if n not in self._nulls:
            raw = np.array([[self._null_statistic(feature, order, n) for feature in self.features]
                            for order in (self.rng.permutation(self.size) for _ in range(NULL_WINDOWS))])
            mean, spread = raw.mean(axis=0), raw.std(axis=0) + 1e-9
            combined = ((raw - mean) / spread) @ self.weights
            self._nulls[n] = (mean, spread, float(np.quantile(combined, ALARM_QUANTILE)))
        return self._nulls[n]

    def _null_statistic(self, feature: Feature, order: np.ndarray, n: int) -> float:
        values = self.reference[feature.name]
        if 2 * n <= self.size:
            window, rest = values[order[:n]], values[order[n:]]
        else:
            window, rest = values[self.rng.integers(0, self.size, n)], values
        found = statistic(feature, window, rest)
        return found[0] if found else 0.0

    def score(self, records: list[dict]) -> dict:
        """The window's drift: each feature's statistic, p-value and standardised score, the combined
        score, its threshold and whether it alarms."""
        window = columns(records, self.classes)
        mean, spread, threshold = self.null(len(records))
        per_feature, scores = {}, np.zeros(len(self.features))
        for index, feature in enumerate(self.features):
            found = statistic(feature, window[feature.name], self.reference[feature.name])
            if found is None:
                continue
            scores[index] = (found[0] - mean[index]) / spread[index]
            per_feature[feature.name] = {"statistic": round(found[0], 5), "p_value": float(f"{found[1]:.4g}"),
                                         "score": round(float(scores[index]), 3), "group": feature.group}
        combined = float(scores @ self.weights)
        return {"combined": round(combined, 3), "threshold": round(threshold, 3), "alarm": combined > threshold,
                "features": per_feature}


def weights(chosen: list[Feature]) -> np.ndarray:
    """A third to each group present, shared equally by its features."""
    groups = sorted({f.group for f in chosen})
    counts = {g: sum(f.group == g for f in chosen) for g in groups}
    return np.array([1 / len(groups) / counts[f.group] for f in chosen])
