"""Training: the recipe from data to report, one step per function, each returning a finished object.

    data → engine (plan, fit) → calibrate → gate → save → evaluate → report

The engines (`lungxray.training.engines`) do the fitting; this module decides what happens in which order
and what goes into the run folder (`lungxray.rundir`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from pathlib import Path

import keras
import numpy as np

from lungxray.model.calibration import fit_temperature
from lungxray.model.conformal import ConformalSets
from lungxray.cluster import RayCluster
from lungxray.config import Config
from lungxray.data.records import Dataset, assign_splits, hold_out_source, load_dataset, write_manifest
from lungxray.training.distribute import make_strategy, run_folder
from lungxray.training.engines import WORST_GROUP, FittedModel, TrainingPlan, make_engine
from lungxray.errors import ConfigError
from lungxray.evaluate.evaluation import evaluate
from lungxray.evaluate.plots import plot_history
from lungxray.evaluate.schema import Metrics
from lungxray.model.lungs import LungCrop
from lungxray.model.network import build_backbone, build_head, build_model, head_probabilities
from lungxray.model.ood import OutOfDistribution
from lungxray.infer.keras_predictor import KerasPredictor
from lungxray.infer.monitoring_record import reference_records, write_records
from lungxray.training.run_report import TrainResult, write_run_report
from lungxray.rundir import RunDir

log = logging.getLogger("lungxray")


def train(data, out: str | Path | None = None, config: Config | None = None,
          cache_dir: Path | None = None, resume: bool = False, cluster: RayCluster | None = None,
          strategy: str = "auto") -> TrainResult:
    """Train the recipe on `data` (any layout `load_dataset` reads) into the run folder `out`.

    `resume` continues an interrupted run in `out` with the configuration saved there: features
    come back from the cache, head training is repeated (the same seeds give the same model), and
    end-to-end phases (Keras engine, fine-tuning) go on from their last finished epoch.

    Where the work runs is not part of the config (the model is the same, up to float rounding):
    `cluster` (`lungxray.cluster.RayCluster`) computes the backbone features the cache lacks on Ray
    workers (the same bits); `strategy` (`lungxray.training.distribute`) spreads Keras' fit over devices or
    over workers named by TF_CONFIG, every worker running this same call."""
    if resume:
        if out is None or config is not None:
            raise ConfigError("resume continues the run in `out` with its own config.json: give --out, and no "
                              "settings")
        config = Config.load(RunDir(out).path(RunDir.CONFIG))
    config = config or Config()
    distribution = make_strategy(strategy)  # first: a multi-worker strategy must exist before TensorFlow runs
    if distribution.num_replicas_in_sync > 1 and config.monitor == WORST_GROUP:
        raise ConfigError(f"monitor={WORST_GROUP} ranks epochs by predictions in dataset order, which a strategy "
                          "with several replicas does not keep: use monitor val_loss, or --strategy none")
    with run_folder(out) as folder, distribution.scope():
        return _train(data, folder, config, cache_dir, resume, cluster, distribution.num_replicas_in_sync)


def _train(data, out, config: Config, cache_dir: Path | None, resume: bool, cluster: RayCluster | None,
           replicas: int) -> TrainResult:
    keras.utils.set_random_seed(config.seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with timed(timings, "setup"):
        dataset, external = training_data(data, config)
        run = start_run(out, config, dataset, resume)
        model = network(config, len(dataset.classes), synchronized=replicas > 1)
        crop = LungCrop.trained(config.lung_masks, cache_dir) if config.crop == "lungs" else None
        engine = make_engine(model, config, run, cache_dir, crop, cluster)
    with timed(timings, "prepare"):
        plan = engine.plan(dataset)
    fitted = engine.fit(plan)
    timings.update(fitted.timings)
    with timed(timings, "saving"):
        predictor = calibrated_predictor(fitted, plan, config, provenance(engine.name, dataset, config), crop)
        predictor.save(run)
        plot_history(fitted.history, "loss", run.plot("loss"))
        plot_history(fitted.history, "accuracy", run.plot("accuracy"))
    with timed(timings, "evaluation"):
        test_metrics, external_metrics = evaluate_run(predictor, dataset, external, run, config)
    with timed(timings, "monitoring reference"):  # what a deployment is compared with
        write_records(run.path(run.REFERENCE), reference_records(predictor, [r.path for r in dataset.split("val")]))
    timings["total"] = time.perf_counter() - started
    run.write_json(run.TIMINGS, timings)
    result = TrainResult(run.folder, engine.name, engine.reason, fitted.history, fitted.best_epoch, test_metrics, timings,
                         external_metrics)
    write_run_report(run, result, dataset, config)
    return result


@contextlib.contextmanager
def timed(timings: dict[str, float], step: str):
    started = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - started


def training_data(data, config: Config, classes: list[str] | None = None) -> tuple[Dataset, Dataset | None]:
    """The data with a split for every image, and the held-out source (if configured) apart;
    `classes` fixes the class list (a federation's site may hold some of them only)."""
    dataset = assign_splits(load_dataset(data, classes), config.split_ratios, config.seed)
    dataset, external = hold_out_source(dataset, config.holdout_source)
    for split, row in dataset.counts().items():
        log.info("%-5s %s", split, "  ".join(f"{c}: {n}" for c, n in row.items()))
    return dataset, external


def start_run(out, config: Config, dataset: Dataset, resume: bool = False) -> RunDir:
    """A run folder holding what is needed to repeat the run: the configuration and the split."""
    run = RunDir.create(out, resume)
    config.save(run.path(run.CONFIG))
    write_manifest(dataset, run.path(run.DATA))
    return run


def network(config: Config, num_classes: int, synchronized: bool = False) -> keras.Model:
    backbone = build_backbone(config.weights, config.image_size, config.pooling, config.backbone)
    head = build_head(backbone.output_shape[-1], num_classes, config.dense_units, config.dropout, config.seed,
                      synchronized)
    return build_model(backbone, head)


def provenance(engine: str, dataset: Dataset, config: Config) -> dict:
    """What model.json records about how the model was made."""
    return {"engine": engine, "architecture": config.describe_model(),
            "trained": datetime.datetime.now().isoformat(timespec="seconds"),
            "data": dataset.origin, "counts": dataset.counts(), "holdout_source": config.holdout_source}


def calibrated_predictor(fitted: FittedModel, plan: TrainingPlan, config: Config, info: dict,
                         crop: LungCrop | None) -> KerasPredictor:
    """Temperature scaling and conformal sets fitted on the validation images, the out-of-distribution
    gate on the training images' features (threshold from validation), and the model: a complete KerasPredictor."""
    num_classes = len(plan.classes)
    raw = head_probabilities(fitted.model.get_layer("head"), fitted.val_features, num_classes)
    temperature = fit_temperature(raw, plan.val_labels)
    log.info("temperature scaling, fitted on validation: T = %.3f", temperature)
    info = {**info, "validation": {"accuracy": float(np.mean(raw.argmax(axis=1) == plan.val_labels))}}
    conformal = ConformalSets.fit(raw, np.asarray(plan.val_labels), plan.classes)
    return KerasPredictor(fitted.model, plan.classes, config.image_size, config.interpolation, config.intensity,
                     temperature=temperature, conformal=conformal,
                     ood=OutOfDistribution.fit(fitted.train_features, fitted.val_features),
                     train_hashes=set(plan.train_hashes) - {None}, info=info, extractor=fitted.extractor, crop=crop)


def evaluate_run(predictor: KerasPredictor, dataset: Dataset, external: Dataset | None, run: RunDir,
                 config: Config) -> tuple[Metrics | None, Metrics | None]:
    """The internal test split, and the held-out source when there is one, each in its folder."""
    by = [c for c in ("source", "age_group") if any(c in r.extra for r in dataset.records)]
    test = external_metrics = None
    if dataset.split("test"):
        test = evaluate(predictor, dataset, run.evaluation(), split="test", by=by, title="Internal test split")
    if external is not None:
        external_metrics = evaluate(predictor, external, run.evaluation(external=True), by=by,
                                    title=f"External test: source '{config.holdout_source}', never seen in training")
    return test, external_metrics
