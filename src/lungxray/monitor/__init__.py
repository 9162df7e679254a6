"""Monitoring a deployed model: its records, in windows, against the run's reference (drift, the
label-free performance estimate, realised metrics with reads), as `lungxray monitor` reports them."""

from lungxray.monitor.monitoring import MonitorResult, monitor

__all__ = ["MonitorResult", "monitor"]
