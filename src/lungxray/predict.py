"""A trained model ready to use: load a run folder (or a .keras file), predict files or arrays.

The CLI, the evaluation code and (later) the server all go through `Predictor`.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

from lungxray.data.images import ImageError, read_image
from lungxray.features import FeatureExtractor
from lungxray.io import write_json
from lungxray.model import WeightsError, load_model

MODEL_FILE = "model.keras"


def sidecar_path(model_path: Path) -> Path:
    return model_path.with_suffix(".json")


def save_model(model: keras.Model, path: Path, classes: list[str], image_size: int, interpolation: str,
               extra: dict | None = None) -> None:
    """Save `model` and, beside it, what is needed to use it: class names and input handling."""
    from lungxray.io import atomic_path

    with atomic_path(path) as temporary:
        model.save(temporary)
    write_json(sidecar_path(path), {"classes": classes, "image_size": image_size,
                                    "interpolation": interpolation, **(extra or {})})


class Predictor:
    def __init__(self, model: keras.Model, classes: list[str], image_size: int, interpolation: str = "nearest",
                 runtime: str = "auto", cache_dir: Path | None = None, info: dict | None = None,
                 features: FeatureExtractor | None = None):
        try:
            self.backbone, self.head = model.get_layer("backbone"), model.get_layer("head")
        except ValueError:
            raise WeightsError("this model lacks the 'backbone' and 'head' parts lungxray builds; "
                               "train it with `lungxray train`") from None
        if self.head.output_shape[-1] != len(classes):
            raise WeightsError(f"the model has {self.head.output_shape[-1]} outputs but {len(classes)} class names")
        self.model, self.classes = model, list(classes)
        self.image_size, self.interpolation = image_size, interpolation
        self.info = info or {}
        self.features = features or FeatureExtractor(self.backbone, image_size, interpolation, runtime, cache_dir)

    @classmethod
    def load(cls, path: str | Path, runtime: str = "auto", cache_dir: Path | None = None) -> "Predictor":
        path = Path(path)
        model_path = path / MODEL_FILE if path.is_dir() else path
        model = load_model(model_path)
        sidecar = sidecar_path(model_path)
        if not sidecar.is_file():
            raise WeightsError(f"{sidecar} is missing: it holds the class names that go with {model_path}")
        info = json.loads(sidecar.read_text())
        return cls(model, info["classes"], info["image_size"], info.get("interpolation", "nearest"),
                   runtime, cache_dir, info)

    def predict_files(self, paths: list[Path], desc: str = "predicting") -> tuple[np.ndarray, list[ImageError]]:
        """Class probabilities (n, classes) per file; rows of unreadable files are NaN."""
        features, errors = self.features.extract([Path(p) for p in paths], desc=desc)
        return self.predict_features(features["orig"]), errors

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        probabilities = np.full((len(features), len(self.classes)), np.nan, np.float32)
        ok = ~np.isnan(features).any(axis=1)
        if ok.any():
            probabilities[ok] = self.head.predict(features[ok], batch_size=1024, verbose=0)
        return probabilities

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for uint8 RGB images already at the model's input size."""
        return self.predict_features(self.features.runtime(images))

    def read(self, source, name: str | None = None) -> np.ndarray:
        return read_image(source, self.image_size, self.interpolation, name=name)
