"""What an operator's Prometheus scrapes from `/metrics` (the official client, one registry per app):
requests by route and status, latency histograms, predictions by class, out-of-distribution flags,
refused uploads, the sizes of the batches predicted, images in hand, and which model answers.

Under `serve --workers N` each worker counts into files that the client's multiprocess mode sums
(PROMETHEUS_MULTIPROC_DIR, set before the workers start), so whichever worker is scraped answers for
all of them; images in hand and the model are read when scraped, from what the workers share."""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

# The routes a label may name; anything else is "other", so that a scanner probing random paths
# cannot grow the number of series without bound.
ROUTES = ("/", "/api/health", "/api/ready", "/api/model", "/api/predict", "/api/predict/batch", "/metrics",
          "/openapi.json")
REFUSED = {408: "stalled", 413: "too large", 422: "unreadable", 429: "rate limited", 503: "busy"}
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def route_of(path: str) -> str:
    if path.startswith("/static/"):
        return "/static"
    return path if path in ROUTES else "other"


class Metrics:
    def __init__(self, model_identity: dict, images_in_hand):
        self.registry = CollectorRegistry()
        self.requests = Counter("lungxray_requests", "HTTP requests answered", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("lungxray_request_seconds", "Time to answer a request", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.predictions = Counter("lungxray_predictions", "Images predicted, by the class decided "
                                   "('withheld' when the gate withholds it)", ["decision"], registry=self.registry)
        self.ood = Counter("lungxray_ood_flagged", "Images the out-of-distribution gate flagged",
                           registry=self.registry)
        self.refused = Counter("lungxray_refused_uploads", "Prediction requests refused", ["reason"],
                               registry=self.registry)
        self.batch = Histogram("lungxray_batch_images", "Images predicted in one call (dynamic batching)",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.read_when_scraped = ReadWhenScraped(model_identity, images_in_hand)
        self.registry.register(self.read_when_scraped)

    def exposition(self) -> tuple[bytes, str]:
        """The text a scrape gets, and its content type."""
        registry = self.registry
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            registry.register(self.read_when_scraped)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def answered(self, path: str, status: int, seconds: float) -> None:
        route = route_of(path)
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if route.startswith("/api/predict") and status in REFUSED:
            self.refused.labels(REFUSED[status]).inc()

    def predicted(self, decision: str, flagged: bool) -> None:
        self.predictions.labels(decision).inc()
        if flagged:
            self.ood.inc()


class ReadWhenScraped:
    """A collector of what is read at each scrape rather than counted: images in hand, and the model
    (a gauge of 1 with its identity as labels, as prometheus-client's Info shows it)."""

    def __init__(self, model_identity: dict, images_in_hand):
        self.images_in_hand = images_in_hand
        self.model = {"id": str(model_identity.get("id")), "sha256": str(model_identity.get("sha256", "")),
                      "classes": ",".join(model_identity["classes"])}

    def collect(self):
        yield GaugeMetricFamily("lungxray_images_in_hand", "Images waiting or being predicted",
                                value=self.images_in_hand())
        yield InfoMetricFamily("lungxray_model", "The model that answers", value=self.model)
