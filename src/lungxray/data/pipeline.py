"""tf.data input pipelines, reproducing what `ImageDataGenerator.flow_from_directory` fed the model.

Both training engines draw their batches from the same `EpochPlan`: for epoch e, a permutation of
the training set and a coin flip per sample, both from `numpy.random.default_rng([seed, e])`. The
end-to-end engine turns a batch of indices into images; the cached engine into stored features.
That is what makes the two engines train on exactly the same batches with exactly the same flips.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from lungxray.data.images import ImageError, read_image
from lungxray.data.records import Record
from lungxray.parallel import bounded_map


class EpochPlan:
    """Shuffled order and per-sample flips for each epoch; each call yields one epoch's batches.

    Keras iterates a dataset afresh at every epoch, which calls this generator again; the training
    loop sets `epoch` first (see `lungxray.train.FollowEpoch`), so a resumed run draws the same
    batches as an uninterrupted one.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, flip: bool, shuffle: bool = True):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.flip, self.shuffle = flip, shuffle
        self.epoch = 0

    def epoch_arrays(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        flips = rng.random(self.num_samples) < 0.5 if self.flip else np.zeros(self.num_samples, bool)
        return order, flips

    def __call__(self):
        order, flips = self.epoch_arrays(self.epoch)
        for start in range(0, self.num_samples, self.batch_size):
            yield order[start:start + self.batch_size], flips[start:start + self.batch_size]


BatchLoader = Callable[[np.ndarray, np.ndarray], np.ndarray]


def batches(plan: EpochPlan, load: BatchLoader, labels: np.ndarray, num_classes: int,
            input_shape: tuple[int, ...]) -> tf.data.Dataset:
    """(inputs, one-hot labels) batches following `plan`; `load(indices, flips)` makes the inputs."""
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]

    def load_batch(indices, flips):
        return load(indices, flips).astype(np.float32), one_hot[indices]

    def to_tensors(indices, flips):
        x, y = tf.numpy_function(load_batch, [indices, flips], [tf.float32, tf.float32], stateful=False)
        x.set_shape((None, *input_shape))
        y.set_shape((None, num_classes))
        return x, y

    spec = (tf.TensorSpec((None,), tf.int64), tf.TensorSpec((None,), tf.bool))
    steps = -(-plan.num_samples // plan.batch_size)
    dataset = tf.data.Dataset.from_generator(plan, output_signature=spec)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(steps))
    return dataset.map(to_tensors, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)


def image_loader(records: list[Record], image_size: int, interpolation: str = "nearest") -> BatchLoader:
    """Decode a batch of records to float32 RGB in [0, 255], mirroring those whose flip is set."""
    paths = [r.path for r in records]

    def load(indices: np.ndarray, flips: np.ndarray) -> np.ndarray:
        images = np.stack([read_image(paths[i], image_size, interpolation) for i in indices])
        images[flips] = images[flips][:, :, ::-1]
        return images

    return load


def scan_images(records: list[Record], image_size: int, interpolation: str = "nearest",
                workers: int | None = None, desc: str = "checking images") -> tuple[list[Record], list[ImageError]]:
    """Decode every record once; return the readable records and an error per unreadable one."""

    def check(record: Record):
        try:
            read_image(record.path, image_size, interpolation)
            return None
        except ImageError as error:
            return error

    results = list(tqdm(bounded_map(check, records, workers), total=len(records), desc=desc, unit="img"))
    readable = [r for r, error in zip(records, results) if error is None]
    return readable, [e for e in results if e is not None]
