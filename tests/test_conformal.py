"""Conformal prediction sets: the same sets as crepes' Mondrian conformal classifier, the promised
coverage per class on exchangeable data, and the sets carried everywhere a prediction is shown
(predict's rows, the export, the API, evaluate's report)."""

import json

import numpy as np
import pytest
from crepes import ConformalClassifier
from fastapi.testclient import TestClient

from lungxray import KerasPredictor, RunDir
from lungxray.cli import main
from lungxray.model.conformal import ConformalSets, describe_set
from lungxray.errors import ConfigError
from lungxray.evaluate.metrics import set_coverage
from lungxray.infer.lite_predictor import LitePredictor
from lungxray.serve import create_app
from tests.test_serve import png_bytes

CLASSES = ["covid", "normal", "pneumonia"]


def softmax_outputs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A noisy classifier's outputs: labels, and softmax probabilities that favour them."""
    labels = rng.integers(0, 3, n)
    logits = rng.normal(0, 1.0, (n, 3)) + 1.2 * np.eye(3)[labels] * rng.uniform(0, 2, (n, 1))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probabilities, labels


def test_the_sets_are_crepes_mondrian_sets():
    rng = np.random.default_rng(0)
    calibration, labels = softmax_outputs(600, rng)
    test, _ = softmax_outputs(400, rng)
    sets = ConformalSets.fit(calibration, labels, CLASSES)
    for coverage in (0.8, 0.9, 0.95):
        ours = sets.sets(test, coverage)
        for i in range(3):  # label-conditional: one conformal classifier per class, on that class's images
            reference = ConformalClassifier().fit(np.round(1 - calibration[labels == i, i], 7))
            theirs = reference.predict_set(np.round(1 - test[:, i:i + 1], 7), confidence=coverage, smoothing=False)
            assert np.array_equal(ours[:, i], theirs[:, 0].astype(bool)), (coverage, i)


def test_each_class_is_covered_as_promised_on_exchangeable_data():
    rng = np.random.default_rng(1)
    calibration, labels = softmax_outputs(3000, rng)
    test, truth = softmax_outputs(6000, rng)
    sets = ConformalSets.fit(calibration, labels, CLASSES)
    for coverage in (0.9, 0.95):
        result = set_coverage(truth, sets.sets(test, coverage), CLASSES, coverage)
        for c, measured in result["per_class"].items():
            assert abs(measured["coverage"] - coverage) < 0.02, (c, coverage, measured)
        assert result["below_nominal"] == [] and 1 <= result["mean_set_size"] < 3
    loose, tight = sets.sets(test, 0.8).sum(), sets.sets(test, 0.95).sum()
    assert loose < tight  # more coverage, larger sets
    with pytest.raises(ConfigError, match="between 0 and 1"):
        sets.sets(test, 90)
    assert describe_set(["pneumonia", "covid"], CLASSES) == "pneumonia or covid"
    assert describe_set(CLASSES, CLASSES) == "cannot tell" and describe_set([], CLASSES) == "none fits"


def test_sets_everywhere_a_prediction_is_shown(run, export, tmp_path, capsys):
    run_dir, data, cache = run
    keras_side = KerasPredictor.load(run_dir, cache_dir=cache)
    lite_side = LitePredictor.load(export)
    assert keras_side.conformal is not None and lite_side.conformal is not None  # the run and the export carry it
    images = sorted((data / "test").rglob("*.png"))
    keras_sets = keras_side.conformal.sets(keras_side.predict_files(images).raw, 0.9)
    lite_sets = lite_side.conformal.sets(lite_side.predict_files(images).raw, 0.9)
    assert (keras_sets == lite_sets).mean() > 0.95  # equal but where a probability sits at a threshold (1e-4)

    assert main(["predict", "--model", str(run_dir), "--cache", str(cache), "--format", "json", "--coverage", "0.95",
                 *map(str, images[:3])]) == 0
    rows = json.loads(capsys.readouterr().out)
    for row, in_set in zip(rows, keras_side.conformal.sets(keras_side.predict_files(images[:3]).raw, 0.95)):
        assert sorted(row["set"]) == sorted(c for c, member in zip(keras_side.classes, in_set) if member)
        assert row["coverage"] == 0.95 and row["set_says"] == describe_set(row["set"], keras_side.classes)
    assert main(["predict", "--model", str(run_dir), "--coverage", "1.5", str(images[0])]) == 2

    answer = TestClient(create_app(lite_side, coverage=0.8)).post(
        "/api/predict", files={"file": ("x.png", png_bytes(), "image/png")}).json()
    assert answer["coverage"] == 0.8 and answer["set_says"] == describe_set(answer["set"], lite_side.classes)

    assert main(["evaluate", "--model", str(run_dir), "--cache", str(cache), "--data", str(data),
                 "--out", str(tmp_path / "evaluation")]) == 0
    assert "conformal sets at 0.90: coverage" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert set(metrics["conformal"]) == {"0.90", "0.95"}
    assert metrics["conformal"]["0.90"]["per_class"]["covid"]["n"] == 8
    assert RunDir.open(run_dir).read_model_info()["conformal"]["scores"]["normal"]  # saved with the model
