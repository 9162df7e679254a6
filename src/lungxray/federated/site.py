"""One site (hospital) of a federation: its films' backbone features, and everything it computes
on them when the server asks. Nothing here sends anything: the ClientApp (`apps.py`) returns what
these functions return, and that is the whole of what leaves a site (docs/federated.md):

- `standardisation_sums`: the count, sum and sum of squares of each backbone feature over its
  training films, from which the server makes the federation's `Standardisation`;
- `LocalTrainer.update`: the head's weights after a few batches of local training, and the count;
- `LocalTrainer.gradient` (SCAFFOLD): the mean gradient of its training films' loss at the global head;
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
# Films per pass of `LocalTrainer.gradient`: its mean is over all of a site's films whatever the
# passes; 64 a pass cost the largest site (8,580 films) 0.25 s a round, 1,024 0.08 s.
GRADIENT_PASS = 1024


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


@dataclasses.dataclass(frozen=True)
class Standardisation:
    """The federation's mean and standard deviation of each backbone feature over every site's
    training films, in which every site trains the head (`LocalTrainer`).

    The head's first layer is Dense: on standardised features z = (x - mean) / scale its kernel and
    bias are K' = scale * K (row by row) and b' = b + mean @ K, the same function of x. The sites send
    and receive the head as the recipe has it (K, b); only the coordinates a site takes its steps in
    change. Those matter: the raw features have a mean of 2.4 and a norm of 72, and local steps in
    their coordinates are badly conditioned, so that 30 rounds underfit (docs/federated.md). The map
    is linear in (K, b), so averaging heads, server momentum and FedAdam's steps commute with it; the
    sites' gradients and SCAFFOLD's corrections are in the standardised coordinates, the same at every
    site."""

    mean: np.ndarray  # float64, (features,)
    scale: np.ndarray  # float64, (features,): the standard deviation, 1 where a feature never varies

    @classmethod
    def from_sums(cls, count: int, sums: np.ndarray, squares: np.ndarray) -> "Standardisation":
        """From the sites' summed `standardisation_sums` (float64)."""
        mean = sums / count
        deviation = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
        return cls(mean, np.where(deviation > 0, deviation, 1.0))

    def features(self, features: np.ndarray) -> np.ndarray:
        """Standardised, in float32 as the head takes them."""
        return (features - self.mean.astype(np.float32)) / self.scale.astype(np.float32)

    def to_standardised(self, weights: list[np.ndarray]) -> list[np.ndarray]:
        """The head's weights (the recipe's: first the Dense kernel and bias) for standardised features."""
        kernel, bias = np.asarray(weights[0], np.float64), np.asarray(weights[1], np.float64)
        return [(kernel * self.scale[:, None]).astype(np.float32), (bias + self.mean @ kernel).astype(np.float32),
                *weights[2:]]

    def from_standardised(self, weights: list[np.ndarray]) -> list[np.ndarray]:
        """The inverse of `to_standardised`: the head for the backbone's features as they are."""
        kernel = np.asarray(weights[0], np.float64) / self.scale[:, None]
        return [kernel.astype(np.float32), (np.asarray(weights[1], np.float64) - self.mean @ kernel).astype(np.float32),
                *weights[2:]]

    def to_config(self) -> dict[str, bytes]:
        """For a message's ConfigRecord (bytes travel exactly, in Flower's legacy messages too)."""
        return {"feature-mean": self.mean.astype(np.float64).tobytes(),
                "feature-scale": self.scale.astype(np.float64).tobytes()}

    @classmethod
    def from_config(cls, config) -> "Standardisation":
        return cls(np.frombuffer(config["feature-mean"], np.float64),
                   np.frombuffer(config["feature-scale"], np.float64))


