"""`lungxray monitor`: a deployment's records, in windows, against the run's reference.

    result = monitor(["records.jsonl"], "runs/mine", window="500", out="monitoring/")
    result.alarm          # True when any window alarmed: the command then exits 3

Per window (a number of records, or a span of time such as "1d" or "6h"): the drift of each feature
and the combined score (`drift.DriftScorer`), the label-free estimate of accuracy and per-class
sensitivity, the rates of out-of-distribution flags, withheld classes and films not analysed, the
mean conformal set size, and with reads the realised metrics (`performance`). A window alarms
(`Alarms`) when its drift score passes the reference's own 99th percentile, when its estimated
accuracy falls more than `ACCURACY_DROP` below the reference's, or when the gate flags more of its
films than the reference's rate allows (a one-sided binomial test at `OOD_P_VALUE`). Written to OUT
as monitoring.json and report.html.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from scipy import stats

from lungxray.errors import ConfigError, DataError
from lungxray.io import atomic_path
from lungxray.monitor.drift import DriftScorer
from lungxray.monitor.performance import estimate, realised, window_summary
from lungxray.monitor.records import classes_of, probabilities, read_labels, read_reference, stream_records
from lungxray.monitor.report import write_report

ACCURACY_DROP = 0.05  # an estimated accuracy this far below the reference's alarms
# Flags this unlikely at the reference's rate alarm: 1 window in 1,000 of an unchanged deployment.
OOD_P_VALUE = 0.001
MIN_WINDOW = 30  # records: a window with fewer is not scored (its tests would say nothing)
MIN_REFERENCE = 200  # records: what a reference other than the run's must hold
SPANS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1)}
RESULT_FILE, REPORT_FILE = "monitoring.json", "report.html"


@dataclasses.dataclass
class MonitorResult:
    out: Path
    windows: list[dict]
    alarm: bool


class Alarms:
    """Why a scored window alarms, against the reference: its drift, its estimated accuracy, and the
    share of its films the gate flagged. The same rules for `lungxray monitor` and the live gauges."""

    def __init__(self, reference: list[dict], classes: list[str]):
        p = probabilities(reference, classes)
        self.expected = estimate(p[~np.isnan(p).any(axis=1)], classes)
        flags = [r["ood"] for r in reference if r.get("ood") is not None]
        # A reference the gate never flagged is taken to allow one flag in its count, so that a single
        # flagged film does not alarm.
        self.ood_rate = float(max(np.mean(flags), 1 / len(flags))) if flags else None

    def of(self, summary: dict) -> list[str]:
        estimated = summary["estimated"]
        drop = estimated is not None and estimated["accuracy"] < self.expected["accuracy"] - ACCURACY_DROP
        flagged = self.ood_rate is not None and summary["ood_judged"] > 0 and stats.binomtest(
            summary["ood_flagged"], summary["ood_judged"], self.ood_rate, alternative="greater").pvalue < OOD_P_VALUE
        return [name for name, on in (("drift", summary["drift"]["alarm"]), ("estimated accuracy", drop),
                                      ("out of distribution", flagged)) if on]


def window_of(window: str):
    """What `--window` says as a function of (the record's index, the record) -> its window's number:
    a count ("500") or a span of time ("1d", "6h", "30m") from the first record."""
    if re.fullmatch(r"\d+", window):
        size = int(window)
        if size < MIN_WINDOW:
            raise ConfigError(f"--window must hold at least {MIN_WINDOW} records. Got {window} instead.")
        return lambda index, record: index // size
    match = re.fullmatch(r"(\d+)([mhd])", window)
    if not match:
        raise ConfigError(f"--window is a number of records (500) or a span (30m, 6h, 1d). Got {window!r} instead.")
    span, first = int(match.group(1)) * SPANS[match.group(2)], []

    def which(index: int, record: dict) -> int:
        time = datetime.fromisoformat(record["time"])
        first[:] = first or [time]
        return int((time - first[0]) / span)

    return which


def windows_of(records: Iterable[dict], window: str) -> Iterator[list[dict]]:
    """`records` (oldest first) cut into windows, one at a time; a window of fewer than MIN_WINDOW
    records is left out."""
    which = window_of(window)  # a wrong --window is said before any record is read
    return (cut for cut in ([record for _, record in group] for _, group in
                            itertools.groupby(enumerate(records), key=lambda pair: which(*pair)))
            if len(cut) >= MIN_WINDOW)


def monitor(items: list[str | Path], run: str | Path, window: str = "500", labels: str | Path | None = None,
            out: str | Path = "monitoring", reference: list[str | Path] | None = None) -> MonitorResult:
    """Score the records `items` name against `run`'s reference, or against the records `reference`
    names (a silent trial's, recorded the way the deployment records); write the result to `out`."""
    baseline = list(stream_records(reference)) if reference else read_reference(run)
    if reference and len(baseline) < MIN_REFERENCE:
        raise DataError(f"the reference holds {len(baseline)} records; a reference needs {MIN_REFERENCE} or more "
                        "(a silent trial of a few days, or the run's own)")
    classes = classes_of(baseline)
    alarms, scorer = Alarms(baseline, classes), DriftScorer(baseline, classes)
    reads = read_labels(labels) if labels else None
    windows = []
    for records in windows_of(stream_records(items), window):
        summary = window_summary(records, classes)
        summary["drift"] = scorer.score(records)
        summary["realised"] = realised(records, classes, reads) if reads is not None else None
        summary["alarms"] = alarms.of(summary)
        windows.append(summary)
    if not windows:
        raise DataError(f"no window of {window} holds {MIN_WINDOW} records or more in {', '.join(map(str, items))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": str(run), "window": window, "classes": classes,
              "reference": {"records": ", ".join(map(str, reference)) if reference else "the run's validation split",
                            "n": len(baseline), "estimated": alarms.expected, "ood_rate": alarms.ood_rate},
              "accuracy_drop": ACCURACY_DROP, "ood_p_value": OOD_P_VALUE,
              "windows": windows, "alarm": any(w["alarms"] for w in windows)}
    with atomic_path(out / RESULT_FILE) as temporary:
        temporary.write_text(json.dumps(result, indent=1, default=float))
    write_report(result, out / REPORT_FILE)
    return MonitorResult(out, windows, result["alarm"])
