"""Training: the reference recipe, on one of two engines that train exactly the same head.

- `keras`: end to end, images through the frozen backbone at every step (the reference's way).
- `cached`: every training image's backbone output, and its mirror image's, computed once (and
  cached on disk); the head then trains on 576-number vectors. Same batches, same flips, same
  optimiser, same checkpoint and early-stopping rules: the same training, much faster.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import logging
import time
from pathlib import Path

import keras
import numpy as np

from lungxray.config import Config
from lungxray.data.images import ImageError
from lungxray.calibration import fit_temperature
from lungxray.data.pipeline import EpochPlan, feature_batches, image_batches, image_loader, scan_images
from lungxray.data.records import DataError, Dataset, Record, assign_splits, load_dataset, write_manifest
from lungxray.evaluate import evaluate
from lungxray.evaluate.plots import plot_history
from lungxray.features import FeatureExtractor, file_hashes
from lungxray.io import atomic_path, write_json, write_text
from lungxray.model import build_backbone, build_head, build_model, compile_for_training
from lungxray.ood import OutOfDistribution
from lungxray.predict import MODEL_FILE, OOD_FILE, TRAIN_HASHES, Predictor, save_model

log = logging.getLogger("lungxray")


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    engine: str
    history: dict[str, list[float]]
    test_metrics: dict | None
    timings: dict[str, float]
    external_metrics: dict | None = None


def choose_engine(config: Config) -> tuple[str, str]:
    """The engine to use and why."""
    if config.engine != "auto":
        return config.engine, f"--engine {config.engine} was asked for"
    return "cached", ("the backbone is frozen during head training and the only augmentation is a "
                      "horizontal flip, so each image has exactly two possible backbone outputs")


class FollowEpoch(keras.callbacks.Callback):
    """Tell the batch plan which epoch Keras is starting, before it draws that epoch's batches."""

    def __init__(self, plan: EpochPlan):
        super().__init__()
        self.plan = plan

    def on_epoch_begin(self, epoch, logs=None):
        self.plan.epoch = epoch


class SaveBest(keras.callbacks.Callback):
    """Save the weights whenever `monitor` improves, atomically (an interruption keeps the last best)."""

    def __init__(self, path: Path, monitor: str, mode: str):
        super().__init__()
        self.path, self.monitor, self.mode = Path(path), monitor, mode
        self.best = -np.inf if mode == "max" else np.inf

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        improved = value is not None and (value > self.best if self.mode == "max" else value < self.best)
        if improved:
            self.best = value
            with atomic_path(self.path) as temporary:
                self.model.save_weights(temporary)


