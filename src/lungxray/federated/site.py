"""One site (hospital) of a federation: its films' backbone features, and everything it computes
on them when the server asks. Nothing here sends anything: the ClientApp (`apps.py`) returns what
these functions return, and that is the whole of what leaves a site (docs/federated.md):

- `local_update`: the head's weights after a few batches of local training, and the count;
- `validation_report`: per class, how many validation films and how many were right, and the loss;
- the post-training statistics: the negative log-likelihood at each candidate temperature, a
  histogram of the conformal scores per class, the sums that the out-of-distribution gate's
  mean and shrunk covariance are made from, and a histogram of the gate's validation scores.

A site's features are computed once, by the same backbone and cache as a centralised run, and kept
in a `SiteTables` file on the site's own disk.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from lungxray.io import atomic_path

# Histogram edges shared by every site: the server adds the counts and reads quantiles off them.
CONFORMAL_EDGES = np.linspace(0.0, 1.0, 10_001)  # scores 1 - p(true class): 1e-4 wide bins
GATE_EDGES = np.concatenate([[0.0], np.geomspace(1e-2, 1e4, 20_000)])  # Mahalanobis distances: 0.07% apart
TEMPERATURES = np.geomspace(0.05, 20.0, 2_001)  # fit_temperature's range, 0.3% apart


@dataclasses.dataclass
class SiteTables:
    """A site's backbone features: (n, views, dim) of its training films (each film and its
    training views, as the cached engine holds them) and (n, dim) of its validation films."""

    name: str
    classes: list[str]
    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray
    val_labels: np.ndarray
    fingerprint: str  # the backbone and input pipeline the features came from (`site_fingerprint`)

    def save(self, path: Path) -> None:
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, name=self.name, classes=np.array(self.classes), train=self.train,
                     train_labels=self.train_labels, val=self.val, val_labels=self.val_labels,
                     fingerprint=self.fingerprint)

    @classmethod
    def load(cls, path: Path) -> "SiteTables":
        with np.load(path, allow_pickle=False) as stored:
            return cls(str(stored["name"]), [str(c) for c in stored["classes"]], stored["train"],
                       stored["train_labels"], stored["val"], stored["val_labels"], str(stored["fingerprint"]))


def local_update(head, site: SiteTables, weights: list[np.ndarray], *, steps: int, batch_size: int,
                 learning_rate: float, proximal_mu: float, seed: int) -> tuple[list[np.ndarray], float, float]:
    """The head's weights after `steps` batches of Adam on the site's training films, starting from
    the round's global `weights`, with the mean training loss and accuracy over those batches. Each batch draws films at random
    (seeded by `seed`) and shows each as one of its views, as the cached engine's epochs do.
    `proximal_mu` > 0 adds FedProx's term mu/2 * ||w - w_global||^2 to the loss, so that a site
    holding one class cannot drag the head far from what the others agreed."""
    import keras
    import tensorflow as tf

    head.set_weights(weights)
    anchors = [tf.constant(w) for w in (v.numpy() for v in head.trainable_variables)]
    optimizer = keras.optimizers.Adam(learning_rate)
    loss_of = keras.losses.CategoricalCrossentropy()
    one_hot = np.eye(len(site.classes), dtype=np.float32)
    rng = np.random.default_rng(seed)

    @tf.function(reduce_retracing=True)
    def step(features, targets):
        with tf.GradientTape() as tape:
            outputs = head(features, training=True)
            loss = loss_of(targets, outputs)
            if proximal_mu > 0:
                loss += proximal_mu / 2 * tf.add_n([tf.reduce_sum(tf.square(v - a))
                                                    for v, a in zip(head.trainable_variables, anchors)])
        optimizer.apply_gradients(zip(tape.gradient(loss, head.trainable_variables), head.trainable_variables))
        right = tf.reduce_mean(tf.cast(tf.argmax(outputs, 1) == tf.argmax(targets, 1), tf.float32))
        return loss, right

    results = []
    for _ in range(steps):
        rows = rng.choice(len(site.train), min(batch_size, len(site.train)), replace=False)
        views = rng.integers(site.train.shape[1], size=len(rows))
        results.append([float(v) for v in step(site.train[rows, views], one_hot[site.train_labels[rows]])])
    loss, accuracy = np.mean(results, axis=0)
    return [np.asarray(w) for w in head.get_weights()], float(loss), float(accuracy)


def probabilities(head, features: np.ndarray) -> np.ndarray:
    """The head's softmax outputs (before temperature scaling), in batches."""
    from lungxray.model.network import head_probabilities

    return head_probabilities(head, features, int(head.output_shape[-1])).astype(np.float64)


def validation_report(raw: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Per class: validation films and correct answers; the summed cross-entropy."""
    right = raw.argmax(axis=1) == labels
    report = {"loss-sum": float(-np.log(np.clip(raw[np.arange(len(labels)), labels], 1e-7, 1.0)).sum())}
    for index in range(num_classes):
        report[f"films-{index}"] = float(np.sum(labels == index))
        report[f"right-{index}"] = float(np.sum(right[labels == index]))
    return report


def temperature_nll(raw: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The summed negative log-likelihood of the validation films at each of TEMPERATURES."""
    from lungxray.model.calibration import apply_temperature

    rows = np.arange(len(labels))
    return np.array([-np.log(np.clip(apply_temperature(raw, float(t))[rows, labels], 1e-12, 1.0)).sum()
                     for t in TEMPERATURES])


def conformal_histograms(raw: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(classes, bins): how many validation films of each class have each conformal score."""
    scores = 1 - raw[np.arange(len(labels)), labels]
    return np.stack([np.histogram(scores[labels == index], CONFORMAL_EDGES)[0] for index in range(num_classes)])


def feature_sums(features: np.ndarray) -> tuple[int, np.ndarray]:
    """The count and sum of the training films' gate features (log-scaled backbone features)."""
    from lungxray.model.ood import log_scaled

    return len(features), log_scaled(features).sum(axis=0)


def centred_moments(features: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, float]:
    """About the federation's `mean`: the scatter matrix sum (x - mean)(x - mean)^T and the sum of
    ||x - mean||^4, which is all Ledoit-Wolf's shrinkage needs beyond the count."""
    from lungxray.model.ood import log_scaled

    centred = log_scaled(features) - mean
    return centred.T @ centred, float(np.sum(np.sum(centred ** 2, axis=1) ** 2))


def gate_histogram(gate, features: np.ndarray) -> np.ndarray:
    """How many validation films have each out-of-distribution score (GATE_EDGES)."""
    return np.histogram(np.minimum(gate.score(features), GATE_EDGES[-1]), GATE_EDGES)[0]


def fingerprint(classes: list[str], views: int, pipeline: dict) -> str:
    """What a site's features depend on: the classes, the training views, and the feature cache's key
    (`FeatureCache.meta`: backbone weights, input size, resizing, intensity, crop, runtime). Two
    sites with the same fingerprint made their features the same way."""
    return json.dumps({"classes": list(classes), "views": views, **pipeline}, sort_keys=True)
