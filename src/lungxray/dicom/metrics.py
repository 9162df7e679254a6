"""The node's /metrics (`dicom listen|watch --metrics-port`), on prometheus-client's own HTTP server:
the audit log's events counted (received, reported, delivered, refused by the PACS ...), the bytes
waiting in the spool, and with `--monitor-window` the latest window's drift and estimates
(`lungxray.monitor.live`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily


class NodeMetrics:
    def __init__(self, spool_bytes):
        self.registry = CollectorRegistry()
        self.events = Counter("lungxray_dicom_events", "Events of the node, as its audit log names them",
                              ["event"], registry=self.registry)
        self.registry.register(SpoolSize(spool_bytes))
        self._server = None

    def serve(self, host: str, port: int) -> None:
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class SpoolSize:
    """Read at each scrape: the bytes of films and reports waiting in the spool."""

    def __init__(self, spool_bytes):
        self.spool_bytes = spool_bytes

    def collect(self):
        yield GaugeMetricFamily("lungxray_dicom_spool_bytes", "Bytes of films and reports waiting in the spool",
                                value=self.spool_bytes())
