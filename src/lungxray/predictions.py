"""What a predictor returns, and how it is shown: shared by the Keras `Predictor` and the
TensorFlow-free `LitePredictor`, so this module imports neither."""

from __future__ import annotations

import dataclasses

import numpy as np

from lungxray.calibration import apply_temperature
from lungxray.conformal import DEFAULT_COVERAGE, ConformalSets, set_fields
from lungxray.errors import ImageError

OOD_NOTE = ("unlike the chest X-rays the model was trained on (out-of-distribution score above the gate's "
            "threshold): its class is not to be trusted")


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

    @classmethod
    def from_outputs(cls, raw: np.ndarray, features: np.ndarray, temperature: float, ood, errors: list[ImageError],
                     hashes: list[str | None]) -> "Predictions":
        """Calibrate the head's softmax outputs and score the features with the gate (`ood`, or None)."""
        scores = ood.score(features) if ood else None
        flags = scores > ood.threshold if ood else None
        return cls(apply_temperature(raw, temperature), raw, features, scores, flags, errors, hashes)


def prediction_rows(predictions: Predictions, files: list, classes: list[str], refuse_ood: bool = False,
                    conformal: ConformalSets | None = None, coverage: float = DEFAULT_COVERAGE) -> list[dict]:
    """One dict per file, as the command line and the API show them: `predicted` and `probabilities`
    (withheld for a flagged image when `refuse_ood`), the conformal `set` at `coverage` and what it
    says, `ood_score` and `ood`, or `error`."""
    reasons = {e.path: e.reason for e in predictions.errors}
    sets = conformal.sets(predictions.raw, coverage) if conformal is not None else None
    rows = []
    for index, (path, probabilities) in enumerate(zip(files, predictions.probabilities)):
        if str(path) in reasons:
            rows.append({"file": str(path), "error": reasons[str(path)]})
            continue
        row = {"file": str(path), "predicted": classes[int(probabilities.argmax())],
               "probabilities": {c: round(float(p), 6) for c, p in zip(classes, probabilities)}}
        if sets is not None:
            row.update(set_fields(sets[index], probabilities, classes, coverage))
        if predictions.ood is not None:
            row.update(ood_score=round(float(predictions.ood_score[index]), 4), ood=bool(predictions.ood[index]))
            if row["ood"] and refuse_ood:
                row.update(predicted=None, probabilities=None, set=None, set_says=None, withheld=OOD_NOTE)
        rows.append(row)
    return rows
