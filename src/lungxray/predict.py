"""A trained model ready to use: load a run folder (or a .keras file), predict files or arrays.

The CLI, the evaluation code and the Python API all go through `Predictor`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from lungxray.calibration import apply_temperature
from lungxray.data.images import ImageError, read_image
from lungxray.features import FeatureExtractor
from lungxray.io import atomic_path, write_json
from lungxray.model import WeightsError, load_model
from lungxray.ood import OutOfDistribution

MODEL_FILE = "model.keras"
TRAIN_HASHES = "train_hashes.txt"  # content hashes of the training images, to detect overlap
OOD_FILE = "ood.npz"


def sidecar_path(model_path: Path) -> Path:
    return model_path.with_suffix(".json")


def save_model(model: keras.Model, path: Path, classes: list[str], image_size: int, interpolation: str,
               extra: dict | None = None) -> None:
    """Save `model` and, beside it, what is needed to use it: class names, input handling, temperature."""
    with atomic_path(path) as temporary:
        model.save(temporary)
    write_json(sidecar_path(path), {"classes": classes, "image_size": image_size,
                                    "interpolation": interpolation, **(extra or {})})


@dataclasses.dataclass
class Predictions:
    """Per file: calibrated `probabilities` (what users see), `raw` softmax outputs, backbone
    `features`, out-of-distribution score and flag (when the model has a gate), content hash.
    Rows of unreadable files are NaN and their errors are listed."""

    probabilities: np.ndarray
    raw: np.ndarray
    features: np.ndarray
    ood_score: np.ndarray | None
    ood: np.ndarray | None
    errors: list[ImageError]
    hashes: list[str | None]


class Predictor:
    def __init__(self, model: keras.Model, classes: list[str], image_size: int, interpolation: str = "nearest",
                 runtime: str = "auto", cache_dir: Path | None = None, info: dict | None = None,
                 features: FeatureExtractor | None = None, temperature: float = 1.0,
                 train_hashes: set[str] | None = None, ood: OutOfDistribution | None = None):
        try:
            self.backbone, self.head = model.get_layer("backbone"), model.get_layer("head")
        except ValueError:
            raise WeightsError("this model lacks the 'backbone' and 'head' parts lungxray builds; "
                               "train it with `lungxray train`") from None
        if self.head.output_shape[-1] != len(classes):
            raise WeightsError(f"the model has {self.head.output_shape[-1]} outputs but {len(classes)} class names")
        self.model, self.classes = model, list(classes)
        self.image_size, self.interpolation = image_size, interpolation
        self.info, self.temperature, self.train_hashes, self.ood = info or {}, temperature, train_hashes, ood
        self.features = features or FeatureExtractor(self.backbone, image_size, interpolation, runtime, cache_dir)
        # A traced call: the eager Keras call costs ~2 ms per request, this ~0.4 ms.
        self._head = tf.function(lambda x: self.head(x, training=False), reduce_retracing=True)

    @classmethod
    def load(cls, path: str | Path, runtime: str = "auto", cache_dir: Path | None = None) -> "Predictor":
        path = Path(path)
        model_path = path / MODEL_FILE if path.is_dir() else path
        model = load_model(model_path)
        sidecar = sidecar_path(model_path)
        if not sidecar.is_file():
            raise WeightsError(f"{sidecar} is missing: it holds the class names that go with {model_path}")
        info = json.loads(sidecar.read_text())
        hashes_file, ood_file = model_path.parent / TRAIN_HASHES, model_path.parent / OOD_FILE
        train_hashes = set(hashes_file.read_text().split()) if hashes_file.is_file() else None
        ood = OutOfDistribution.load(ood_file) if ood_file.is_file() else None
        return cls(model, info["classes"], info["image_size"], info.get("interpolation", "nearest"), runtime,
                   cache_dir, info, temperature=float(info.get("temperature", 1.0)), train_hashes=train_hashes,
                   ood=ood)

    def predict_files(self, paths: list[Path], desc: str = "predicting") -> Predictions:
        extraction = self.features.extract([Path(p) for p in paths], desc=desc)
        return self._predictions(extraction.features["orig"], extraction.errors, extraction.hashes)

    def predict_images(self, images: np.ndarray) -> Predictions:
        """Predictions for uint8 RGB images already at the model's input size."""
        return self._predictions(self.features.runtime(images), [], [None] * len(images))

    def _predictions(self, features: np.ndarray, errors, hashes) -> Predictions:
        raw = self.predict_features(features, calibrated=False)
        scores = self.ood.score(features) if self.ood else None
        flags = scores > self.ood.threshold if self.ood else None
        return Predictions(apply_temperature(raw, self.temperature), raw, features, scores, flags, errors, hashes)

    def predict_features(self, features: np.ndarray, calibrated: bool = True) -> np.ndarray:
        probabilities = np.full((len(features), len(self.classes)), np.nan, np.float32)
        ok = ~np.isnan(features).any(axis=1)
        if ok.any():
            for start in range(0, int(ok.sum()), 1024):
                rows = np.flatnonzero(ok)[start:start + 1024]
                probabilities[rows] = self._head(features[rows]).numpy()
        return apply_temperature(probabilities, self.temperature) if calibrated else probabilities

    def read(self, source, name: str | None = None) -> np.ndarray:
        return read_image(source, self.image_size, self.interpolation, name=name)
