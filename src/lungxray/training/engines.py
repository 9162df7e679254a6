"""Training engines: two ways to train exactly the same head, behind one interface.

- `KerasEngine`: images through the frozen backbone at every step (the reference's way).
- `CachedEngine`: every training image's backbone output, and its mirror image's (and those of its
  other training views, `Config.views`), computed once (and cached on disk); the head then trains on
  576-number vectors. Same batches, same views, same optimiser, same checkpoint and early-stopping
  rules: the same training, much faster.

- `BlockEngine` (with `train_from`): the cached engine's way one step further, for fine-tuning. The
  backbone below the block `train_from` stays frozen, so each training image again has two possible
  inputs to the blocks above it; they are cached, and the blocks train with the head on them.

All are used the same way:

    engine = make_engine(model, config, run, cache_dir)
    plan = engine.plan(dataset)     # reads every train/val image once; unreadable ones left out
    fitted = engine.fit(plan)       # head training, then fine-tuning if configured

`fitted` holds the trained model (best epoch restored), its history and the backbone features of
the train and val images, which calibration and the out-of-distribution gate are fitted on.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import logging
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from lungxray.cluster import RayCluster
from lungxray.config import Config
from lungxray.training.distribute import build_before_fit, distributed, replicas
from lungxray.data.pipeline import EpochPlan, feature_batches, image_batches, image_loader, scan_images
from lungxray.data.records import Dataset, Record, balancing_weights
from lungxray.errors import ConfigError, DataError, ImageError
from lungxray.model.features import FeatureExtractor, file_hashes
from lungxray.model.lungs import LungCrop
from lungxray.model.network import compile_for_training, split_backbone
from lungxray.rundir import RunDir

log = logging.getLogger("lungxray")

WORST_GROUP = "val_worst_group_accuracy"
BALANCE_COLUMNS = {"class": (), "class_source": ("source",), "class_source_age": ("source", "age_group")}
MIN_BALANCED_CELL = 100  # cells smaller than this weigh as if they had this many images


@dataclasses.dataclass
class TrainingPlan:
    """What to fit on: the readable train and val images, their labels and content hashes, and
    (cached engine) their backbone features: (n, views, dim) for train, each image, its mirror image
    and its other training views; (n, 1, dim) for val."""

    train: list[Record]
    val: list[Record]
    train_labels: np.ndarray
    val_labels: np.ndarray
    classes: list[str]
    train_hashes: list[str | None]
    train_weights: np.ndarray | None = None  # per training image, when the config balances cells
    train_table: np.ndarray | None = None
    val_table: np.ndarray | None = None
    train_blocks: np.ndarray | None = None  # (block engine) the inputs to the blocks it trains: (n, views, h, w, c)
    val_blocks: np.ndarray | None = None  # (n, 1, h, w, c)


@dataclasses.dataclass
class FittedModel:
    model: keras.Model
    history: dict[str, list[float]]
    extractor: FeatureExtractor  # computes features of the fitted model's backbone
    train_features: np.ndarray  # (n, dim), rows of plan.train
    val_features: np.ndarray
    timings: dict[str, float]  # seconds of head training and of fine-tuning
    best_epoch: int = 0  # the (0-based) epoch whose weights the fit restored


class FollowEpoch(keras.callbacks.Callback):
    """Tell the batch plan which epoch Keras is starting, before it draws that epoch's batches."""

    def __init__(self, epochs: EpochPlan):
        super().__init__()
        self.epochs = epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.epoch = epoch


class WorstGroupAccuracy(keras.callbacks.Callback):
    """Adds `val_worst_group_accuracy` to each epoch's logs, before the callbacks that read them:
    the lowest accuracy over the validation's class x source cells of at least MIN_GROUP images
    (over classes alone when the data has no source column). Pooled validation accuracy rewards
    what the big sources share with their label (the shortcut); this rewards the epoch that does
    best on the cell it does worst on."""

    MIN_GROUP = 20

    def __init__(self, val_inputs, plan: TrainingPlan):
        super().__init__()
        self.val_inputs, self.labels = val_inputs, plan.val_labels
        if not any("source" in r.extra for r in plan.val):
            log.warning("%s: the data has no source column; the groups are the classes", WORST_GROUP)
        cells = collections.defaultdict(list)
        for index, record in enumerate(plan.val):
            cells[(record.label, record.extra.get("source", ""))].append(index)
        self.groups = [np.array(rows) for rows in cells.values() if len(rows) >= self.MIN_GROUP]
        if not self.groups:
            raise DataError(f"monitor={WORST_GROUP}: no class x source cell has {self.MIN_GROUP} validation images")

    def on_epoch_end(self, epoch, logs=None):
        predicted = np.asarray(self.model.predict(self.val_inputs, verbose=0)).argmax(axis=1)
        logs[WORST_GROUP] = float(min(np.mean(predicted[g] == self.labels[g]) for g in self.groups))


