"""Grad-CAM points at the evidence: a model whose answer is known, and the real pipeline's files."""

import keras
import numpy as np
import pytest

from lungxray.cli import main
from lungxray.infer.explain import GradCam, overlay, share_inside


def known_model(size=64):
    """Class 1's score grows with the brightest spot's intensity; class 0's falls with it. The
    evidence for class 1 is exactly where the image is bright."""
    inputs = keras.Input((size, size, 3))
    features = keras.layers.Conv2D(4, 3, padding="same", activation="relu", kernel_initializer="ones",
                                   bias_initializer="zeros")(keras.layers.Rescaling(1 / 255)(inputs))
    features = keras.layers.Conv2D(8, 1, activation="relu", kernel_initializer="ones", name="last_conv")(features)
    backbone = keras.Model(inputs, keras.layers.GlobalMaxPooling2D()(features), name="backbone")
    head = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, activation="softmax")], name="head")
    # small weights keep the softmax away from saturation, where every gradient vanishes
    head.layers[-1].set_weights([np.stack([-np.ones(8), np.ones(8)], axis=1) * 5e-4, np.zeros(2)])
    image = keras.Input((size, size, 3))
    return keras.Model(image, head(backbone(image)))


def test_heatmap_peaks_where_the_evidence_is():
    model = known_model()
    gradcam = GradCam(model)
    assert gradcam.layer.name == "last_conv"
    rng = np.random.default_rng(0)
    for top, left in [(5, 5), (40, 10), (20, 45)]:
        image = rng.integers(0, 30, (64, 64, 3)).astype(np.uint8)
        image[top:top + 8, left:left + 8] = 250
        heat, probabilities = gradcam.heatmap(image, class_index=1)
        row, column = np.unravel_index(heat.argmax(), heat.shape)
        assert top - 1 <= row <= top + 8 and left - 1 <= column <= left + 8
        assert heat.max() == 1.0 and heat.min() >= 0.0 and probabilities.shape == (2,)


def test_overlay_keeps_the_image_shape():
    image = np.zeros((50, 70, 3), np.uint8)
    heat = np.zeros((7, 7))
    heat[3, 3] = 1.0
    out = overlay(image, heat)
    assert out.shape == (50, 70, 3) and out.dtype == np.uint8 and out.max() > 0


def test_predict_explain_writes_one_overlay_per_readable_image(tmp_path):
    from tests.conftest import TINY, write_class_folders

    data = write_class_folders(tmp_path / "data", per_class=4, splits=["train", "val", "test"])
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--weights", "none", "--epochs", "1",
                 "--batch-size", "4", "--image-size", str(TINY), "--cache", str(tmp_path / "c")]) == 0
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"x")
    images = sorted((data / "test" / "covid").iterdir())[:2]
    assert main(["predict", "--model", str(tmp_path / "run"), "--cache", str(tmp_path / "c"), "--explain",
                 str(tmp_path / "cams"), *map(str, images), str(bad)]) == 0
    written = sorted((tmp_path / "cams").glob("*.png"))
    assert len(written) == 2 and all(p.stat().st_size > 5000 for p in written)


def test_share_inside_a_mask():
    heat = np.zeros((7, 7), np.float32)
    heat[2:5, 1:3] = 1.0  # all the evidence on the left
    left = np.zeros((70, 70), np.uint8)
    left[:, :35] = 255
    assert share_inside(heat, left) > 0.95
    assert share_inside(heat, 255 - left) < 0.05
    assert share_inside(np.ones((7, 7)), left) == pytest.approx(0.5, abs=0.01)
