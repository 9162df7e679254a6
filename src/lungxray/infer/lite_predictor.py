"""Prediction from a model exported by `lungxray export`, its sidecar (classes, input contract,
temperature) and its out-of-distribution gate. LiteRT and ONNX exports run without TensorFlow, with
ai-edge-litert or onnxruntime, NumPy, Pillow and pydicom alone; a SavedModel runs with TensorFlow.

    predictor = LitePredictor.load("model.tflite")   # or model.onnx
    predictions = predictor.predict_files(["chest.dcm"])   # the same Predictions as KerasPredictor's

Images are read exactly as for training (`read_image`: DICOM, resize, intensity normalisation).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lungxray.model.conformal import ConformalSets
from lungxray.data.images import read_bytes, read_image
from lungxray.errors import ImageError, WeightsError
from lungxray.infer.identity import ModelIdentity
from lungxray.io import file_hash
from lungxray.model.runtimes import InterpreterPool, OnnxSession, SavedModelRunner, litert_available
from lungxray.model.ood import OutOfDistribution
from lungxray.parallel import bounded_map, progress
from lungxray.infer.monitoring_record import observation
from lungxray.infer.predictions import Predictions

EXPORT_SUFFIXES = {"litert": ".tflite", "onnx": ".onnx", "savedmodel": ".savedmodel"}  # a SavedModel is a folder
RUNNERS = {".tflite": InterpreterPool, ".onnx": OnnxSession, ".savedmodel": SavedModelRunner}


def is_export(path: str | Path) -> bool:
    return Path(path).suffix in EXPORT_SUFFIXES.values()


def sidecar_paths(model_path: Path) -> tuple[Path, Path]:
    """`model.tflite` → (`model.tflite.json`, `model.tflite.ood.npz`): two formats side by side keep theirs."""
    return model_path.with_name(model_path.name + ".json"), model_path.with_name(model_path.name + ".ood.npz")


class LitePredictor:
    """A `Predictor` for an export. `run_model`: the Keras model of the run it was exported from,
    which it then answers as and explains with (None: an export given alone, which answers as its
    own file and cannot explain); `identity`: the identity already computed (Ray's workers)."""

    def __init__(self, model_path: Path, info: dict, ood: OutOfDistribution | None = None, threads: int | None = None,
                 identity: ModelIdentity | None = None, run_model: Path | None = None):
        """`threads`: images decoded and run at once (default: one per core)."""
        self.model_path, self.info, self.ood, self.threads = Path(model_path), info, ood, threads
        self.run_model = Path(run_model) if run_model is not None else None
        answering = self.run_model or self.model_path
        self.identity = identity or ModelIdentity.of(
            answering, self.run_model.parent.name if self.run_model else self.model_path.name, info.get("trained"))
        self.runtime = next(name for name, suffix in EXPORT_SUFFIXES.items() if suffix == self.model_path.suffix)
        self.classes = list(info["classes"])
        contract = info["input"]
        self.image_size, self.interpolation = contract["size"], contract["resize"]
        self.intensity = contract.get("intensity", "none")
        self.temperature = float(info.get("temperature", 1.0))
        self.conformal = ConformalSets.from_json(info["conformal"], self.classes) if info.get("conformal") else None
        runner = RUNNERS[self.model_path.suffix]
        self.pool = runner(self.model_path, threads) if runner is InterpreterPool else runner(self.model_path)
        shapes = self.pool.output_shapes
        # Which output is which, by shape: the probabilities have one value per class.
        self._probabilities = next(i for i, shape in enumerate(shapes) if shape == (len(self.classes),))
        self._features = 1 - self._probabilities

    @property
    def can_explain(self) -> bool:
        return self.run_model is not None

    def keras_network(self):
        """The run's Keras network (this imports TensorFlow), or None for an export given alone."""
        if self.run_model is None:
            return None
        from lungxray.model.network import load_model

        return load_model(self.run_model)

    def describe(self) -> str:
        parity = self.info.get("parity")
        checked = (f" (checked against the Keras model on {parity['images']} images: largest probability "
                   f"difference {parity['max_abs_difference']:.1e})") if parity else ""
        return f"runtime {self.runtime}: {self.model_path}{checked}"

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None, identity: ModelIdentity | None = None,
             run_model: Path | None = None) -> "LitePredictor":
        path = Path(path)
        if not is_export(path) or not path.exists():
            raise WeightsError(f"{path} is not an exported model; `lungxray export` writes a .tflite or .onnx file "
                               "or a .savedmodel folder")
        if path.suffix == ".tflite" and not litert_available():
            raise WeightsError("running a LiteRT model needs ai-edge-litert: pip install ai-edge-litert")
        info_path, gate_path = sidecar_paths(path)
        if not info_path.is_file():
            raise WeightsError(f"{info_path} is missing: it holds the classes and input contract of {path}")
        info = json.loads(info_path.read_text())
        return cls(path, info, OutOfDistribution.load(gate_path) if gate_path.is_file() else None, threads, identity,
                   run_model)

    def read(self, source, name: str | None = None) -> np.ndarray:
        return read_image(source, self.image_size, self.interpolation, name, self.intensity)

    def predict_images(self, images) -> Predictions:
        """Predictions for uint8 RGB images already at the model's input size."""
        outputs = self.pool(images)
        return Predictions.from_outputs(outputs[self._probabilities], outputs[self._features], self.temperature,
                                        self.ood, [], [None] * len(images))

    def predict_files(self, paths: list[Path], desc: str | None = "predicting") -> Predictions:
        n, dim = len(paths), self.pool.output_shapes[self._features][0]
        raw = np.full((n, len(self.classes)), np.nan, np.float32)
        features = np.full((n, dim), np.nan, np.float32)
        errors: list[ImageError] = []
        hashes: list[str | None] = [None] * n
        observed: list[dict | None] = [None] * n

        def one(index: int):
            path = str(paths[index])
            try:
                data = read_bytes(path, path)  # read once: hashed, then decoded
                image = self.read(data, path)
                return index, file_hash(data), self.pool([image]), observation(data, image, path), None
            except ImageError as error:
                return index, None, None, None, error

        for index, digest, outputs, seen, error in progress(bounded_map(one, range(n), self.threads), n, desc):
            if error is not None:
                errors.append(error)
            else:
                hashes[index], observed[index] = digest, seen
                raw[index], features[index] = outputs[self._probabilities][0], outputs[self._features][0]
        return Predictions.from_outputs(raw, features, self.temperature, self.ood, errors, hashes, observed)
