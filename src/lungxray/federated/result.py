"""What a federation's server fitted, and the ordinary run folder made from it.

`FederatedFit` is the coordinator's output, kept in `RUN/federation/`: the selected head's
weights, the temperature, the conformal calibration and the out-of-distribution gate.
`save_federated_model` puts it on the recipe's backbone as a `KerasPredictor`, which saves,
evaluates and exports as any run's does, by simulation or deployment alike.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from lungxray.errors import DataError
from lungxray.io import read_json, write_json
from lungxray.model.conformal import ConformalSets
from lungxray.model.ood import OutOfDistribution


FEDERATION = "federation.json"  # the Federation settings, beside config.json
FOLDER = "federation"  # what the server kept: rounds/, history.json, head.npz, fitted.json, ood.npz


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


def save_federated_model(run, model, extractor, config, federation, classes: list[str], info: dict):
    """The fitted head on `model`'s backbone, saved in `run` as a KerasPredictor with the federation's
    calibration, sets and gate, and the rounds plotted: (the predictor, the server's history, the
    rounds as a Keras history)."""
    from lungxray.evaluate.plots import plot_history
    from lungxray.infer.keras_predictor import KerasPredictor

    fit = FederatedFit.load(run.path(FOLDER), classes)
    model.get_layer("head").set_weights(fit.head_weights)
    history = read_json(run.path(FOLDER) / "history.json", DataError, "does not exist")
    info = {**info, "federation": {**federation.to_dict(), "sites": history["sites"],
                                   "best_round": history["best_round"]}}
    predictor = KerasPredictor(model, classes, config.image_size, config.interpolation, config.intensity,
                               temperature=fit.temperature, conformal=fit.conformal, ood=fit.gate, train_hashes=set(),
                               info=info, extractor=extractor)
    predictor.save(run)
    by_round = rounds_as_history(history["rounds"])
    plot_history(by_round, "loss", run.plot("loss"))
    plot_history(by_round, "accuracy", run.plot("accuracy"))
    return predictor, history, by_round


def rounds_as_history(rounds: list[dict]) -> dict[str, list[float]]:
    """The rounds in the shape of Keras' history (one value per round), for the plots and the report."""
    keys = ("loss", "accuracy", "val_loss", "val_accuracy", "val_worst_group_accuracy")
    return {key: [float(r.get(key, np.nan)) for r in rounds] for key in keys}


def sites_section(history: dict, classes: list[str]) -> list[str]:
    """The report's table of sites: what each trained on, and how the chosen round did on its
    validation films."""
    chosen = next(r for r in history["rounds"] if r["round"] == history["best_round"])
    lines = ["## Sites", "", f"Federated: {len(history['sites'])} sites; the head of round {history['best_round']} "
             "was chosen ([federation/history.json](federation/history.json) has every round).", "",
             "| site | " + " | ".join(f"train {c}" for c in classes) + " | validation films | validation accuracy |",
             "|---|" + "---|" * (len(classes) + 2)]
    for site in sorted(history["sites"], key=lambda s: s["name"]):
        accuracy = chosen["val_accuracy_by_site"].get(site["name"])
        lines.append(f"| {site['name']} | " + " | ".join(str(n) for n in site["train_by_class"]) +
                     f" | {site['validation']} | {'-' if accuracy is None else f'{accuracy:.3f}'} |")
    privacy = history.get("privacy")
    if privacy:
        lines += ["", f"Differential privacy for each site: **epsilon {privacy['epsilon']:.3g} at delta "
                      f"{privacy['delta']:g}** over {privacy['rounds']} rounds (Gaussian noise of "
                      f"{privacy['noise_multiplier']:g} x the clipping norm {privacy['clipping_norm']:g}, "
                      f"{privacy['accounting'].upper()} accounting). It bounds what the heads the sites sent "
                      "reveal of a site's taking part, not their validation reports or statistics."]
    return lines


def federation_summary(federation, sites: int) -> str:
    return (f"{sites} sites by '{federation.site_column}', {federation.rounds} rounds of {federation.local_steps} "
            f"local batches, {federation.aggregation}" +
            (f" (mu {federation.proximal_mu:g})" if federation.aggregation == "fedprox" else ""))
