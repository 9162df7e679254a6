"""`lungxray dicom listen | watch | send`: the DICOM command group (argument parsing only; the work is in
`lungxray.dicom`, imported when a command runs, so that `--help` starts fast)."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from lungxray.errors import ConfigError
from lungxray.infer.loader import RUNTIMES


def add_dicom_commands(commands) -> None:
    dicom = commands.add_parser("dicom", help="work beside a PACS: a DICOM node that answers films with reports")
    actions = dicom.add_subparsers(dest="dicom_command", required=True)
    listen = actions.add_parser("listen", help="a Storage SCP: each chest film gets a Structured Report, sent to "
                                               "--send-to")
    add_node_arguments(listen)
    listen.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    listen.add_argument("--port", type=int, default=11112)
    listen.add_argument("--allow", action="append", metavar="CALLING_AET",
                        help="calling AE titles allowed to send (repeat; default: any)")
    listen.add_argument("--max-associations", type=int, default=8)
    listen.add_argument("--tls-cert", help="TLS: this node's certificate (PEM); with --tls-key, callers must use TLS")
    listen.add_argument("--tls-key", help="TLS: the certificate's private key (PEM)")
    listen.add_argument("--tls-ca", help="TLS: callers must present a certificate this CA signed (PEM)")
    listen.set_defaults(run=run_listen)
    watch = actions.add_parser("watch", help="pull mode: ask a DICOMweb archive (QIDO-RS) for new CR and DX films, "
                                             "retrieve them (WADO-RS) and report each once")
    add_node_arguments(watch)
    watch.add_argument("--qido", required=True, metavar="URL", help="the archive's DICOMweb root, e.g. "
                                                                    "http://127.0.0.1:8042/dicom-web")
    watch.add_argument("--interval", type=float, default=10.0, help="seconds between questions (default 10)")
    watch.add_argument("--since", metavar="YYYYMMDD", help="films of studies from this date on (default: the first "
                                                           "watch's day, kept in the spool)")
    watch.set_defaults(run=run_watch)
    send = actions.add_parser("send", help="a Storage SCU: send DICOM files to a node or PACS")
    send.add_argument("files", nargs="+", help="DICOM files or folders of them")
    send.add_argument("--to", required=True, metavar="AET@HOST:PORT")
    send.add_argument("--aet", default="LUNGXRAYSCU", help="the calling AE title (default LUNGXRAYSCU)")
    send.add_argument("--tls-ca", help="TLS: the CA that signed the node's certificate (PEM)")
    send.add_argument("--tls-cert", help="TLS: a certificate of this caller's, for a node that asks for one")
    send.add_argument("--tls-key", help="TLS: its private key")
    send.set_defaults(run=run_send)


def add_node_arguments(parser) -> None:
    """What `listen` and `watch` share: the model, where reports go, the spool and what a report holds."""
    parser.add_argument("--model", required=True, help="run folder or export (.tflite, .onnx, .savedmodel)")
    parser.add_argument("--send-to", required=True, metavar="AET@HOST:PORT_or_URL",
                        help="where reports go: a PACS by C-STORE, or a DICOMweb root URL (STOW-RS)")
    parser.add_argument("--aet", default="LUNGXRAY", help="this node's AE title (default LUNGXRAY)")
    parser.add_argument("--spool", default="spool", help="folder for received films and undelivered reports")
    parser.add_argument("--max-instance-mb", type=float, default=64.0, help="larger instances are refused")
    parser.add_argument("--max-spool-mb", type=float, default=2048.0,
                        help="past this, new instances are refused with a failure status")
    parser.add_argument("--send-tls-ca", help="TLS to the PACS: the CA that signed its certificate (PEM)")
    parser.add_argument("--send-tls-cert", help="TLS to the PACS: this node's certificate, for a PACS that asks for one")
    parser.add_argument("--send-tls-key", help="TLS to the PACS: its private key")
    parser.add_argument("--heatmap", action="store_true",
                        help="also send a Grad-CAM Secondary Capture per classified film (needs a run folder)")
    parser.add_argument("--not-analysed", choices=("report", "nothing"), default="report",
                        help="what a film it must not classify gets: a report saying why (default), or nothing")
    parser.add_argument("--refuse-ood", action=argparse.BooleanOptionalAction, default=True,
                        help="withhold the class (and probabilities) of films the out-of-distribution gate flags "
                             "(default: on, since no person sees the film beside the report)")
    parser.add_argument("--keep-sent-days", type=float, default=30.0,
                        help="days the spool remembers a delivered film (a film sent again within them is not "
                             "reported again; default 30)")
    parser.add_argument("--records", metavar="FILE",
                        help="append each answer's monitoring record to FILE (JSON lines; docs/monitoring.md)")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (on --host, or "
                                                           "127.0.0.1 for watch)")
    parser.add_argument("--monitor-window", type=int, metavar="N",
                        help="with --metrics-port: every N answers, their drift and estimated accuracy against the "
                             "run's reference as gauges (docs/monitoring.md; needs lungxray[full])")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto", help="as for predict (default: auto)")
    parser.add_argument("--cache", help="feature cache folder")


def make_node(args, **listening):
    """The node `args` describe; `listening`: the Storage SCP's settings (host, port, allow, tls, limits)."""
    from lungxray.dicom.node import DicomNode, Limits
    from lungxray.dicom.send import Peer
    from lungxray.dicom.tls import client_context
    from lungxray.infer.loader import load_predictor

    if args.send_to.startswith(("http://", "https://")):
        from lungxray.dicom.web import WebPeer

        send_to = WebPeer.parse(args.send_to)
    else:
        send_to = Peer.parse(args.send_to)
    if (args.send_tls_cert or args.send_tls_key) and not args.send_tls_ca:
        raise ConfigError("--send-tls-cert and --send-tls-key need --send-tls-ca (the CA that signed the PACS's "
                          "certificate)")
    send_tls = client_context(args.send_tls_ca, args.send_tls_cert, args.send_tls_key) if args.send_tls_ca else None
    predictor = load_predictor(args.model, Path(args.cache) if args.cache else None, args.runtime)
    heatmap = None
    if args.heatmap:
        if not predictor.can_explain:
            raise ConfigError("--heatmap needs the Keras model for Grad-CAM: give the run folder (not an export)")
        from lungxray.dicom.heatmap import HeatmapMaker

        heatmap = HeatmapMaker(predictor)
    if args.monitor_window and not args.metrics_port:
        raise ConfigError("--monitor-window shows its gauges on /metrics: give --metrics-port too")
    reference = None
    if args.monitor_window:
        from lungxray.monitor.records import reference_of

        reference = reference_of(args.model)
    limits = Limits(listening.pop("max_associations", 8), max_instance_mb=args.max_instance_mb,
                    max_spool_mb=args.max_spool_mb)
    return DicomNode(predictor, send_to, Path(args.spool), args.aet, limits=limits, send_tls=send_tls, heatmap=heatmap,
                     not_analysed=args.not_analysed, refuse_ood=args.refuse_ood, keep_sent_days=args.keep_sent_days,
                     records=args.records, metrics_port=args.metrics_port, monitor_window=args.monitor_window,
                     reference=reference, **listening)


