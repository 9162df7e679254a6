"""A trained Keras model ready to use (a `Predictor`): the network, its class names, input handling,
calibration temperature, out-of-distribution gate and conformal sets, complete once constructed.
`save` writes it into a run folder and `load` reads it back from a run folder or a `.keras` file;
exports open as `LitePredictor`s, and `loader.load_predictor` chooses between the two.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from lungxray.model.calibration import apply_temperature
from lungxray.model.conformal import ConformalSets
from lungxray.data.images import read_image
from lungxray.errors import WeightsError
from lungxray.model.features import FeatureExtractor
from lungxray.io import atomic_path, write_json
from lungxray.infer.identity import ModelIdentity
from lungxray.model.lungs import LungCrop
from lungxray.model.network import head_probabilities, load_model
from lungxray.model.ood import OutOfDistribution
from lungxray.infer.predictions import Predictions
from lungxray.rundir import RunDir


class KerasPredictor:
    """`info` is the model's provenance (engine, training data, counts...), stored in model.json."""

    def __init__(self, model: keras.Model, classes: list[str], image_size: int, interpolation: str = "nearest",
                 intensity: str = "none", temperature: float = 1.0, ood: OutOfDistribution | None = None,
                 train_hashes: set[str] | None = None, info: dict | None = None,
                 extractor: FeatureExtractor | None = None, runtime: str = "auto", cache_dir: Path | None = None,
                 crop: LungCrop | None = None, conformal: ConformalSets | None = None,
                 identity: ModelIdentity | None = None):
        try:
            self.backbone, self.head = model.get_layer("backbone"), model.get_layer("head")
        except ValueError:
            raise WeightsError("this model lacks the 'backbone' and 'head' parts lungxray builds; "
                               "train it with `lungxray train`") from None
        if self.head.output_shape[-1] != len(classes):
            raise WeightsError(f"the model has {self.head.output_shape[-1]} outputs but {len(classes)} class names")
        self.model, self.classes = model, list(classes)
        self.image_size, self.interpolation, self.intensity, self.crop = image_size, interpolation, intensity, crop
        self.temperature, self.ood, self.train_hashes, self.info = temperature, ood, train_hashes, info or {}
        self.conformal = conformal
        self.identity = identity or ModelIdentity.unsaved(self.info.get("trained"))
        self.extractor = extractor or FeatureExtractor(self.backbone, image_size, interpolation, runtime, cache_dir,
                                                       intensity=intensity, crop=crop)
        # A traced call: the eager Keras call costs ~2 ms per request, this ~0.4 ms.
        self._head = tf.function(lambda x: self.head(x, training=False), reduce_retracing=True)

    def save(self, run: RunDir) -> None:
        """Write the sidecar, the gate, the segmenter and the training images' hashes into `run`, and
        the model last: a folder with a model file always has everything that goes with it."""
        write_json(run.model_info, {**self.info, "classes": self.classes, "image_size": self.image_size,
                                    "interpolation": self.interpolation, "intensity": self.intensity,
                                    "crop": "lungs" if self.crop else "none", "temperature": self.temperature,
                                    "conformal": self.conformal.to_json() if self.conformal else None})
        if self.crop is not None:
            self.crop.save(run.path(run.LUNGS))
        if self.ood is not None:
            self.ood.save(run.path(run.OOD))
        if self.train_hashes is not None:
            run.write_train_hashes(sorted(self.train_hashes))
        with atomic_path(run.model) as temporary:
            self.model.save(temporary)

    runtime = "keras"
    can_explain = True

    @classmethod
    def load(cls, path: str | Path, runtime: str = "auto", cache_dir: Path | None = None) -> "KerasPredictor":
        """A run folder's or `.keras` file's model; `runtime`: what runs its backbone ("auto": LiteRT,
        converted once and cached, where it is installed; "keras")."""
        run = RunDir.open(path)
        model = load_model(run.model)
        info = run.read_model_info()
        gate_file = run.path(run.OOD)
        crop = LungCrop.load(run.path(run.LUNGS), runtime, cache_dir) if info.get("crop") == "lungs" else None
        return cls(model, info["classes"], info["image_size"], info.get("interpolation", "nearest"),
                   info.get("intensity", "none"), temperature=float(info.get("temperature", 1.0)),
                   ood=OutOfDistribution.load(gate_file) if gate_file.is_file() else None,
                   train_hashes=run.read_train_hashes(), info=info, runtime=runtime, cache_dir=cache_dir, crop=crop,
                   conformal=ConformalSets.from_json(info["conformal"], info["classes"]) if info.get("conformal") else None,
                   identity=ModelIdentity.of(run.model, run.name, info.get("trained")))

    def keras_network(self) -> keras.Model:
        return self.model

    def describe(self) -> str:
        return (f"runtime keras (backbone in {self.extractor.runtime.name}); `lungxray export RUN` once makes a "
                "checked LiteRT export that --runtime auto then uses, without TensorFlow")

    def predict_files(self, paths: list[Path], desc: str = "predicting") -> Predictions:
        extraction = self.extractor.extract([Path(p) for p in paths], desc=desc)
        return self._predictions(extraction.vectors["orig"], extraction.errors, extraction.hashes)

    def predict_images(self, images: np.ndarray) -> Predictions:
        """Predictions for uint8 RGB images already at the model's input size."""
        return self._predictions(self.extractor.runtime(images), [], [None] * len(images))

    def _predictions(self, features: np.ndarray, errors, hashes) -> Predictions:
        raw = self.predict_features(features, calibrated=False)
        return Predictions.from_outputs(raw, features, self.temperature, self.ood, errors, hashes)

    def predict_features(self, features: np.ndarray, calibrated: bool = True) -> np.ndarray:
        probabilities = head_probabilities(self._head, features, len(self.classes))
        return apply_temperature(probabilities, self.temperature) if calibrated else probabilities

    def read(self, source, name: str | None = None) -> np.ndarray:
        return read_image(source, self.image_size, self.interpolation, name, self.intensity, self.crop)
