"""The one interface every model runtime implements, so that the command line, the server, the
DICOM node and evaluation use any of them alike: `KerasPredictor` (a run's Keras model, its
backbone in Keras or LiteRT) and `LitePredictor` (an export run by LiteRT, ONNX Runtime or a
SavedModel). `loader.load_predictor` is the way in."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from lungxray.infer.identity import ModelIdentity
    from lungxray.infer.predictions import Predictions
    from lungxray.model.conformal import ConformalSets
    from lungxray.model.ood import OutOfDistribution


@runtime_checkable
class Predictor(Protocol):
    classes: list[str]
    image_size: int
    temperature: float
    ood: OutOfDistribution | None
    conformal: ConformalSets | None
    info: dict  # the model's provenance (engine, training data, counts...), as model.json holds it
    identity: ModelIdentity
    runtime: str  # what runs it: "keras", "litert", "onnx" or "savedmodel"

    @property
    def can_explain(self) -> bool:
        """Whether Grad-CAM can run for it: its own Keras network, or the run's it was loaded from."""

    def keras_network(self):
        """The Keras network Grad-CAM differentiates (loaded on first use for an export), or None."""

    def describe(self) -> str:
        """One line saying what runs the model, for the command line to print."""

    def read(self, source, name: str | None = None) -> np.ndarray:
        """A file, its bytes or a DICOM data set as the uint8 RGB array the model sees."""

    def predict_files(self, paths: list[Path], desc: str | None = "predicting") -> Predictions:
        """Predictions for files; an unreadable file's row is NaN and its error listed."""

    def predict_images(self, images) -> Predictions:
        """Predictions for uint8 RGB images already at the model's input size."""