def until_stopped() -> None:
    """Wait for SIGINT or SIGTERM."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


def run_listen(args) -> int:
    from lungxray.dicom.tls import server_context

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    tls = server_context(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    node = make_node(args, host=args.host, port=args.port, allow=args.allow, tls=tls,
                     max_associations=args.max_associations)
    node.start()
    print(f"listening as {args.aet} on {args.host}:{args.port}; reports to {args.send_to}", flush=True)
    until_stopped()
    node.stop()
    return 0


def run_watch(args) -> int:
    from lungxray.dicom.web import Watcher

    node = make_node(args)
    watcher = Watcher(node, args.qido, args.interval, args.since)
    node.start(listen=False)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), name="lungxray-dicom-watch", daemon=True)
    thread.start()
    print(f"watching {args.qido} every {args.interval:g} s for CR and DX films of studies since {watcher.since}; "
          f"reports to {args.send_to}", flush=True)
    until_stopped()
    stop.set()
    thread.join(timeout=60)
    node.stop()
    return 0


def run_send(args) -> int:
    from lungxray.dicom.send import Peer, dicom_files, send_files
    from lungxray.dicom.tls import client_context

    tls = client_context(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None
    results = send_files(dicom_files(args.files), Peer.parse(args.to), args.aet, tls)
    for path, outcome in results:
        print(f"{path}: {outcome}")
    return 0 if all(outcome == "sent" for _, outcome in results) else 1
