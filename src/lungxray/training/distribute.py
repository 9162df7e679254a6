"""Training across devices and machines with `tf.distribute`, for the phases that run Keras' fit:
the head (on cached features or on images) and fine-tuning.

    lungxray train ... --strategy auto           # multi-worker when TF_CONFIG is set, mirrored on 2+ GPUs, else none
    lungxray train ... --strategy multi-worker   # MultiWorkerMirroredStrategy; TF_CONFIG names the workers

Every worker runs the same command with its own TF_CONFIG; each takes its share of every batch
(`EpochPlan.dataset(shard=...)`), so the gradient all-reduced over the workers is the gradient of
the whole batch, as in one process. The chief (worker 0, or the task named "chief") writes the run
folder; the others write theirs in a temporary folder, removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import tensorflow as tf

from lungxray.data.pipeline import Shares
from lungxray.errors import ConfigError

STRATEGIES = ("auto", "none", "mirrored", "multi-worker")


def cluster_spec() -> dict | None:
    """TF_CONFIG, parsed; None when it is not set."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return None
    try:
        spec = json.loads(text)
        task = spec["task"]
        valid = task["type"] in spec["cluster"] and isinstance(task["index"], int)
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise ConfigError("TF_CONFIG is not a tf.distribute cluster description (it needs \"cluster\" and a "
                          "\"task\" with the type and index of this worker); see docs/scale.md")
    return spec


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The strategy `name` asks for. Multi-worker must be made before TensorFlow runs anything."""
    if name not in STRATEGIES:
        raise ConfigError(f"'strategy' must be one of {list(STRATEGIES)}. Got {name!r} instead.")
    spec = cluster_spec()
    if name == "auto":
        name = "multi-worker" if spec else "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "none"
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "multi-worker" and spec is None:
        raise ConfigError("--strategy multi-worker needs TF_CONFIG, naming every worker and this one's index; "
                          "see docs/scale.md")
    if name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        _reduce_scalars_over_workers()
    logging.getLogger("lungxray").info("strategy: %s, %d replicas", name, strategy.num_replicas_in_sync)
    return strategy


def is_chief() -> bool:
    """Whether this process writes the run: no cluster, the task named chief, or worker 0 of a cluster without one."""
    spec = cluster_spec()
    if spec is None:
        return True
    task = spec["task"]
    return task["type"] == "chief" or (task["type"] == "worker" and task["index"] == 0 and "chief" not in spec["cluster"])


@contextlib.contextmanager
def run_folder(out: str | Path | None) -> Iterator[str | Path | None]:
    """`out` for the chief; for another worker, a temporary folder of its own, removed afterwards."""
    if is_chief():
        yield out
        return
    scratch = tempfile.mkdtemp(prefix="lungxray-worker-")
    try:
        yield Path(scratch) / "run"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def replicas() -> int:
    """How many replicas the strategy in scope trains on (1 outside any)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def distributed(make_dataset: Callable[[Shares | None], tf.data.Dataset]):
    """`make_dataset(shares)` as the strategy in scope wants it: whole batches with one replica; with
    n, every batch cut into n shares, each input pipeline yielding those of its own replicas."""
    count = replicas()
    if count == 1:
        return make_dataset(None)

    def pipeline(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = count // context.num_input_pipelines
        first = context.input_pipeline_id * local
        return make_dataset((tuple(range(first, first + local)), count))

    return tf.distribute.get_strategy().distribute_datasets_from_function(pipeline)


def build_before_fit(model) -> None:
    """Keras 3 builds a model on its first batch by reducing the whole (x, y) batch across replicas in
    one call, which MultiWorkerMirroredStrategy refuses ("Attempt to convert a value (PerReplica...)",
    keras-team/keras#20585, tensorflow/tensorflow#72388). Build it, and its loss and metrics, from
    one replica's share instead: only shapes and dtypes are read."""
    strategy = model.distribute_strategy
    if strategy.num_replicas_in_sync == 1:
        return

    def from_local_share(iterator=None, data_batch=None):
        if data_batch is None:
            for _, _, batches in iterator:
                data_batch = next(batches)
                break
        local = tf.nest.map_structure(lambda value: strategy.experimental_local_results(value)[0], data_batch)
        with strategy.scope():
            model._symbolic_build(data_batch=local)

    model._maybe_symbolic_build = from_local_share


def _reduce_scalars_over_workers() -> None:
    """Keras 3 averages each step's logs over multi-worker replicas with `reduce("MEAN", v, axis=0)`,
    which fails for the scalar loss and metrics ("Invalid reduction dimension 0 for input with 0
    dimensions", the same upstream issue): scalars are averaged with axis=None."""
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer.reduce_per_replica, "lungxray", False):
        return
    original = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None if v.shape.rank == 0 else 0), values)
        return original(values, strategy, reduction)

    reduce_per_replica.lungxray = True
    trainer.reduce_per_replica = reduce_per_replica
