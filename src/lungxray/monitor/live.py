"""Monitoring while a service runs: `serve --monitor-window N` and `dicom listen|watch
--monitor-window N` keep the last N answers' records and, each time N more have come, score them
against the run's reference (as `lungxray monitor` scores a window) in a thread of their own; the
latest window's scores are Prometheus gauges on the service's /metrics, for Grafana and
Alertmanager.

    live = LiveMonitor(read_reference("runs/mine"), window=500)
    registry.register(live)      # the gauges
    live.add(record)             # for each answer
"""

from __future__ import annotations

import logging
import threading

from prometheus_client.core import GaugeMetricFamily

from lungxray.monitor.drift import DriftScorer
from lungxray.monitor.monitoring import MIN_WINDOW
from lungxray.monitor.performance import window_summary
from lungxray.monitor.records import classes_of

log = logging.getLogger(__name__)


class LiveMonitor:
    """A Prometheus collector of the latest window's drift and estimates (`collect`)."""

    def __init__(self, reference: list[dict], window: int = 500):
        if window < MIN_WINDOW:
            raise ValueError(f"the monitoring window must hold at least {MIN_WINDOW} answers. Got {window} instead.")
        self.window, self.classes = window, classes_of(reference)
        self.scorer = DriftScorer(reference, self.classes)
        self._records: list[dict] = []
        self._lock = threading.Lock()
        self.windows, self.latest = 0, None

    def add(self, record: dict) -> None:
        """Keep an answer's record; every `window` records, score them in a thread of their own."""
        with self._lock:
            self._records.append(record)
            if len(self._records) < self.window:
                return
            full, self._records = self._records, []
        threading.Thread(target=self._score, args=(full,), name="lungxray-monitor", daemon=True).start()

    def _score(self, records: list[dict]) -> None:
        try:
            summary = window_summary(records, self.classes)
            summary["drift"] = self.scorer.score(records)
        except Exception:  # monitoring must not stop the service
            log.exception("scoring a monitoring window failed")
            return
        with self._lock:
            self.latest, self.windows = summary, self.windows + 1
        if summary["drift"]["alarm"]:
            log.warning("monitoring: the last %d answers drifted from the reference (score %.2f, threshold %.2f)",
                        len(records), summary["drift"]["combined"], summary["drift"]["threshold"])

    def collect(self):
        with self._lock:
            latest, windows = self.latest, self.windows
        yield GaugeMetricFamily("lungxray_monitor_windows", "Monitoring windows scored so far", value=windows)
        if latest is None:
            return
        drift, estimated = latest["drift"], latest["estimated"] or {}
        for name, text, value in (
                ("drift_score", "Combined drift score of the latest window", drift["combined"]),
                ("drift_threshold", "The drift score above which a window alarms", drift["threshold"]),
                ("alarm", "1 when the latest window's drift alarmed", float(drift["alarm"])),
                ("estimated_accuracy", "Label-free estimated accuracy of the latest window", estimated.get("accuracy")),
                ("ood_rate", "Share of the latest window the out-of-distribution gate flagged", latest["ood_rate"]),
                ("mean_set_size", "Mean conformal set size in the latest window", latest["mean_set_size"])):
            if value is not None:
                yield GaugeMetricFamily(f"lungxray_monitor_{name}", text, value=value)
        features = GaugeMetricFamily("lungxray_monitor_feature_score", "Standardised drift score of each feature "
                                     "in the latest window", labels=["feature", "group"])
        for name, scored in drift["features"].items():
            features.add_metric([name, scored["group"]], scored["score"])
        yield features
