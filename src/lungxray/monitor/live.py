"""Monitoring while a service runs: `serve --monitor-window N` and `dicom listen|watch
--monitor-window N` keep the last N answers' records and, each time N more have come, score them
against the run's reference (as `lungxray monitor` scores a window) in a thread of their own; the
latest window's scores are Prometheus gauges on the service's /metrics, for Grafana and
Alertmanager.

    live = LiveMonitor(read_reference("runs/mine"), window=500, registry=registry)
    live.add(record)             # for each answer

Under `serve --workers N` each worker scores windows of its own answers, and the gauges are
prometheus-client's multiprocess gauges: a scrape, whichever worker takes it, shows the window that
any worker scored last and the windows of all the workers counted together.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Gauge

from lungxray.monitor.drift import DriftScorer
from lungxray.monitor.monitoring import MIN_WINDOW, Alarms
from lungxray.monitor.performance import window_summary
from lungxray.monitor.records import classes_of

log = logging.getLogger(__name__)

# The latest window's gauges: name, help, and what of a scored window it shows.
LATEST = (
    ("drift_score", "Combined drift score of the latest window", lambda s: s["drift"]["combined"]),
    ("drift_threshold", "The drift score above which a window alarms", lambda s: s["drift"]["threshold"]),
    ("alarm", "1 when the latest window alarmed (its drift, estimated accuracy or out-of-distribution rate)",
     lambda s: float(bool(s["alarms"]))),
    ("estimated_accuracy", "Label-free estimated accuracy of the latest window",
     lambda s: (s["estimated"] or {}).get("accuracy")),
    ("ood_rate", "Share of the latest window the out-of-distribution gate flagged", lambda s: s["ood_rate"]),
    ("mean_set_size", "Mean conformal set size in the latest window", lambda s: s["mean_set_size"]))


class LiveMonitor:
    """Scores every `window` answers against the reference and sets its gauges on `registry`."""

    def __init__(self, reference: list[dict], window: int = 500, registry: CollectorRegistry | None = None):
        if window < MIN_WINDOW:
            raise ValueError(f"the monitoring window must hold at least {MIN_WINDOW} answers. Got {window} instead.")
        self.window, self.classes, self.registry = window, classes_of(reference), registry
        self.scorer, self.alarms = DriftScorer(reference, self.classes), Alarms(reference, self.classes)
        self._records: list[dict] = []
        self._lock = threading.Lock()
        self._gauges: dict[str, Gauge] | None = None
        self.windows = 0

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
            summary["alarms"] = self.alarms.of(summary)
        except Exception:  # monitoring must not stop the service
            log.exception("scoring a monitoring window failed")
            return
        with self._lock:
            self.windows += 1
            self._show(summary)
        if summary["alarms"]:
            log.warning("monitoring: the last %d answers alarmed (%s; drift score %.2f, threshold %.2f)", len(records),
                        ", ".join(summary["alarms"]), summary["drift"]["combined"], summary["drift"]["threshold"])

    def _show(self, summary: dict) -> None:
        """Set the gauges to a scored window. They are made at the first: in multiprocess mode a gauge
        shows 0 from the moment it is made, and a worker that has scored nothing has nothing to show."""
        if self._gauges is None:
            # "mostrecent": of the workers' values, the one set last; "sum": every worker's windows.
            self._gauges = {name: Gauge(f"lungxray_monitor_{name}", text, registry=self.registry,
                                        multiprocess_mode="mostrecent") for name, text, _ in LATEST}
            self._gauges["windows"] = Gauge("lungxray_monitor_windows", "Monitoring windows scored so far",
                                            registry=self.registry, multiprocess_mode="sum")
            self._gauges["feature_score"] = Gauge(
                "lungxray_monitor_feature_score", "Standardised drift score of each feature in the latest window",
                ["feature", "group"], registry=self.registry, multiprocess_mode="mostrecent")
        for name, _, value_of in LATEST:
            if (value := value_of(summary)) is not None:
                self._gauges[name].set(value)
        self._gauges["windows"].set(self.windows)
        for name, scored in summary["drift"]["features"].items():
            self._gauges["feature_score"].labels(name, scored["group"]).set(scored["score"])