def monitor_mode(monitor: str) -> str:
    return "max" if monitor.endswith("accuracy") else "min"


def best_epoch(history: dict[str, list[float]], monitor: str) -> int:
    """The (0-based) epoch whose weights the fit restored."""
    pick = np.argmax if monitor_mode(monitor) == "max" else np.argmin
    return int(pick(history[monitor]))


class Engine(abc.ABC):
    """The shared part: the fitting loop, fine-tuning and the features for calibration. `reason`:
    why this engine was chosen (`choose_engine`), for the run's report."""

    name = ""
    reason = ""

    def __init__(self, model: keras.Model, config: Config, run: RunDir, cache_dir: Path | None = None,
                 crop: LungCrop | None = None):
        self.model, self.config, self.run, self.cache_dir, self.crop = model, config, run, cache_dir, crop

    @abc.abstractmethod
    def plan(self, dataset: Dataset) -> TrainingPlan:
        """What the fit needs of `dataset` (features, block inputs or image pipelines), checked."""

    def fit(self, plan: TrainingPlan) -> FittedModel:
        started = time.perf_counter()
        history = self._fit_head(plan)
        timings = {"head_training": time.perf_counter() - started}
        if self.config.fine_tune_epochs:
            started = time.perf_counter()
            history = self._fine_tune(plan, history)
            timings["fine_tuning"] = time.perf_counter() - started
        best, monitor = best_epoch(history, self.config.monitor), self.config.monitor
        log.info("best %s %.4f at epoch %d (weights restored from it)", monitor, history[monitor][best], best + 1)
        return dataclasses.replace(self._fitted(plan, history, timings), best_epoch=best)

    @abc.abstractmethod
    def _fit_head(self, plan: TrainingPlan) -> dict[str, list[float]]:
        """Train the head (and whatever the engine trains with it); the history per epoch."""

    def _fine_tune(self, plan: TrainingPlan, history: dict[str, list[float]]) -> dict[str, list[float]]:
        return fine_tune(self.model, plan, self.config, self.run, history, self.crop)

    def _fitted(self, plan: TrainingPlan, history, timings) -> FittedModel:
        extractor = feature_extractor(self.model.get_layer("backbone"), self.config, self.cache_dir, self.crop)
        val = extractor.extract([r.path for r in plan.val], desc="val features").vectors["orig"]
        train = extractor.extract([r.path for r in plan.train], desc="train features").vectors["orig"]
        return FittedModel(self.model, history, extractor, train, val, timings)

    def _checked_plan(self, dataset: Dataset, errors: list[ImageError], train_hashes) -> tuple[TrainingPlan, list]:
        """The plan without unreadable images, and which rows of train and val were kept."""
        train, val = dataset.split("train"), dataset.split("val")
        check_unreadable(errors, dataset, train + val, self.config.max_unreadable_fraction, self.run)
        bad = {e.path for e in errors}
        keep = [np.array([str(r.path) not in bad for r in records], bool) for records in (train, val)]
        train, val = [r for r, k in zip(train, keep[0]) if k], [r for r, k in zip(val, keep[1]) if k]
        hashes = [h for h, k in zip(train_hashes, keep[0]) if k]
        weights = (balancing_weights(train, BALANCE_COLUMNS[self.config.balance], MIN_BALANCED_CELL)
                   if self.config.balance != "none" else None)
        plan = TrainingPlan(train, val, dataset.labels(train), dataset.labels(val), dataset.classes, hashes, weights)
        return plan, keep



