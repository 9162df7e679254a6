"""Federated against centralised against each site alone, on ../shared/cxr with `source` as the site.

    python benchmarks/federated.py [--data ../shared/cxr/manifest.csv] [--rounds 30] [--local-steps 20]
                                   [--aggregations fedavg,fedprox,fedadam,scaffold] [--holdout SOURCE] [--out FOLDER]
                                   [--dp-noise-multipliers 1,4 [--dp-clipping-norm 2]] [--secure-aggregation]

Every model starts from the same recipe (the reference preset, seed 21) and the same feature cache.
Printed: one row per model with its macro AUROC (95% interval) on the internal test split and, when
`--holdout` names a source, on that source, never seen in training; its wall time; and, for the
federations, the seconds per round, the bytes each site sends per round against the head's size, and
its time against the centralised run's (the federation, from the sites' tables to the fitted statistics;
and the whole run, from the manifest to the evaluated run folder, as the centralised run is timed).
`--dp-noise-multipliers` adds a FedAvg row for each noise multiplier under differential privacy, with
the epsilon it gave at delta 1e-5. `--secure-aggregation` adds FedAvg with Flower's SecAgg+, and how far
its first round's head is from plain FedAvg's (with fedavg among the aggregations) against the bound
`quantisation_bound` documents.
A site holding one class cannot train a three-class model alone: its row says so.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lungxray.config import Config, Federation  # noqa: E402
from lungxray.errors import DataError  # noqa: E402
from lungxray.evaluate.evaluation import evaluate  # noqa: E402
from lungxray.federated import simulate  # noqa: E402
from lungxray.federated.result import FederatedFit, load_weights  # noqa: E402
from lungxray.federated.secure_aggregation import quantisation_bound  # noqa: E402
from lungxray.infer.loader import load_predictor  # noqa: E402
from lungxray.model.network import build_head  # noqa: E402
from lungxray.training.recipe import train, training_data  # noqa: E402


def auroc(metrics) -> str:
    if not metrics or metrics.get("macro_auroc") is None:
        return "-"
    interval = (metrics.get("intervals", {}).get("macro_auroc") or {}).get("ci95")
    return f"{metrics['macro_auroc']:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def site_manifest(data: Path, source: str, folder: Path) -> Path:
    """The rows of one source, with absolute paths."""
    rows = [r for r in csv.DictReader(open(data)) if r["source"] == source]
    path = folder / f"{source}.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label", "split", "source"])
        writer.writeheader()
        writer.writerows({"file": str(data.resolve().parent / r["file"]), "label": r["label"], "split": r["split"],
                          "source": r["source"]} for r in rows)
    return path


def head_bytes(run: Path) -> int:
    return sum(w.nbytes for w in load_weights(run / "federation" / FederatedFit.HEAD))


def sent_per_round(run: Path, aggregation: str) -> int:
    """What one site sends in a round: its trained head (an ArrayRecord) and its two MetricRecords
    (training and validation report), as Flower counts them; with SCAFFOLD, its gradient too (an
    ArrayRecord of the trainable weights' size, in its validation report's message)."""
    from flwr.app import ArrayRecord, MetricRecord

    head = load_weights(run / "federation" / FederatedFit.HEAD)
    weights = ArrayRecord(head)
    train = MetricRecord({"num-examples": 1, "site-weight": 1, "loss": 0.0, "accuracy": 0.0})
    report = MetricRecord({"num-examples": 1, "loss-sum": 0.0, **{f"{k}-{i}": 0.0 for k in ("films", "right")
                                                                   for i in range(3)}})
    sent = weights.count_bytes() + train.count_bytes() + report.count_bytes()
    if aggregation == "scaffold":
        model = build_head(head[0].shape[0], head[-1].shape[0], head[0].shape[1])
        trainable = [np.zeros(w.shape, np.float32) for w in model.trainable_weights]
        sent += ArrayRecord(trainable).count_bytes()
    return sent


def sites_alone(args, config: Config) -> list[tuple]:
    """Each site's own model, measured on the same internal test split and held-out source as the
    others; a site that cannot train one (a class it has no films of) says why."""
    dataset, external = training_data(args.data, config)
    manifest = list(csv.DictReader(open(args.data)))
    rows = []
    for source in sorted({r["source"] for r in manifest} - {args.holdout}):
        held = sorted({r["label"] for r in manifest if r["source"] == source})
        if held != dataset.classes:
            rows.append((f"{source} alone", None, None, 0.0, f"cannot train a {len(dataset.classes)}-class model: "
                                                              f"holds {', '.join(held)} only"))
            continue
        started = time.perf_counter()
        try:
            alone = train(site_manifest(args.data, source, args.out), args.out / f"alone-{source}",
                          dataclasses.replace(config, holdout_source=None))
        except DataError as error:
            rows.append((f"{source} alone", None, None, time.perf_counter() - started, f"cannot train: {error}"))
            continue
        predictor = load_predictor(alone.run_dir)
        internal = evaluate(predictor, dataset, alone.run_dir / "federated-test", split="test")
        held_out = evaluate(predictor, external, alone.run_dir / "federated-external") if external else None
        rows.append((f"{source} alone", internal, held_out, time.perf_counter() - started, ""))
    return rows


def secure_row(args, config: Config) -> tuple:
    """FedAvg with SecAgg+: its figures, its seconds per round, and its first round's distance from
    plain FedAvg's."""
    federation = Federation(aggregation="fedavg", rounds=args.rounds, local_steps=args.local_steps,
                            secure_aggregation=True)
    started = time.perf_counter()
    result = simulate(args.data, args.out / "secagg", config, federation)
    seconds = time.perf_counter() - started
    timings = json.loads((result.run_dir / "timings.json").read_text())
    notes = f"{timings['federation'] / args.rounds:.2f} s/round"
    plain = args.out / "fedavg" / "federation" / "rounds" / "round-0001.npz"
    if plain.exists():
        first = load_weights(result.run_dir / "federation" / "rounds" / "round-0001.npz")
        distance = max(float(np.abs(a - b).max()) for a, b in zip(first, load_weights(plain)))
        counts = [s["train"] for s in json.loads((result.run_dir / "federation" / "history.json").read_text())["sites"]]
        notes += f"; round 1 within {distance:.2g} of FedAvg's (bound {quantisation_bound(counts):.2g})"
    return "fedavg, SecAgg+", result.test_metrics, result.external_metrics, seconds, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/cxr/manifest.csv"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--aggregations", default="fedavg,fedprox,fedadam,scaffold")
    parser.add_argument("--holdout", help="a source left out of training and tested on")
    parser.add_argument("--alone", action="store_true", help="also train each site alone")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="federated-bench-")))
    parser.add_argument("--dp-noise-multipliers", default="", help="FedAvg under differential privacy, e.g. 1,4")
    parser.add_argument("--dp-clipping-norm", type=float, default=1.0)
    parser.add_argument("--secure-aggregation", action="store_true", help="also FedAvg with SecAgg+")
    args = parser.parse_args()
    config = Config(holdout_source=args.holdout)
    rows = []

    started = time.perf_counter()
    central = train(args.data, args.out / "centralised", config)
    central_seconds = time.perf_counter() - started
    rows.append(("centralised", central.test_metrics, central.external_metrics, central_seconds, ""))
    for aggregation in filter(None, args.aggregations.split(",")):
        federation = Federation(aggregation=aggregation, rounds=args.rounds, local_steps=args.local_steps)
        started = time.perf_counter()
        result = simulate(args.data, args.out / aggregation, config, federation)
        seconds = time.perf_counter() - started
        timings = json.loads((result.run_dir / "timings.json").read_text())
        detail = (f"{timings['federation'] / args.rounds:.2f} s/round; a site sends {sent_per_round(result.run_dir, aggregation):,} "
                  f"bytes/round (head {head_bytes(result.run_dir):,}); against the centralised run: the federation "
                  f"{timings['federation'] / central_seconds:.2f}x, the whole run {seconds / central_seconds:.2f}x")
        rows.append((f"{aggregation} ({args.rounds} x {args.local_steps})", result.test_metrics,
                     result.external_metrics, seconds, detail))
    for noise in filter(None, args.dp_noise_multipliers.split(",")):
        federation = Federation(aggregation="fedavg", rounds=args.rounds, local_steps=args.local_steps,
                                dp_noise_multiplier=float(noise), dp_clipping_norm=args.dp_clipping_norm)
        started = time.perf_counter()
        result = simulate(args.data, args.out / f"dp-{noise}", config, federation)
        privacy = json.loads((result.run_dir / "federation" / "history.json").read_text())["privacy"]
        rows.append((f"fedavg, DP noise {noise} x clipping {args.dp_clipping_norm:g}", result.test_metrics,
                     result.external_metrics, time.perf_counter() - started,
                     f"epsilon {privacy['epsilon']:.1f} at delta {privacy['delta']:g}"))
    if args.secure_aggregation:
        rows.append(secure_row(args, config))
    if args.alone:
        rows += sites_alone(args, config)

    print(f"| model | internal test macro AUROC | held-out {args.holdout or '-'} | wall s | notes |")
    print("|---|---|---|---|---|")
    for name, internal, external, seconds, notes in rows:
        print(f"| {name} | {auroc(internal)} | {auroc(external)} | {seconds:.0f} | {notes[:240]} |")


if __name__ == "__main__":
    main()
