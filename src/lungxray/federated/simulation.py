"""`lungxray federate simulate`: a federation on one machine, every site a simulated Flower client.

    data → splits → features (the cached engine's, once) → one SiteTables file per site
         → Flower's simulation engine (the ServerApp and one ClientApp per site)
         → the fitted head, temperature, conformal sets and gate → an ordinary run folder

The server side never reads a site's table: what it fits comes from the sites' replies alone, as in
a real federation. Only the evaluation at the end reads films centrally, as a simulation can (the
internal test split and the held-out source), so that the federated model is measured exactly as a
centralised run is.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from lungxray.config import Config, Federation
from lungxray.data.records import Dataset
from lungxray.environment import variables_set
from lungxray.errors import ConfigError, DataError
from lungxray.federated.result import (FEDERATION, FOLDER, FederatedFit, federation_summary, save_federated_model,
                                      sites_section)
from lungxray.federated.site import SiteTables, fingerprint
from lungxray.infer.monitoring_record import reference_records, write_records
from lungxray.io import write_json, write_text
from lungxray.training.engines import CachedEngine, TrainingPlan
from lungxray.training.recipe import evaluate_run, network, provenance, start_run, timed, training_data
from lungxray.training.run_report import TrainResult, write_run_report

# Each simulated site is given one CPU (Flower's client_resources). TensorFlow sizes its thread pools
# by the machine's cores unless told, and two sites' steps then contend for them: a site's training
# reply took 0.10 s instead of 0.07 s on 2 cores. Ray's processes inherit this environment.
ONE_THREAD_PER_SITE = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
# Ray passes objects larger than 100 KB between processes through its shared-memory store, at a
# cost of several handoffs each way; a message to a site (the head and SCAFFOLD's correction, 1.2
# MB) and its reply go inline below this size instead: a round took 0.67 s instead of 0.83 s.
INLINE = 4 * 1024 * 1024


def simulate(data, out: str | Path | None = None, config: Config | None = None,
             federation: Federation | None = None, cache_dir: Path | None = None) -> TrainResult:
    """Train the recipe's head by federation over the sites named in `data`'s `site_column`, each a
    simulated Flower client, into the run folder `out`."""
    config, federation = config or Config(), federation or Federation()
    check_recipe(config)
    keras.utils.set_random_seed(config.seed)
    started, timings = time.perf_counter(), {}
    dataset, external = training_data(data, config)
    names = site_names(dataset, federation)
    run = start_run(out, config, dataset)
    federation.save(run.path(FEDERATION))
    model = network(config, len(dataset.classes))
    engine = CachedEngine(model, config, run, cache_dir)
    with timed(timings, "prepare"):
        plan = engine.plan(dataset)
    recipe = fingerprint(dataset.classes, config.views, engine.extractor.cache.meta)
    with tempfile.TemporaryDirectory(prefix="lungxray-sites-") as scratch, timed(timings, "federation"):
        tables = [site_tables(plan, name, recipe, federation.site_column) for name in names]
        paths = []
        for index, table in enumerate(tables):
            paths.append(str(Path(scratch) / f"site-{index}.npz"))
            table.save(Path(paths[-1]))
        run_federation(run.path(FOLDER), config, federation, dataset.classes,
                       model.get_layer("head").get_weights(), recipe, paths)
    predictor, history, by_round = save_federated_model(run, model, engine.extractor, config, federation,
                                                        dataset.classes, provenance("federated", dataset, config))
    with timed(timings, "evaluation"):
        test_metrics, external_metrics = evaluate_run(predictor, dataset, external, run, config)
    write_records(run.path(run.REFERENCE), reference_records(predictor, [r.path for r in dataset.split("val")]))
    timings["total"] = time.perf_counter() - started
    write_json(run.path(run.TIMINGS), timings)
    result = TrainResult(run.folder, "federated", federation_summary(federation, len(names)), by_round,
                         [h["round"] for h in history["rounds"]].index(history["best_round"]), test_metrics,
                         timings, external_metrics)
    write_run_report(run, result, dataset, config)
    report = run.path(run.REPORT)
    write_text(report, report.read_text() + "\n" + "\n".join(sites_section(history, dataset.classes)) + "\n")
    return result


def site_names(dataset: Dataset, federation: Federation) -> list[str]:
    """The sites, sorted; every training film must name one, and a federation needs two."""
    column = federation.site_column
    missing = [r.path for r in dataset.records if not r.extra.get(column)]
    if missing:
        raise DataError(f"{len(missing)} film(s) name no site in the column '{column}' (the first: {missing[0]}); "
                        f"give every row of the manifest a {column}, or choose another --site-column")
    names = sorted({r.extra[column] for r in dataset.records})
    if len(names) < max(2, federation.min_sites):
        raise DataError(f"the column '{column}' names {len(names)} site(s): {names}; a federation needs at least "
                        f"{max(2, federation.min_sites)} (--min-sites)")
    return names


def check_recipe(config: Config) -> None:
    """A federation trains the head alone, on the sites' cached features."""
    if config.fine_tune_epochs or config.engine == "keras" or config.crop != "none":
        raise ConfigError("a federation trains the head on cached features: fine_tune_epochs 0, engine auto or "
                          "cached, crop none")


def site_tables(plan: TrainingPlan, name: str, recipe: str, column: str | None = None) -> SiteTables:
    """Site `name`'s share of the plan's features (the rows whose `column` names it; without a column,
    all of them): what that site computes itself."""
    train = np.array([column is None or r.extra[column] == name for r in plan.train], dtype=bool)
    val = np.array([column is None or r.extra[column] == name for r in plan.val], dtype=bool)
    return SiteTables(name, plan.classes, plan.train_table[train], np.asarray(plan.train_labels)[train],
                      plan.val_table[val][:, 0], np.asarray(plan.val_labels)[val], recipe)


def run_federation(folder: Path, config: Config, federation: Federation, classes: list[str],
                   initial: list[np.ndarray], recipe: str, tables: list[str]) -> None:
    """The ServerApp and a ClientApp per site in Flower's simulation engine (Ray), one core per client.
    What stops the server (a refused site, a round no site finished) is raised here."""
    from flwr.simulation import run_simulation

    from lungxray.federated.apps import client_app, server_app

    folder.mkdir(parents=True, exist_ok=True)
    with variables_set(ONE_THREAD_PER_SITE):
        run_simulation(server_app(folder, config, federation, classes, initial, recipe, len(tables)),
                       client_app(tables), num_supernodes=len(tables),
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"logging_level": "ERROR", "log_to_driver": False,
                                                     "_system_config": {"max_direct_call_object_size": INLINE}}})
    if not (folder / FederatedFit.FITTED).exists():
        raise DataError("the federation stopped before it finished; its log above says why")

