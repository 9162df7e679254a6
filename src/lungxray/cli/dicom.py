"""`lungxray dicom listen | send`: the DICOM command group (argument parsing only; the work is in
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
    listen = actions.add_parser("listen", help="a Storage SCP: each chest film gets a Structured Report, C-STOREd to "
                                               "--send-to")
    listen.add_argument("--model", required=True, help="run folder or export (.tflite, .onnx, .savedmodel)")
    listen.add_argument("--aet", default="LUNGXRAY", help="this node's AE title (default LUNGXRAY)")
    listen.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    listen.add_argument("--port", type=int, default=11112)
    listen.add_argument("--send-to", required=True, metavar="AET@HOST:PORT", help="where reports go (the PACS)")
    listen.add_argument("--allow", action="append", metavar="CALLING_AET",
                        help="calling AE titles allowed to send (repeat; default: any)")
    listen.add_argument("--spool", default="spool", help="folder for received films and undelivered reports")
    listen.add_argument("--max-associations", type=int, default=8)
    listen.add_argument("--max-instance-mb", type=float, default=64.0, help="larger instances are refused")
    listen.add_argument("--max-spool-mb", type=float, default=2048.0,
                        help="past this, new instances are refused with a failure status")
    listen.add_argument("--tls-cert", help="TLS: this node's certificate (PEM); with --tls-key, callers must use TLS")
    listen.add_argument("--tls-key", help="TLS: the certificate's private key (PEM)")
    listen.add_argument("--tls-ca", help="TLS: callers must present a certificate this CA signed (PEM)")
    listen.add_argument("--send-tls-ca", help="TLS to the PACS: the CA that signed its certificate (PEM)")
    listen.add_argument("--send-tls-cert", help="TLS to the PACS: this node's certificate, for a PACS that asks for one")
    listen.add_argument("--send-tls-key", help="TLS to the PACS: its private key")
    listen.add_argument("--heatmap", action="store_true",
                        help="also send a Grad-CAM Secondary Capture per classified film (needs a run folder)")
    listen.add_argument("--not-analysed", choices=("report", "nothing"), default="report",
                        help="what a film it must not classify gets: a report saying why (default), or nothing")
    listen.add_argument("--refuse-ood", action=argparse.BooleanOptionalAction, default=True,
                        help="withhold the class (and probabilities) of films the out-of-distribution gate flags "
                             "(default: on, since no person sees the film beside the report)")
    listen.add_argument("--keep-sent-days", type=float, default=30.0,
                        help="days the spool remembers a delivered film (a film sent again within them is not "
                             "reported again; default 30)")
    listen.add_argument("--runtime", choices=RUNTIMES, default="auto", help="as for predict (default: auto)")
    listen.add_argument("--cache", help="feature cache folder")
    listen.set_defaults(run=run_listen)
    send = actions.add_parser("send", help="a Storage SCU: send DICOM files to a node or PACS")
    send.add_argument("files", nargs="+", help="DICOM files or folders of them")
    send.add_argument("--to", required=True, metavar="AET@HOST:PORT")
    send.add_argument("--aet", default="LUNGXRAYSCU", help="the calling AE title (default LUNGXRAYSCU)")
    send.add_argument("--tls-ca", help="TLS: the CA that signed the node's certificate (PEM)")
    send.add_argument("--tls-cert", help="TLS: a certificate of this caller's, for a node that asks for one")
    send.add_argument("--tls-key", help="TLS: its private key")
    send.set_defaults(run=run_send)


def run_listen(args) -> int:
    from lungxray.dicom.node import DicomNode, Limits
    from lungxray.dicom.send import Peer
    from lungxray.dicom.tls import client_context, server_context
    from lungxray.infer.loader import load_predictor

    send_to = Peer.parse(args.send_to)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    tls = server_context(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
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
    node = DicomNode(predictor, send_to, Path(args.spool), args.aet,
                     args.host, args.port, args.allow,
                     Limits(args.max_associations, max_instance_mb=args.max_instance_mb, max_spool_mb=args.max_spool_mb),
                     tls=tls, send_tls=send_tls, heatmap=heatmap, not_analysed=args.not_analysed,
                     refuse_ood=args.refuse_ood, keep_sent_days=args.keep_sent_days)
    node.start()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"listening as {args.aet} on {args.host}:{args.port}; reports to {args.send_to}", flush=True)
    stop.wait()
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
