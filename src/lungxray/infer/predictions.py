"""What a predictor returns, as arrays (one row per film): shared by `KerasPredictor` and the
TensorFlow-free `LitePredictor`, so this module imports neither. `answer.py` turns them into answers."""

from __future__ import annotations

import dataclasses

import numpy as np

from lungxray.model.calibration import apply_temperature
from lungxray.errors import ImageError


@dataclasses.dataclass
class Predictions:
    """Per file: calibrated `probabilities` (what users see), `raw` softmax outputs, backbone
    `features`, out-of-distribution score and flag (when the model has a gate), content hash.
    Rows of unreadable files are NaN and their errors are listed. `observed`: per file, what the
    runtime saw of it for its monitoring record (image statistics, a DICOM header's acquisition
    attributes), when it decoded the file itself; else None."""

    probabilities: np.ndarray
    raw: np.ndarray
    features: np.ndarray
    ood_score: np.ndarray | None
    ood: np.ndarray | None
    errors: list[ImageError]
    hashes: list[str | None]
    observed: list[dict | None] | None = None

    @classmethod
    def from_outputs(cls, raw: np.ndarray, features: np.ndarray, temperature: float, ood, errors: list[ImageError],
                     hashes: list[str | None], observed: list[dict | None] | None = None) -> "Predictions":
        """Calibrate the head's softmax outputs and score the features with the gate (`ood`, or None)."""
        scores = ood.score(features) if ood else None
        flags = scores > ood.threshold if ood else None
        return cls(apply_temperature(raw, temperature), raw, features, scores, flags, errors, hashes, observed)

