"""tf.data input pipelines, reproducing what `ImageDataGenerator.flow_from_directory` fed the model.

Both training engines draw their batches from the same `EpochPlan`: for epoch e, a permutation of
the training set and the view each sample is shown as (a coin flip between an image and its mirror
image, or one of `views` training views, `lungxray.data.acquisition`), both from
`numpy.random.default_rng([seed, e])`. The end-to-end engine turns a batch of indices and views into
images; the cached engine into stored features. That is what makes the two engines train on exactly
the same batches with exactly the same views.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import tensorflow as tf

from lungxray.data.acquisition import read_views
from lungxray.data.images import read_image
from lungxray.data.records import Record
from lungxray.errors import ImageError
from lungxray.parallel import bounded_map, progress


class EpochPlan:
    """Shuffled order and per-sample views for each epoch, from `default_rng([seed, epoch])`.

    `views` 1: every sample as itself; 2: itself or its mirror image, by a coin flip (the reference's
    horizontal flip); more: any of its training views, with equal chances.

    The training loop sets `epoch` before Keras draws that epoch's batches (see
    `lungxray.training.engines.FollowEpoch`), so a resumed run draws the same batches as an uninterrupted one.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, views: int = 1, shuffle: bool = True):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.views, self.shuffle = views, shuffle
        self.epoch = 0

    @property
    def steps(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def epoch_arrays(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        if self.views == 1:
            views = np.zeros(self.num_samples)
        elif self.views == 2:  # the coin the reference's flips were drawn with, kept so that runs stay the same
            views = rng.random(self.num_samples) < 0.5
        else:
            views = rng.integers(self.views, size=self.num_samples)
        return order.astype(np.int64), views.astype(np.int64)

    def __call__(self):
        """This epoch's (indices, views) batches, as NumPy arrays."""
        order, views = self.epoch_arrays(self.epoch)
        for start in range(0, self.num_samples, self.batch_size):
            yield order[start:start + self.batch_size], views[start:start + self.batch_size]

    def dataset(self, shares: Shares | None = None) -> tf.data.Dataset:
        """The same batches as a tf.data pipeline; each pass over it asks for the plan once.

        `shares` `((i, j...), n)`: of every batch, only shares i, j... of n (share i: samples i, i+n...),
        one after the other: what one input pipeline feeds its replicas under `tf.distribute`."""
        plan = tf.data.Dataset.range(1).map(
            lambda _: tuple(tf.numpy_function(lambda: self.epoch_arrays(self.epoch), [], [tf.int64, tf.int64],
                                              stateful=True)))
        batched = plan.flat_map(lambda order, views: tf.data.Dataset.from_tensor_slices(
            (tf.ensure_shape(order, (self.num_samples,)), tf.ensure_shape(views, (self.num_samples,)))
        ).batch(self.batch_size))
        if shares is None:
            return batched.apply(tf.data.experimental.assert_cardinality(self.steps))
        indices, count = shares
        return batched.flat_map(lambda order, views: functools.reduce(tf.data.Dataset.concatenate, [
            tf.data.Dataset.from_tensors((order[i::count], views[i::count])) for i in indices]))


BatchLoader = Callable[[np.ndarray, np.ndarray], np.ndarray]
Shares = tuple[tuple[int, ...], int]


def image_batches(plan: EpochPlan, load: BatchLoader, labels: np.ndarray, num_classes: int,
                  input_shape: tuple[int, ...], weights: np.ndarray | None = None,
                  shares: Shares | None = None) -> tf.data.Dataset:
    """(images, one-hot labels[, sample weights]) batches following `plan`; `load(indices, views)`
    decodes the images."""
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    weights = None if weights is None else tf.constant(weights, tf.float32)

    def load_batch(indices, views):
        return load(indices, views).astype(np.float32), one_hot[indices]

    def to_tensors(indices, views):
        x, y = tf.numpy_function(load_batch, [indices, views], [tf.float32, tf.float32], stateful=False)
        batch = tf.ensure_shape(x, (None, *input_shape)), tf.ensure_shape(y, (None, num_classes))
        return batch if weights is None else (*batch, tf.gather(weights, indices))

    return plan.dataset(shares).map(to_tensors, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)


def feature_batches(plan: EpochPlan, table: np.ndarray, labels: np.ndarray, num_classes: int,
                    weights: np.ndarray | None = None, shares: Shares | None = None) -> tf.data.Dataset:
    """(features, one-hot labels[, sample weights]) batches following `plan`, looked up in the graph.

    `table` is (samples, views, dim): view 0 is the image's features, view 1 its mirror image's, and
    so on (`lungxray.data.acquisition`).
    """
    # A constant holds the table twice and is copied again into the pipeline's graph (measured: 4x its
    # size at peak, 1.2 GB for 70,000 images and their mirror images); a variable is read where it
    # lies. Under a distribution strategy a variable would be mirrored to every replica: a constant there.
    table = tf.Variable(table, trainable=False, dtype=tf.float32) if shares is None else tf.constant(table, tf.float32)
    one_hot = tf.constant(np.eye(num_classes, dtype=np.float32)[labels])
    weights = None if weights is None else tf.constant(weights, tf.float32)

    def lookup(indices, views):
        batch = tf.gather_nd(table, tf.stack([indices, views], axis=1)), tf.gather(one_hot, indices)
        return batch if weights is None else (*batch, tf.gather(weights, indices))

    return plan.dataset(shares).map(lookup).prefetch(2)


def image_loader(records: list[Record], image_size: int, interpolation: str = "nearest",
                 intensity: str = "none", crop=None, hashes: list[str | None] | None = None) -> BatchLoader:
    """Decode a batch of records to float32 RGB in [0, 255], each as the training view it is to be
    shown as (`lungxray.data.acquisition`; views from 2 on need the records' content `hashes`)."""
    paths = [r.path for r in records]

    def load(indices: np.ndarray, views: np.ndarray) -> np.ndarray:
        return np.stack([read_views(paths[i], [int(v)], hashes[i] if hashes else "", image_size, interpolation,
                                    intensity=intensity, crop=crop)[0] for i, v in zip(indices, views)])

    return load


def scan_images(records: list[Record], image_size: int, interpolation: str = "nearest", workers: int | None = None,
                desc: str = "checking images", intensity: str = "none",
                crop=None) -> tuple[list[Record], list[ImageError]]:
    """Decode every record once; return the readable records and an error per unreadable one."""

    def check(record: Record):
        try:
            read_image(record.path, image_size, interpolation, intensity=intensity, crop=crop)
            return None
        except ImageError as error:
            return error

    results = list(progress(bounded_map(check, records, workers), len(records), desc))
    readable = [r for r, error in zip(records, results) if error is None]
    return readable, [e for e in results if e is not None]
