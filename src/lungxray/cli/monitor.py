"""`lungxray monitor`: a deployment's monitoring records against the run's reference (argument
parsing only; the work is in `lungxray.monitor`)."""

from __future__ import annotations

ALARM_EXIT = 3  # a window alarmed: for cron (0: none; 2 stays the usage-error code)


def add_monitor_command(commands) -> None:
    monitor = commands.add_parser("monitor", help="drift and performance of a deployment, from its monitoring "
                                                  "records, against the run's reference (exit 3 on an alarm)")
    monitor.add_argument("records", nargs="+", help="records files (serve/dicom --records) or folders (predict --out)")
    monitor.add_argument("--model", required=True, help="the run folder the deployment's model came from")
    monitor.add_argument("--window", default="500",
                         help="a number of records (default 500), or a span of time: 30m, 6h, 1d")
    monitor.add_argument("--labels", metavar="CSV", help="radiologists' reads: label, and sha256 or sop_instance_uid")
    monitor.add_argument("--reference", action="append", metavar="RECORDS",
                         help="compare with these records (a silent trial's, recorded as the deployment records) "
                              "instead of the run's validation split; once per file or folder")
    monitor.add_argument("--out", default="monitoring", help="folder for monitoring.json and report.html")
    monitor.set_defaults(run=run_monitor)


def run_monitor(args) -> int:
    from lungxray.monitor import monitor

    result = monitor(args.records, args.model, args.window, args.labels, args.out, args.reference)
    alarmed = sum(bool(w["alarms"]) for w in result.windows)
    print(f"{len(result.windows)} windows, {alarmed} alarmed; report in {result.out}")
    return ALARM_EXIT if result.alarm else 0