class CachedEngine(Engine):
    name = "cached"

    def __init__(self, model: keras.Model, config: Config, run: RunDir, cache_dir: Path | None = None,
                 crop: LungCrop | None = None, cluster: RayCluster | None = None):
        super().__init__(model, config, run, cache_dir, crop)
        self.extractor = feature_extractor(model.get_layer("backbone"), config, cache_dir, crop, cluster)

    def plan(self, dataset: Dataset) -> TrainingPlan:
        """Backbone features of every training image's views, and of val and test."""
        train, val = dataset.split("train"), dataset.split("val")
        train_pass = self.extractor.extract([r.path for r in train], self.config.views, desc="train features")
        # Test features go into the cache now, so that evaluation finds them there.
        held_out = self.extractor.extract([r.path for r in val + dataset.split("test")], desc="val+test features")
        val_paths = {str(r.path) for r in val}
        errors = train_pass.errors + [e for e in held_out.errors if e.path in val_paths]
        plan, (train_kept, val_kept) = self._checked_plan(dataset, errors, train_pass.hashes)
        # Indexing copies the table: only when an unreadable image must go.
        plan.train_table = train_pass.table if train_kept.all() else train_pass.table[train_kept]
        plan.val_table = held_out.table[: len(val)][val_kept]
        return plan

    def _fit_head(self, plan: TrainingPlan) -> dict[str, list[float]]:
        return fit_on_tables(self.model.get_layer("head"), plan, plan.train_table, plan.val_table, self.config,
                             self.run, "head", self.config.learning_rate, self.config.epochs)

    def _fitted(self, plan: TrainingPlan, history, timings) -> FittedModel:
        if self.config.fine_tune_epochs:  # the backbone changed: its features are new
            return super()._fitted(plan, history, timings)
        return FittedModel(self.model, history, self.extractor, plan.train_table[:, 0], plan.val_table[:, 0], timings)


