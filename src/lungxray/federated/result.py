"""What a federation's server fitted, and the ordinary run folder made from it.

`FederatedFit` is the coordinator's output, kept in `RUN/federation/`: the selected head's
weights, the temperature, the conformal calibration and the out-of-distribution gate. `predictor`
puts it on the recipe's backbone as a `KerasPredictor`, which saves, evaluates and exports as any
run's does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from lungxray.io import read_json, write_json
from lungxray.model.conformal import ConformalSets
from lungxray.model.ood import OutOfDistribution


def save_weights(path: Path, weights: list[np.ndarray]) -> None:
    """A head's weights, in order, as one .npz (a round's, or the chosen one)."""
    np.savez(path, *weights)


def load_weights(path: Path) -> list[np.ndarray]:
    """The weights `save_weights` wrote, in their order."""
    with np.load(path) as stored:
        return [stored[f"arr_{i}"] for i in range(len(stored.files))]


@dataclasses.dataclass
class FederatedFit:
    head_weights: list[np.ndarray]
    temperature: float
    conformal: ConformalSets
    gate: OutOfDistribution

    HEAD, FITTED, GATE = "head.npz", "fitted.json", "ood.npz"

    def save(self, folder: Path) -> None:
        save_weights(folder / self.HEAD, self.head_weights)
        write_json(folder / self.FITTED, {"temperature": self.temperature, "conformal": self.conformal.to_json()})
        self.gate.save(folder / self.GATE)

    @classmethod
    def load(cls, folder: Path, classes: list[str]) -> "FederatedFit":
        weights = load_weights(folder / cls.HEAD)
        fitted = read_json(folder / cls.FITTED, FileNotFoundError, "does not exist: the federation did not finish")
        return cls(weights, float(fitted["temperature"]), ConformalSets.from_json(fitted["conformal"], classes),
                   OutOfDistribution.load(folder / cls.GATE))