class LocalTrainer:
    """Local training of one head, traced once: every round starts again from the round's global
    weights with a fresh optimizer state (its variables zeroed, not made anew, so that the traced
    step is kept; a new trace per round cost ~0.4 s a site).

    `optimizer` "adam": the recipe's Adam, each site its own (FedAvg, FedProx); "sgd": plain
    gradient steps, so that the server's optimizer (FedAdam) sees the sites' average gradient."""

    def __init__(self, head, optimizer: str = "adam"):
        import keras
        import tensorflow as tf

        self.head = head
        self.optimizer = keras.optimizers.Adam() if optimizer == "adam" else keras.optimizers.SGD()
        self.optimizer.build(head.trainable_variables)
        self.anchors = [tf.Variable(v, trainable=False) for v in head.trainable_variables]
        self.mu = tf.Variable(0.0, trainable=False)
        # SCAFFOLD's correction of each gradient: the federation's gradient at the global head minus
        # this site's (zero without it).
        self.correction = [tf.Variable(tf.zeros_like(v), trainable=False) for v in head.trainable_variables]
        self.seeded = [layer for layer in head.layers if getattr(layer, "seed_generator", None) is not None]
        loss_of = keras.losses.CategoricalCrossentropy()
        dim, classes = head.input_shape[-1], head.output_shape[-1]

        def forward(features):
            """The head in training mode, but for BatchNormalization, which normalises with its stored
            statistics: a site's batches hold one class or few, and normalising by their own statistics
            would teach the head to read features centred on that site's classes (docs/federated.md)."""
            for layer in head.layers:
                features = layer(features, training=not isinstance(layer, keras.layers.BatchNormalization))
            return features

        def step(features, targets):
            with tf.GradientTape() as tape:
                outputs = forward(features)
                loss = loss_of(targets, outputs)
                proximal = tf.add_n([tf.reduce_sum(tf.square(v - a)) for v, a in zip(head.trainable_variables,
                                                                                     self.anchors)])
                total = loss + self.mu / 2 * proximal
            gradients = [g + c for g, c in zip(tape.gradient(total, head.trainable_variables), self.correction)]
            self.optimizer.apply_gradients(zip(gradients, head.trainable_variables))
            return loss, tf.reduce_mean(tf.cast(tf.argmax(outputs, 1) == tf.argmax(targets, 1), tf.float32))

        # All of a round's steps in one call: one at a time, calling into TensorFlow took 5 ms a step,
        # most of a site's round.
        @tf.function(input_signature=[tf.TensorSpec([None, None, dim], tf.float32),
                                      tf.TensorSpec([None, None, classes], tf.float32)])
        def steps(features, targets):
            """`step` on each batch in turn: the mean loss and accuracy over the batches."""
            totals = tf.zeros([2])
            for index in tf.range(tf.shape(features)[0]):
                totals += tf.stack(step(features[index], targets[index]))
            return totals / tf.cast(tf.shape(features)[0], tf.float32)

        @tf.function(input_signature=[tf.TensorSpec([None, dim], tf.float32), tf.TensorSpec([None, classes], tf.float32)])
        def gradient(features, targets):
            with tf.GradientTape() as tape:
                loss = loss_of(targets, forward(features))
            return tape.gradient(loss, head.trainable_variables)

        self.steps, self.batch_gradient = steps, gradient

    def gradient(self, site: SiteTables, weights: list[np.ndarray], standardisation: Standardisation, *,
                 seed: int) -> list[np.ndarray]:
        """The mean gradient of the loss over the site's training films (each as itself), at `weights`,
        in the standardised coordinates: what SCAFFOLD's control variates are made of."""
        self.head.set_weights(standardisation.to_standardised(weights))
        self.reseed(seed)
        one_hot = np.eye(len(site.classes), dtype=np.float32)
        films = standardisation.features(site.train[:, 0])
        total = [np.zeros(v.shape, np.float64) for v in self.head.trainable_variables]
        for start in range(0, len(site.train), GRADIENT_PASS):
            rows = slice(start, start + GRADIENT_PASS)
            gradients = self.batch_gradient(films[rows], one_hot[site.train_labels[rows]])
            for accumulated, g in zip(total, gradients):
                accumulated += np.asarray(g, np.float64) * len(site.train_labels[rows])
        return [(t / len(site.train)).astype(np.float32) for t in total]

    def reseed(self, seed: int) -> None:
        """Dropout masks drawn from `seed`, not from wherever the last round left the generators."""
        for layer in self.seeded:
            layer.seed_generator.state.assign([seed % 2**62, 0])

    def update(self, site: SiteTables, weights: list[np.ndarray], standardisation: Standardisation, *, steps: int,
               batch_size: int, learning_rate: float, proximal_mu: float, seed: int,
               correction: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], float, float]:
        """The head's weights after `steps` batches on the site's training films, starting from the
        round's global `weights`, with the mean training loss and accuracy over those batches. The
        steps are taken on standardised features (`standardisation`); the weights come and go as the
        recipe's head has them. Each batch draws films at random (seeded by `seed`) and shows each as
        one of its views, as the cached engine's epochs do. `proximal_mu` > 0 adds FedProx's term
        mu/2 * ||w - w_global||^2 to the loss, so that a site holding one class cannot drag the head
        far from what the others agreed. `correction` (SCAFFOLD) is added to every gradient."""
        self.head.set_weights(standardisation.to_standardised(weights))
        for anchor, variable in zip(self.anchors, self.head.trainable_variables):
            anchor.assign(variable)
        for variable in self.optimizer.variables:
            variable.assign(learning_rate if variable.path.endswith("learning_rate") else np.zeros(variable.shape))
        self.mu.assign(proximal_mu)
        for variable, value in zip(self.correction, correction or [np.zeros(v.shape) for v in self.correction]):
            variable.assign(value)
        self.reseed(seed)
        one_hot = np.eye(len(site.classes), dtype=np.float32)
        rng = np.random.default_rng(seed)
        batches = []
        for _ in range(steps):
            rows = rng.choice(len(site.train), min(batch_size, len(site.train)), replace=False)
            batches.append((rows, rng.integers(site.train.shape[1], size=len(rows))))
        loss, accuracy = self.steps(standardisation.features(np.stack([site.train[r, v] for r, v in batches])),
                                    np.stack([one_hot[site.train_labels[r]] for r, _ in batches])).numpy()
        return standardisation.from_standardised(self.head.get_weights()), float(loss), float(accuracy)


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


def standardisation_sums(features: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """The count, and the sum and sum of squares (float64) of each feature over the training films."""
    features = np.asarray(features, np.float64)
    return len(features), features.sum(axis=0), np.square(features).sum(axis=0)


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
