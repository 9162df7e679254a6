import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from lungxray.model.calibration import apply_temperature, fit_temperature
from lungxray.evaluate.metrics import (bootstrap_intervals, calibration_metrics, classification_metrics, headline,
                                       per_class_metrics)

CLASSES = ["a", "b", "c"]


def one_hot_probabilities(predicted, k=3, confidence=0.8):
    p = np.full((len(predicted), k), (1 - confidence) / (k - 1))
    p[np.arange(len(predicted)), predicted] = confidence
    return p


def test_per_class_metrics_by_hand():
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 1, 0, 2, 2, 1])
    table = per_class_metrics(y_true, one_hot_probabilities(y_pred), CLASSES)
    # class a: TP 3, FN 1, FP 1, TN 5
    assert table["a"]["sensitivity"] == pytest.approx(3 / 4)
    assert table["a"]["specificity"] == pytest.approx(5 / 6)
    assert table["a"]["ppv"] == pytest.approx(3 / 4)
    assert table["a"]["npv"] == pytest.approx(5 / 6)
    # class b: TP 2, FN 1, FP 2, TN 5
    assert table["b"]["sensitivity"] == pytest.approx(2 / 3)
    assert table["b"]["specificity"] == pytest.approx(5 / 7)
    assert table["b"]["ppv"] == pytest.approx(2 / 4)
    assert table["b"]["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert table["c"]["support"] == 3 and table["c"]["ppv"] == 1.0


def test_headline_equals_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    p = rng.dirichlet([1, 1, 1], 300)
    p[np.arange(300), y] += 0.4
    p /= p.sum(axis=1, keepdims=True)
    p[:10] = p[10:20]  # ties in scores
    h = headline(y, p, CLASSES)
    assert h["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))
    assert h["macro_f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    for i, c in enumerate(CLASSES):
        assert h[f"auroc/{c}"] == pytest.approx(roc_auc_score(y == i, p[:, i]))
    assert h["macro_auroc"] == pytest.approx(np.mean([roc_auc_score(y == i, p[:, i]) for i in range(3)]))


def test_bootstrap_intervals_cover_at_roughly_the_nominal_rate():
    """Draw test sets from a known population; the 95% interval should hold the true accuracy ~95% of the time."""
    true_accuracy, n, trials, covered = 0.8, 200, 100, 0
    rng = np.random.default_rng(1)
    for trial in range(trials):
        y = np.repeat([0, 1, 2], n // 3 + 1)[:n]
        correct = rng.random(n) < true_accuracy
        y_pred = np.where(correct, y, (y + rng.integers(1, 3, n)) % 3)
        entry = bootstrap_intervals(y, one_hot_probabilities(y_pred), CLASSES, resamples=200, seed=trial)["accuracy"]
        covered += entry["ci95"][0] <= true_accuracy <= entry["ci95"][1]
    assert 0.85 <= covered / trials <= 1.0


def test_perfectly_calibrated_predictor_has_ece_near_zero():
    rng = np.random.default_rng(2)
    n = 20000
    p = rng.dirichlet([2, 2, 2], n)
    y = np.array([rng.choice(3, p=row) for row in p])  # labels drawn from the predicted probabilities
    calibration = calibration_metrics(y, p)
    assert calibration["ece"] < 0.02
    overconfident = apply_temperature(p, 0.3)
    assert calibration_metrics(y, overconfident)["ece"] > 0.1


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(3)
    true = rng.dirichlet([1, 1, 1], 5000)
    y = np.array([rng.choice(3, p=row) for row in true])
    sharpened = apply_temperature(true, 0.5)  # an overconfident model
    temperature = fit_temperature(sharpened, y)
    assert temperature == pytest.approx(2.0, rel=0.15)
    np.testing.assert_array_equal(apply_temperature(sharpened, temperature).argmax(1), sharpened.argmax(1))


def test_metrics_have_the_promised_names():
    y = np.array([0, 1, 2, 0, 1, 2])
    metrics = classification_metrics(y, one_hot_probabilities(np.array([0, 1, 2, 1, 1, 2])), CLASSES, resamples=50)
    for key in ["accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "confusion_matrix", "per_class",
                "calibration", "intervals", "bootstrap"]:
        assert key in metrics
    assert set(metrics["per_class"]["a"]) >= {"sensitivity", "specificity", "ppv", "npv", "f1", "support", "auroc",
                                              "average_precision", "precision", "recall"}
    assert metrics["intervals"]["accuracy"]["value"] == pytest.approx(5 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, [0, 1, 2, 1, 1, 2]))
    assert metrics["bootstrap"]["resamples"] == 50
    assert {"ece", "brier", "nll", "ece_bins"} <= set(metrics["calibration"])
