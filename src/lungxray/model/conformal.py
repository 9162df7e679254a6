"""Conformal prediction sets: split conformal, class-conditional (Mondrian by class), calibrated on
the validation images. An image's set at coverage 1 - ε holds every class c whose p-value

    p_c = (#{validation images of class c with score >= s_c} + 1) / (n_c + 1),   s = 1 - softmax_c

is at least ε, with the softmax before temperature scaling (so that fitting the temperature on the
same images does not touch the sets). This is crepes' non-smoothed Mondrian conformal classifier
(`crepes.ConformalClassifier`, bins = classes), computed here in NumPy so that an export predicts
the same sets without crepes, pandas or SciPy; `tests/test_conformal.py` checks the sets against
crepes itself. Whatever the model, the true class is in the set of at least 1 - ε of images of each
class, when test images come like the validation images (the same hospitals); under a shift of
hospital nothing is promised, and `evaluate` reports what held.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lungxray.errors import ConfigError

DEFAULT_COVERAGE = 0.9


def check_coverage(coverage: float) -> float:
    if not 0 < coverage < 1:
        raise ConfigError(f"coverage must be between 0 and 1 (e.g. 0.9). Got {coverage!r} instead.")
    return coverage


@dataclasses.dataclass
class ConformalSets:
    classes: list[str]
    scores: dict[str, np.ndarray]  # validation nonconformity scores by true class, sorted

    @classmethod
    def fit(cls, raw_probabilities: np.ndarray, labels: np.ndarray, classes: list[str]) -> "ConformalSets":
        """From the validation images' softmax outputs (n, k) and true class indices (n,)."""
        true_class = raw_probabilities[np.arange(len(labels)), labels]
        # Rounded as saved, so that a loaded model gives the sets the trained one gave.
        return cls(list(classes), {c: np.sort(np.round(1 - true_class[labels == i], 7)) for i, c in enumerate(classes)})

    def p_values(self, raw_probabilities: np.ndarray) -> np.ndarray:
        """(n, k): each class's p-value for each image."""
        p = np.empty(raw_probabilities.shape, np.float64)
        for i, c in enumerate(self.classes):
            scores = self.scores[c]
            at_least = len(scores) - np.searchsorted(scores, 1 - raw_probabilities[:, i], side="left")
            p[:, i] = (at_least + 1) / (len(scores) + 1)
        return p

    def sets(self, raw_probabilities: np.ndarray, coverage: float = DEFAULT_COVERAGE) -> np.ndarray:
        """(n, k) booleans: which classes are in each image's set. NaN rows (unreadable) hold none."""
        return self.p_values(np.nan_to_num(raw_probabilities, nan=-1.0)) >= 1 - check_coverage(coverage)

    def to_json(self) -> dict:
        return {"method": "split conformal, class-conditional (crepes' non-smoothed Mondrian p-values)",
                "scores": {c: [round(float(s), 7) for s in self.scores[c]] for c in self.classes}}

    @classmethod
    def from_json(cls, value: dict, classes: list[str]) -> "ConformalSets":
        return cls(list(classes), {c: np.sort(np.asarray(value["scores"][c], np.float64)) for c in classes})


def set_members(in_set: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> list[str]:
    """The classes of one image's set, most probable first."""
    return [classes[i] for i in np.argsort(-probabilities) if in_set[i]]


def describe_set(members: list[str], classes: list[str]) -> str:
    """What a set says, in words: "pneumonia", "pneumonia or covid", "cannot tell", "none fits"."""
    if not members:
        return "none fits"
    if len(members) == len(classes):
        return "cannot tell"
    return " or ".join(members)