class BlockEngine(CachedEngine):
    name = "blocks"

    def __init__(self, model: keras.Model, config: Config, run: RunDir, cache_dir: Path | None = None,
                 crop: LungCrop | None = None):
        Engine.__init__(self, model, config, run, cache_dir, crop)
        below, self.above = split_backbone(model.get_layer("backbone"), config.train_from)
        self.extractor = feature_extractor(below, config, cache_dir, crop)
        self._features = tf.function(lambda blocks: self.above(blocks, training=False), reduce_retracing=True)

    def plan(self, dataset: Dataset) -> TrainingPlan:
        """The inputs to `train_from` of every training image's views, and of val; the features the
        blocks above make of them, for head training."""
        train, val = dataset.split("train"), dataset.split("val")
        train_pass = self.extractor.extract([r.path for r in train], self.config.views, desc="train block inputs")
        val_pass = self.extractor.extract([r.path for r in val], desc="val block inputs")
        plan, (train_kept, val_kept) = self._checked_plan(dataset, train_pass.errors + val_pass.errors,
                                                          train_pass.hashes)
        plan.train_blocks = train_pass.table if train_kept.all() else train_pass.table[train_kept]
        plan.val_blocks = val_pass.table[val_kept]
        plan.train_table, plan.val_table = self.features(plan.train_blocks), self.features(plan.val_blocks)
        return plan

    def features(self, blocks: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The backbone's features, (n, views, dim), of block inputs (n, views, h, w, c), as the blocks are now."""
        flat = blocks.reshape(-1, *blocks.shape[2:])
        out = [np.asarray(self._features(flat[start:start + batch_size])) for start in range(0, len(flat), batch_size)]
        return np.concatenate(out).reshape(*blocks.shape[:2], -1)

    def _fine_tune(self, plan: TrainingPlan, history: dict[str, list[float]]) -> dict[str, list[float]]:
        """The blocks from `train_from` up (their BatchNorm layers frozen) and the head, on the cached inputs."""
        for layer in self.above.layers:
            layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
        inputs = keras.Input(self.above.input_shape[1:])
        tuned = keras.Model(inputs, self.model.get_layer("head")(self.above(inputs)), name="tuned")
        more = fit_on_tables(tuned, plan, plan.train_blocks, plan.val_blocks, self.config, self.run, "blocks",
                             self.config.fine_tune_learning_rate, self.config.fine_tune_epochs,
                             initial_epoch=len(history["loss"]))
        return {k: history.get(k, []) + more.get(k, []) for k in history}

    def _fitted(self, plan: TrainingPlan, history, timings) -> FittedModel:
        """The features of the fitted backbone come from the cached block inputs: below them it did not change."""
        extractor = feature_extractor(self.model.get_layer("backbone"), self.config, self.cache_dir, self.crop)
        return FittedModel(self.model, history, extractor, self.features(plan.train_blocks[:, :1])[:, 0],
                           self.features(plan.val_blocks)[:, 0], timings)


class KerasEngine(Engine):
    name = "keras"

    def plan(self, dataset: Dataset) -> TrainingPlan:
        """Check every image decodes before the first epoch; the model reads images at every step."""
        train, val = dataset.split("train"), dataset.split("val")
        _, errors = scan_images(train + val, self.config.image_size, self.config.interpolation,
                                intensity=self.config.intensity, crop=self.crop)
        return self._checked_plan(dataset, errors, file_hashes([r.path for r in train]))[0]

    def _fit_head(self, plan: TrainingPlan) -> dict[str, list[float]]:
        epochs, val_epochs = epoch_plans(plan, self.config)
        data = image_data(self.model, plan, epochs, val_epochs, self.config, self.crop)
        return fit_phase(self.model, plan, epochs, data, self.config, self.run, "model", self.config.learning_rate,
                         self.config.epochs)


def feature_extractor(backbone: keras.Model, config: Config, cache_dir: Path | None,
                      crop: LungCrop | None, cluster: RayCluster | None = None) -> FeatureExtractor:
    return FeatureExtractor(backbone, config.image_size, config.interpolation, config.feature_runtime, cache_dir,
                            intensity=config.intensity, crop=crop, cluster=cluster)


ENGINES = {engine.name: engine for engine in (CachedEngine, BlockEngine, KerasEngine)}


def choose_engine(config: Config) -> tuple[str, str]:
    """The engine to use and why."""
    if config.train_from:
        return "blocks", (f"train_from={config.train_from}: the backbone below it is frozen and each image has "
                          f"{config.views} training views, so {config.views} possible inputs to that block")
    if config.engine != "auto":
        return config.engine, f"engine={config.engine} was asked for"
    return "cached", ("the backbone is frozen during head training and each image has "
                      f"{config.views} training views, so exactly {config.views} possible backbone outputs")


def make_engine(model: keras.Model, config: Config, run: RunDir, cache_dir: Path | None = None,
                crop: LungCrop | None = None, cluster: RayCluster | None = None) -> Engine:
    """The engine for `config`; with a Ray `cluster`, the cached engine's features are computed there."""
    name, reason = choose_engine(config)
    log.info("engine: %s (%s)", name, reason)
    if cluster is not None and name != CachedEngine.name:
        raise ConfigError("features on Ray fill the feature cache, which only the cached engine reads: "
                          "use engine auto or cached, without train_from")
    engine = ENGINES[name](model, config, run, cache_dir, crop) if cluster is None else \
        CachedEngine(model, config, run, cache_dir, crop, cluster)
    engine.reason = reason
    return engine


def epoch_plans(plan: TrainingPlan, config: Config) -> tuple[EpochPlan, EpochPlan]:
    """Shuffled batches of training views for training; validation in order, as the images are."""
    return (EpochPlan(len(plan.train), config.batch_size, config.seed, config.views if config.horizontal_flip else 1),
            EpochPlan(len(plan.val), config.batch_size, config.seed, shuffle=False))


def image_data(model: keras.Model, plan: TrainingPlan, epochs: EpochPlan, val_epochs: EpochPlan, config: Config,
               crop: LungCrop | None):
    """(train, val) tf.data pipelines of decoded images following the epoch plans."""
    shape, classes = model.input_shape[1:], len(plan.classes)
    load = [image_loader(plan.train, config.image_size, config.interpolation, config.intensity, crop, plan.train_hashes),
            image_loader(plan.val, config.image_size, config.interpolation, config.intensity, crop)]
    return (distributed(lambda shares: image_batches(epochs, load[0], plan.train_labels, classes, shape,
                                                     plan.train_weights, shares)),
            distributed(lambda shares: image_batches(val_epochs, load[1], plan.val_labels, classes, shape,
                                                     shares=shares)))


def fit_on_tables(model: keras.Model, plan: TrainingPlan, train_table: np.ndarray, val_table: np.ndarray,
                  config: Config, run: RunDir, holds: str, learning_rate: float, num_epochs: int,
                  initial_epoch: int = 0) -> dict[str, list[float]]:
    """fit_phase on cached inputs: `train_table` (n, views, ...) holds each training image's views',
    `val_table` (n, 1, ...) each validation image's."""
    epochs, val_epochs = epoch_plans(plan, config)
    classes = len(plan.classes)
    data = (distributed(lambda shares: feature_batches(epochs, train_table, plan.train_labels, classes,
                                                       plan.train_weights, shares)),
            distributed(lambda shares: feature_batches(val_epochs, val_table, plan.val_labels, classes,
                                                       shares=shares)))
    # One graph execution per epoch: the fewest Python round trips for the same steps.
    return fit_phase(model, plan, epochs, data, config, run, holds, learning_rate, num_epochs,
                     steps_per_execution=epochs.steps, initial_epoch=initial_epoch, val_inputs=val_table[:, 0])


def fit_phase(model: keras.Model, plan: TrainingPlan, epochs: EpochPlan, data, config: Config, run: RunDir,
              holds: str, learning_rate: float, num_epochs: int, steps_per_execution: int = 1,
              initial_epoch: int = 0, val_inputs=None) -> dict[str, list[float]]:
    """Keras' fit with the reference's callbacks: keep the best weights (in the run's checkpoint for
    `holds` as they improve, and restored at the end), stop after `early_stopping_patience` epochs
    without improvement, log each epoch to the run's history. `val_inputs` (default: the validation
    batches) is what the worst-group metric predicts on."""
    if replicas() > 1:  # Keras' multi-step loop fails on distributed iterators ("must feed a value for placeholder")
        steps_per_execution = 1
    compile_for_training(model, learning_rate, min(steps_per_execution, epochs.steps))
    build_before_fit(model)
    mode, checkpoint = monitor_mode(config.monitor), run.checkpoint(holds)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    callbacks = [
        FollowEpoch(epochs),
        keras.callbacks.ModelCheckpoint(str(checkpoint), monitor=config.monitor, mode=mode, save_best_only=True,
                                        save_weights_only=True),
        keras.callbacks.EarlyStopping(monitor=config.monitor, mode=mode, patience=config.early_stopping_patience,
                                      restore_best_weights=True, verbose=1),
        keras.callbacks.CSVLogger(str(run.path(run.HISTORY)), append=initial_epoch > 0),
    ]
    if holds == "model":  # end-to-end epochs are long: an interrupted run goes on from the last one finished
        callbacks.append(keras.callbacks.BackupAndRestore(str(checkpoint.parent / "backup-model")))
    train_data, val_data = data
    if config.monitor == WORST_GROUP:
        callbacks.insert(1, WorstGroupAccuracy(val_data if val_inputs is None else val_inputs, plan))
    history = model.fit(train_data, validation_data=val_data, epochs=initial_epoch + num_epochs,
                        initial_epoch=initial_epoch, callbacks=callbacks, shuffle=False,
                        verbose=1 if sys.stdout.isatty() else 2)  # a log file gets one line per epoch
    return {k: [float(v) for v in values] for k, values in history.history.items()}


def fine_tune(model: keras.Model, plan: TrainingPlan, config: Config, run: RunDir, history,
              crop: LungCrop | None) -> dict:
    """Unfreeze the top of the backbone (BatchNorm layers stay frozen) and train end to end on images."""
    backbone = model.get_layer("backbone")
    backbone.trainable = True
    first_tuned = len(backbone.layers) - config.fine_tune_layers
    for index, layer in enumerate(backbone.layers):
        layer.trainable = index >= first_tuned and not isinstance(layer, keras.layers.BatchNormalization)
    epochs, val_epochs = epoch_plans(plan, config)
    more = fit_phase(model, plan, epochs, image_data(model, plan, epochs, val_epochs, config, crop), config, run,
                     "model", config.fine_tune_learning_rate, config.fine_tune_epochs,
                     initial_epoch=len(history["loss"]))
    return {k: history.get(k, []) + more.get(k, []) for k in history}


def check_unreadable(errors: list[ImageError], dataset: Dataset, records: list[Record], max_fraction: float,
                     run: RunDir) -> None:
    """Report unreadable images by path; refuse to train only if a class would be empty or too
    large a share of the images is unreadable."""
    if not errors:
        return
    listing = run.write_unreadable(errors)
    log.warning("%d unreadable image(s) left out (listed in %s):", len(errors), listing)
    for error in errors[:20]:
        log.warning("  %s", error)
    share = len(errors) / max(1, len(records))
    if share > max_fraction:
        raise DataError(f"{len(errors)} of {len(records)} images ({share:.1%}) are unreadable, more than "
                        f"max_unreadable_fraction={max_fraction}; see {listing}")
    unreadable = {e.path for e in errors}
    for split in ("train", "val"):
        for name in dataset.classes:
            if not any(r.split == split and r.label == name and str(r.path) not in unreadable for r in records):
                raise DataError(f"class '{name}' has no readable images in the {split} split; see {listing}")
