"""The levers against shortcut learning: balancing weights, worst-group model selection, intensity
normalisation, pairwise AUROC, and the presets."""

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from lungxray import Config, KerasPredictor, train
from lungxray.config import PRESETS
from lungxray.data.images import read_image
from lungxray.data.records import Record, balancing_weights
from lungxray.training.engines import WorstGroupAccuracy
from lungxray.errors import DataError
from lungxray.evaluate.metrics import pairwise_auroc
from lungxray.model.features import FeatureExtractor
from lungxray.model.network import build_backbone
from tests.conftest import CLASSES, TINY, synthetic_image


def test_pairwise_auroc_is_the_auroc_among_the_two_classes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    p = rng.dirichlet([1, 1, 1], 300) + np.eye(3)[y] * 0.3
    p /= p.sum(axis=1, keepdims=True)
    table = pairwise_auroc(y, p, list(CLASSES))
    pair = (y == 0) | (y == 2)
    expected = roc_auc_score(y[pair] == 2, p[pair, 2] / (p[pair, 0] + p[pair, 2]))
    assert table["covid_vs_pneumonia"] == pytest.approx(expected)
    assert set(table) == {"covid_vs_normal", "covid_vs_pneumonia", "normal_vs_pneumonia"}


def test_balancing_weights_give_each_cell_the_same_total():
    records = ([Record(f"a{i}", "covid", extra={"source": "x"}) for i in range(300)]
               + [Record(f"b{i}", "covid", extra={"source": "y"}) for i in range(150)]
               + [Record(f"c{i}", "pneumonia", extra={"source": "y"}) for i in range(10)])
    weights = balancing_weights(records, ("source",), floor=100)
    assert weights.mean() == pytest.approx(1.0)
    totals = [weights[:300].sum(), weights[300:450].sum()]
    assert totals[0] == pytest.approx(totals[1])
    # A cell of 10 weighs as if it had 100 images: a tenth of a full cell, not a whole one.
    assert weights[450:].sum() == pytest.approx(totals[0] / 10)
    with pytest.raises(DataError, match="age_group"):
        balancing_weights(records, ("age_group",), floor=1)


@pytest.mark.parametrize("intensity", ["equalize", "autocontrast"])
def test_intensity_normalisation_stretches_a_dull_image(intensity):
    dull = np.tile(np.linspace(100, 140, 64).astype(np.uint8), (64, 1))
    buffer = io.BytesIO()
    Image.fromarray(dull).save(buffer, format="PNG")
    plain, normalised = (read_image(buffer.getvalue(), 32, intensity=i) for i in ("none", intensity))
    assert np.ptp(plain) <= 40 and np.ptp(normalised) >= 240


def test_intensity_is_part_of_the_feature_cache_key(tmp_path):
    backbone = build_backbone("none", TINY)
    plain = FeatureExtractor(backbone, TINY, runtime="keras", cache_dir=tmp_path)
    equalised = FeatureExtractor(backbone, TINY, runtime="keras", cache_dir=tmp_path, intensity="equalize")
    assert plain.cache.key != equalised.cache.key


def manifest_with_sources(root, per_cell: int = 8):
    """A CSV whose images come from two sources, with a split column."""
    rng = np.random.default_rng(3)
    rows = []
    for split in ("train", "val", "test"):
        for index, label in enumerate(CLASSES):
            for source in ("site_a", "site_b"):
                for i in range(per_cell if split != "test" else 3):
                    name = f"{split}_{label}_{source}_{i}.png"
                    Image.fromarray(synthetic_image(index, rng)).save(root / name)
                    rows.append([name, label, split, source])
    path = root / "manifest.csv"
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([["file", "label", "split", "source"], *rows])
    return path


def test_balanced_training_with_worst_group_selection(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(WorstGroupAccuracy, "MIN_GROUP", 8)  # the tiny validation cells hold 8 images
    manifest = manifest_with_sources(tmp_path)
    config = Config(weights="none", image_size=TINY, epochs=3, batch_size=8, dense_units=16, feature_runtime="keras",
                    balance="class_source", monitor="val_worst_group_accuracy", intensity="equalize")
    result = train(manifest, tmp_path / "run", config, cache_dir=cache_dir)
    worst = result.history["val_worst_group_accuracy"]
    assert len(worst) == 3 and all(0.0 <= w <= 1.0 for w in worst)
    # The worst cell can never beat the pooled accuracy.
    assert all(w <= a + 1e-9 for w, a in zip(worst, result.history["val_accuracy"]))
    assert "best val_worst_group_accuracy" in (result.run_dir / "report.md").read_text()
    predictor = KerasPredictor.load(result.run_dir, cache_dir=cache_dir)
    assert predictor.intensity == "equalize"


def test_worst_group_without_sources_is_the_worst_class(split_folders, tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(WorstGroupAccuracy, "MIN_GROUP", 6)  # 6 validation images per class
    config = Config(weights="none", image_size=TINY, epochs=2, batch_size=8, dense_units=16, feature_runtime="keras",
                    monitor="val_worst_group_accuracy")
    result = train(split_folders, tmp_path / "run", config, cache_dir=cache_dir)
    metrics = json.loads((result.run_dir / "evaluation" / "metrics.json").read_text())
    assert len(result.history["val_worst_group_accuracy"]) == 2
    best = int(np.argmax(result.history["val_worst_group_accuracy"]))
    assert result.history["val_worst_group_accuracy"][best] <= result.history["val_accuracy"][best]
    assert metrics["n"] == 18


def test_presets_are_valid_configurations():
    assert Config.preset("reference") == Config()
    for name in PRESETS:
        Config.preset(name)
