"""Compare models evaluated on the same images: headline metrics with intervals, and a paired
bootstrap of each difference against the first run."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from lungxray.errors import DataError
from lungxray.evaluate.evaluation import PREDICTIONS
from lungxray.evaluate.metrics import bootstrap_draws, headline, interval
from lungxray.rundir import RunDir

METRICS = ("accuracy", "macro_f1", "macro_auroc")


def read_predictions(path: Path) -> tuple[list[str], dict[str, tuple[str, np.ndarray]]]:
    """(classes, {file: (label, probabilities)}) from an evaluation's predictions.csv."""
    folder = RunDir(path).evaluation() if (RunDir(path).evaluation() / PREDICTIONS).is_file() else path
    csv_path = folder / PREDICTIONS
    if not csv_path.is_file():
        raise DataError(f"{path} has no {PREDICTIONS}; give a run folder or an evaluation folder")
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        classes = [c[2:] for c in reader.fieldnames if c.startswith("p_")]
        rows = {r["file"]: (r["label"], np.array([float(r[f"p_{c}"]) for c in classes]))
                for r in reader if r["predicted"]}
    return classes, rows


def compare_runs(runs: list[Path], resamples: int = 1000, seed: int = 0) -> dict:
    if len(runs) < 2:
        raise DataError("compare needs at least two runs")
    loaded = [read_predictions(run) for run in runs]
    classes = loaded[0][0]
    if any(c != classes for c, _ in loaded):
        raise DataError("the runs predict different classes; they cannot be compared")
    files = sorted(set.intersection(*(set(rows) for _, rows in loaded)))
    if not files:
        raise DataError("the runs share no evaluated images; evaluate them on the same data first")
    labels = np.array([classes.index(loaded[0][1][f][0]) for f in files])
    probabilities = [np.stack([rows[f][1] for f in files]) for _, rows in loaded]
    # The same seed gives every run the same resampled images: the bootstrap is paired.
    points = [headline(labels, p, classes) for p in probabilities]
    draws = [bootstrap_draws(labels, p, classes, resamples, seed) for p in probabilities]
    result = {"images": len(files), "resamples": resamples, "runs": []}
    for i, run in enumerate(runs):
        entry = {"run": str(run), **{m: interval(points[i][m], draws[i][m]) for m in METRICS}}
        for m in METRICS if i else ():
            difference = interval(points[i][m] - points[0][m], draws[i][m] - draws[0][m])  # NaN where either is undefined
            low, high = difference["ci95"]
            entry[f"{m}_difference"] = {**difference, "significant": bool(low > 0 or high < 0)}
        result["runs"].append(entry)
    return result


def format_comparison(result: dict) -> str:
    lines = [f"{result['images']} shared images; paired stratified bootstrap, {result['resamples']} resamples; "
             "differences are against the first run", "",
             "| run | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for entry in result["runs"]:
        cells = []
        for m in METRICS:
            value = entry[m]
            cell = f"{value['value']:.4f} ({value['ci95'][0]:.4f}–{value['ci95'][1]:.4f})"
            if f"{m}_difference" in entry:
                d = entry[f"{m}_difference"]
                cell += f"; Δ {d['value']:+.4f} ({d['ci95'][0]:+.4f}–{d['ci95'][1]:+.4f}){' *' if d['significant'] else ''}"
            cells.append(cell)
        lines.append(f"| {entry['run']} | " + " | ".join(cells) + " |")
    lines += ["", "* : the 95% interval of the difference excludes 0"]
    return "\n".join(lines)