def train(data, out: str | Path | None = None, config: Config | None = None,
          cache_dir: Path | None = None) -> TrainResult:
    """Train the recipe on `data` (any layout `load_dataset` reads) into the run folder `out`."""
    config = config or Config()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    keras.utils.set_random_seed(config.seed)

    dataset = assign_splits(load_dataset(data), config.split_ratios, config.seed)
    dataset, external = split_off_source(dataset, config.holdout_source)
    backbone = build_backbone(config.weights, config.image_size, config.pooling)
    head = build_head(backbone.output_shape[-1], len(dataset.classes), config.dense_units, config.dropout, config.seed)
    model = build_model(backbone, head)
    run_dir = _run_folder(out)
    config.save(run_dir / "config.json")
    write_manifest(dataset, run_dir / "data.csv")
    _log_counts(dataset)
    engine, reason = choose_engine(config)
    log.info("engine: %s (%s)", engine, reason)
    timings["setup"] = time.perf_counter() - started

    tick = time.perf_counter()
    if engine == "cached":
        inputs = _prepare_cached(dataset, backbone, head, config, cache_dir)
    else:
        inputs = _prepare_keras(dataset, model, config)
    timings["prepare"] = time.perf_counter() - tick
    train_records, val_records = inputs.drop_unreadable(dataset, config, run_dir)
    write_text(run_dir / TRAIN_HASHES, "".join(f"{h}\n" for h in inputs.train_hashes if h))
    plan = EpochPlan(len(train_records), config.batch_size, config.seed, config.horizontal_flip)
    val_plan = EpochPlan(len(val_records), config.batch_size, config.seed, flip=False, shuffle=False)
    train_labels, val_labels = dataset.labels(train_records), dataset.labels(val_records)
    train_data, val_data = inputs.batches(plan, val_plan, train_labels, val_labels, len(dataset.classes))

    tick = time.perf_counter()
    history = _fit(inputs.fit_model, plan, train_data, val_data, config, run_dir, inputs.steps_per_execution(plan),
                   config.learning_rate, config.epochs)
    timings["head_training"] = time.perf_counter() - tick

    if config.fine_tune_epochs > 0:
        tick = time.perf_counter()
        history = _fine_tune(model, dataset, train_records, val_records, config, run_dir, history)
        timings["fine_tuning"] = time.perf_counter() - tick
        # the backbone changed: its features are new
        inputs.extractor, inputs.train_table, inputs.val_table = None, None, None

    tick = time.perf_counter()
    predictor = Predictor(model, dataset.classes, config.image_size, config.interpolation, config.feature_runtime,
                          cache_dir, features=inputs.extractor, train_hashes=set(inputs.train_hashes) - {None})
    # The cached engine has every feature in hand; after the Keras engine or fine-tuning, extract them.
    train_features, val_features = inputs.train_features, inputs.val_features
    if val_features is None:
        val_features = predictor.features.extract([r.path for r in val_records], desc="calibrating").features["orig"]
        train_features = predictor.features.extract([r.path for r in train_records], desc="OOD features").features["orig"]
    val_raw = predictor.predict_features(val_features, calibrated=False)
    predictor.temperature = fit_temperature(val_raw, val_labels)
    log.info("temperature scaling, fitted on validation: T = %.3f", predictor.temperature)
    predictor.ood = OutOfDistribution.fit(train_features, val_features)
    predictor.ood.save(run_dir / OOD_FILE)
    save_model(model, run_dir / MODEL_FILE, dataset.classes, config.image_size, config.interpolation,
               {"engine": engine, "temperature": predictor.temperature,
                "trained": datetime.datetime.now().isoformat(timespec="seconds"),
                "data": dataset.source, "counts": dataset.counts(), "holdout_source": config.holdout_source,
                "validation": {"accuracy": float(np.mean(val_raw.argmax(axis=1) == val_labels))}})
    _plot_history(history, run_dir)
    timings["saving"] = time.perf_counter() - tick

    tick = time.perf_counter()
    test_metrics = external_metrics = None
    by = [c for c in ("source", "age_group") if any(c in r.extra for r in dataset.records)]
    if dataset.split("test"):
        test_metrics = evaluate(predictor, dataset, run_dir / "evaluation", split="test", by=by,
                                title="Internal test split")
    if external is not None:
        external_metrics = evaluate(predictor, external, run_dir / "evaluation-external", by=by,
                                    title=f"External test: source '{config.holdout_source}', never seen in training")
    timings["evaluation"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started
    write_json(run_dir / "timings.json", timings)
    result = TrainResult(run_dir, engine, history, test_metrics, timings, external_metrics)
    write_report(result, dataset, config, reason)
    return result


@dataclasses.dataclass
class EngineInputs:
    """What an engine prepared before training: the model it fits and how to feed it.

    Rows of `train_table`/`val_table` (cached engine) and the record lists line up with the
    dataset's train and val splits until `drop_unreadable` removes the unreadable ones."""

    engine: str
    fit_model: keras.Model
    train_records: list[Record]
    val_records: list[Record]
    errors: list[ImageError]
    train_hashes: list[str | None]
    config: Config
    extractor: FeatureExtractor | None = None
    train_table: np.ndarray | None = None  # (n, 2, dim): features of each image and of its mirror image
    val_table: np.ndarray | None = None  # (n, 1, dim)

    @property
    def train_features(self) -> np.ndarray | None:
        return None if self.train_table is None else self.train_table[:, 0]

    @property
    def val_features(self) -> np.ndarray | None:
        return None if self.val_table is None else self.val_table[:, 0]

    def drop_unreadable(self, dataset: Dataset, config: Config, run_dir: Path) -> tuple[list[Record], list[Record]]:
        _check_unreadable(self.errors, dataset, self.train_records + self.val_records, config, run_dir)
        bad = {e.path for e in self.errors}
        train_keep = np.array([str(r.path) not in bad for r in self.train_records], bool)
        val_keep = np.array([str(r.path) not in bad for r in self.val_records], bool)
        self.train_records = [r for r, k in zip(self.train_records, train_keep) if k]
        self.val_records = [r for r, k in zip(self.val_records, val_keep) if k]
        self.train_hashes = [h for h, k in zip(self.train_hashes, train_keep) if k]
        if self.train_table is not None:
            self.train_table, self.val_table = self.train_table[train_keep], self.val_table[val_keep]
        return self.train_records, self.val_records

    def batches(self, plan: EpochPlan, val_plan: EpochPlan, train_labels, val_labels, classes: int):
        if self.engine == "cached":
            return (feature_batches(plan, self.train_table, train_labels, classes),
                    feature_batches(val_plan, self.val_table, val_labels, classes))
        config, shape = self.config, self.fit_model.input_shape[1:]
        return (image_batches(plan, image_loader(self.train_records, config.image_size, config.interpolation),
                              train_labels, classes, shape),
                image_batches(val_plan, image_loader(self.val_records, config.image_size, config.interpolation),
                              val_labels, classes, shape))

    def steps_per_execution(self, plan: EpochPlan) -> int:
        # Cached: one execution per epoch, the fewest Python round trips for the same steps.
        return plan.steps if self.engine == "cached" else 1


def _prepare_cached(dataset, backbone, head, config, cache_dir) -> EngineInputs:
    """Backbone features of every training image and its mirror image, and of val and test."""
    train_records, val_records = dataset.split("train"), dataset.split("val")
    extractor = FeatureExtractor(backbone, config.image_size, config.interpolation, config.feature_runtime, cache_dir)
    train_pass = extractor.extract([r.path for r in train_records], flips=True, desc="train features")
    # Test features go into the cache now, so that evaluation finds them there.
    held_out_pass = extractor.extract([r.path for r in val_records + dataset.split("test")], desc="val+test features")
    val_paths = {str(r.path) for r in val_records}
    return EngineInputs(
        "cached", head, train_records, val_records,
        train_pass.errors + [e for e in held_out_pass.errors if e.path in val_paths], train_pass.hashes, config,
        extractor, np.stack([train_pass.features["orig"], train_pass.features["flip"]], axis=1),
        held_out_pass.features["orig"][: len(val_records), None])


def _prepare_keras(dataset, model, config) -> EngineInputs:
    """Check every image decodes before the first epoch; the model reads images at every step."""
    train_records, val_records = dataset.split("train"), dataset.split("val")
    _, errors = scan_images(train_records + val_records, config.image_size, config.interpolation)
    return EngineInputs("keras", model, train_records, val_records, errors,
                        file_hashes([r.path for r in train_records]), config)


def split_off_source(dataset: Dataset, source: str | None) -> tuple[Dataset, Dataset | None]:
    """Leave-one-source-out: every image of `source` leaves training and becomes an external test set."""
    if not source:
        return dataset, None
    if not any("source" in r.extra for r in dataset.records):
        raise DataError("--holdout-source needs a manifest CSV with a 'source' column")
    sources = sorted({r.extra.get("source", "") for r in dataset.records})
    if source not in sources:
        raise DataError(f"source '{source}' is not in the data; its sources are {sources}")
    kept = [r for r in dataset.records if r.extra.get("source") != source]
    held = [dataclasses.replace(r, split="test") for r in dataset.records if r.extra.get("source") == source]
    return (dataclasses.replace(dataset, records=kept),
            dataclasses.replace(dataset, records=held, source=f"{dataset.source} (source={source})"))


def _run_folder(out) -> Path:
    if out is None:
        out = Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(out)
    if (out / MODEL_FILE).exists():
        raise DataError(f"{out} already holds a trained model; choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _log_counts(dataset: Dataset) -> None:
    for split, row in dataset.counts().items():
        log.info("%-5s %s", split, "  ".join(f"{c}: {n}" for c, n in row.items()))


def _check_unreadable(errors: list[ImageError], dataset: Dataset, records: list[Record], config: Config,
                      run_dir: Path) -> None:
    """Report unreadable images by path; refuse to train only if a class would be empty or too
    large a share of the images is unreadable."""
    if not errors:
        return
    with atomic_path(run_dir / "unreadable.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "reason"])
        writer.writerows([e.path, e.reason] for e in errors)
    log.warning("%d unreadable image(s) left out (listed in %s):", len(errors), run_dir / "unreadable.csv")
    for error in errors[:20]:
        log.warning("  %s", error)
    share = len(errors) / max(1, len(records))
    if share > config.max_unreadable_fraction:
        raise DataError(f"{len(errors)} of {len(records)} images ({share:.1%}) are unreadable, more than "
                        f"max_unreadable_fraction={config.max_unreadable_fraction}; see {run_dir / 'unreadable.csv'}")
    unreadable = {e.path for e in errors}
    for split in ("train", "val"):
        for name in dataset.classes:
            if not any(r.split == split and r.label == name and str(r.path) not in unreadable for r in records):
                raise DataError(f"class '{name}' has no readable images in the {split} split; "
                                f"see {run_dir / 'unreadable.csv'}")


def _fit(fit_model, plan, train_data, val_data, config, run_dir, steps_per_execution, learning_rate, epochs,
         initial_epoch=0) -> dict[str, list[float]]:
    compile_for_training(fit_model, learning_rate, min(steps_per_execution, plan.steps))
    mode = "max" if config.monitor.endswith("accuracy") else "min"
    callbacks = [
        FollowEpoch(plan),
        SaveBest(run_dir / "checkpoint.weights.h5", config.monitor, mode),
        keras.callbacks.EarlyStopping(monitor=config.monitor, mode=mode, patience=config.early_stopping_patience,
                                      restore_best_weights=True, verbose=1),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=initial_epoch > 0),
    ]
    history = fit_model.fit(train_data, validation_data=val_data, epochs=initial_epoch + epochs,
                            initial_epoch=initial_epoch, callbacks=callbacks, shuffle=False, verbose="auto")
    return {k: [float(v) for v in values] for k, values in history.history.items()}


def _fine_tune(model, dataset, train_records, val_records, config, run_dir, history):
    """Unfreeze the top of the backbone (BatchNorm layers stay frozen) and train end to end on images."""
    backbone = model.get_layer("backbone")
    backbone.trainable = True
    first_tuned = len(backbone.layers) - config.fine_tune_layers
    for index, layer in enumerate(backbone.layers):
        layer.trainable = index >= first_tuned and not isinstance(layer, keras.layers.BatchNormalization)
    shape, classes = backbone.input_shape[1:], len(dataset.classes)
    plan = EpochPlan(len(train_records), config.batch_size, config.seed, config.horizontal_flip)
    val_plan = EpochPlan(len(val_records), config.batch_size, config.seed, flip=False, shuffle=False)
    train_data = image_batches(plan, image_loader(train_records, config.image_size, config.interpolation),
                               dataset.labels(train_records), classes, shape)
    val_data = image_batches(val_plan, image_loader(val_records, config.image_size, config.interpolation),
                             dataset.labels(val_records), classes, shape)
    more = _fit(model, plan, train_data, val_data, config, run_dir, 1, config.fine_tune_learning_rate,
                config.fine_tune_epochs, initial_epoch=len(history["loss"]))
    return {k: history.get(k, []) + more.get(k, []) for k in history}


def _plot_history(history: dict[str, list[float]], run_dir: Path) -> None:
    plot_history(history, "loss", run_dir / "loss.png")
    plot_history(history, "accuracy", run_dir / "accuracy.png")


def write_report(result: TrainResult, dataset: Dataset, config: Config, engine_reason: str) -> None:
    """A short report.md linking every artefact of the run."""
    history = result.history
    best = int(np.argmax(history["val_accuracy"]))
    lines = [
        "# lungxray run report", "",
        f"- Data: `{dataset.source}` ({dataset.layout} layout), classes: {', '.join(dataset.classes)}",
        f"- Engine: **{result.engine}** ({engine_reason})",
        f"- Backbone weights: `{config.weights}`; configuration: [config.json](config.json); "
        f"data and splits: [data.csv](data.csv)",
        f"- Epochs run: {len(history['loss'])}; best val_accuracy {history['val_accuracy'][best]:.4f} "
        f"at epoch {best + 1} (weights restored from it)",
        f"- Wall time: {result.timings['total']:.1f} s ([timings.json](timings.json))", "",
        "| split | " + " | ".join(dataset.classes) + " |", "|---|" + "---|" * len(dataset.classes),
    ]
    for split, row in dataset.counts().items():
        lines.append(f"| {split} | " + " | ".join(str(row[c]) for c in dataset.classes) + " |")
    lines += ["", "## Training curves", "", "![loss](loss.png) ![accuracy](accuracy.png)", "",
              "Per-epoch values: [history.csv](history.csv). Model: [model.keras](model.keras).", ""]
    evaluations = [("Internal test split", "evaluation", result.test_metrics)]
    if result.external_metrics:
        evaluations.append((f"External test: source `{config.holdout_source}` (never seen in training)",
                            "evaluation-external", result.external_metrics))
    evaluations = [e for e in evaluations if e[2]]
    if evaluations:
        lines += ["## Test evaluation", "",
                  "| | " + " | ".join(name for name, _, _ in evaluations) + " |", "|---|" + "---|" * len(evaluations)]

        def cell(metrics, key):
            entry = metrics.get("intervals", {}).get(key)
            if not entry or entry["value"] is None:
                return "n/a"
            low, high = entry["ci95"] or (float("nan"), float("nan"))
            return f"{entry['value']:.3f} ({low:.3f}–{high:.3f})"

        rows = [("images", lambda m: str(m["n"])), ("accuracy (95% CI)", lambda m: cell(m, "accuracy")),
                ("macro F1", lambda m: cell(m, "macro_f1")), ("macro AUROC", lambda m: cell(m, "macro_auroc"))]
        rows += [(f"sensitivity {c}", lambda m, c=c: cell(m, f"sensitivity/{c}")) for c in dataset.classes]
        rows += [("ECE after temperature scaling", lambda m: f"{m['calibration']['ece']:.3f}")]
        for label, value in rows:
            lines.append(f"| {label} | " + " | ".join(value(m) for _, _, m in evaluations) + " |")
        for name, folder, m in evaluations:
            lines += ["", f"### {name}", "",
                      f"[report.html]({folder}/report.html) (curves, calibration, subgroups, model card), "
                      f"[metrics.json]({folder}/metrics.json), [classification report]({folder}/classification_report.txt), "
                      f"[predictions]({folder}/predictions.csv).", "",
                      "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
            lines += [f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
                      for c, v in m["per_class"].items()]
            lines += ["", f"![confusion matrix]({folder}/confusion_matrix.png) "
                      f"![normalised confusion matrix]({folder}/confusion_matrix_normalized.png)"]
    write_text(result.run_dir / "report.md", "\n".join(lines))
