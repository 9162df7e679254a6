"""`lungxray serve` and `lungxray keys create | list | revoke`: the server's command group (argument
parsing only; the work is in `lungxray.serve`, imported when a command runs)."""

from __future__ import annotations

import sys
from pathlib import Path

from lungxray.infer.loader import RUNTIMES


def add_serve_commands(commands) -> None:
    serve = commands.add_parser("serve", help="REST API and web page for a trained model")
    serve.add_argument("--model", required=True, help="run folder, .keras file or export (.tflite, .onnx, .savedmodel)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-upload-mb", type=float, default=20.0, help="upload size limit (default: 20)")
    serve.add_argument("--refuse-ood", action="store_true",
                       help="withhold the class of images the out-of-distribution gate flags")
    serve.add_argument("--max-pending", type=int, default=64,
                       help="images waiting or running before new ones get 503 (a batch counts each) (default: 64)")
    serve.add_argument("--max-connections", type=int, default=100,
                       help="open connections in all before new ones get 503 (default: 100; shared out among "
                            "--workers)")
    serve.add_argument("--workers", type=int, default=1,
                       help="server processes on the port, each with the model loaded; --rate, --max-pending and "
                            "/metrics hold for all of them together (default 1; 2 answered 1.3-1.5x as many requests "
                            "as 1 on 2 cores)")
    serve.add_argument("--read-timeout", type=float, default=10.0,
                       help="seconds an upload may stall before it is cut off with 408 (default: 10)")
    serve.add_argument("--body-timeout", type=float, default=60.0,
                       help="seconds an upload may take in all before it is cut off with 408 (default: 60)")
    serve.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds a request's headers may take to arrive before the connection is closed "
                            "with 408 (default: 10)")
    serve.add_argument("--max-connections-per-client", type=int, default=16,
                       help="open connections one client address may hold; beyond, 503 (default: 16; per worker)")
    serve.add_argument("--max-batch", type=int, default=1,
                       help="images predicted together, from requests that arrive together (default 1: each "
                            "alone, the fastest measured on CPU; try 16-32 where a batch costs less than its images)")
    serve.add_argument("--max-wait-ms", type=float, default=2.0,
                       help="how long a batch waits for images still being decoded (default: 2)")
    serve.add_argument("--coverage", type=float, default=0.9,
                       help="coverage of the conformal set each answer carries (default: 0.9)")
    serve.add_argument("--api-docs", action="store_true",
                       help="serve the interactive API docs at /docs (they load a script from a CDN)")
    serve.add_argument("--runtime", choices=RUNTIMES, default="auto", help="as for predict (default: auto)")
    serve.add_argument("--cache", help="feature cache folder")
    serve.add_argument("--keys", help="API keys file (lungxray keys create): the API then needs 'Authorization: "
                                      "Bearer TOKEN'")
    serve.add_argument("--rate", metavar="N/s", help="requests a second each key may make (e.g. 20/s or 600/min; "
                                                     "without --keys, each client address); beyond: 429")
    serve.add_argument("--audit-log", default="-", metavar="FILE",
                       help="one JSON line per request: a file, '-' for standard output (default), or 'off'")
    serve.add_argument("--records", metavar="FILE",
                       help="append each answer's monitoring record to FILE (JSON lines; docs/monitoring.md)")
    serve.add_argument("--monitor-window", type=int, metavar="N",
                       help="every N answers, their drift and estimated accuracy against the run's reference as "
                            "gauges on /metrics (docs/monitoring.md; needs lungxray[full])")
    serve.add_argument("--insecure", action="store_true",
                       help="allow serving a non-loopback address without --keys")
    serve.add_argument("--tls-cert", help="HTTPS: the server's certificate (PEM), with --tls-key")
    serve.add_argument("--tls-key", help="HTTPS: the certificate's private key (PEM)")
    serve.add_argument("--allowed-hosts", nargs="+", metavar="HOST",
                       help="the host names the server answers to, and that a browser may post from (default: "
                            "--host and localhost; any for 0.0.0.0 or ::): other Host headers get 400")
    serve.add_argument("--forwarded-allow-ips", metavar="IPS",
                       help="the reverse proxies (comma-separated addresses, or '*') whose X-Forwarded-For names the "
                            "client (default: none; the address that connected is the client)")
    serve.set_defaults(run=run_serve)
    add_keys_command(commands)


def add_keys_command(commands) -> None:
    keys = commands.add_parser("keys", help="API keys for serve --keys")
    key_actions = keys.add_subparsers(dest="keys_command", required=True)
    for action, text in (("create", "make a key; its token is printed once"), ("revoke", "revoke a key"),
                         ("list", "the keys, created and revoked")):
        key_command = key_actions.add_parser(action, help=text)
        if action != "list":
            key_command.add_argument("name")
        key_command.add_argument("--keys", default="lungxray-keys.json",
                                 help="the keys file (default lungxray-keys.json)")
        key_command.set_defaults(run=run_keys)


def run_serve(args) -> int:
    from lungxray.serve import serve
    from lungxray.serve.operations import parse_rate

    scheme = "https" if args.tls_cert else "http"
    print(f"serving {args.model} on {scheme}://{args.host}:{args.port}/", file=sys.stderr)
    serve(args.model, args.host, args.port, cache_dir=Path(args.cache) if args.cache else None,
          runtime=args.runtime, keys=Path(args.keys) if args.keys else None, insecure=args.insecure,
          tls_cert=args.tls_cert, tls_key=args.tls_key, max_connections=args.max_connections, workers=args.workers,
          allowed_hosts=args.allowed_hosts, forwarded_allow_ips=args.forwarded_allow_ips,
          max_connections_per_client=args.max_connections_per_client, header_timeout=args.header_timeout,
          body_timeout=args.body_timeout,
          max_upload_mb=args.max_upload_mb, max_pending=args.max_pending, refuse_ood=args.refuse_ood,
          read_timeout=args.read_timeout, api_docs=args.api_docs,
          rate=parse_rate(args.rate) if args.rate else None,
          audit_log=None if args.audit_log == "off" else args.audit_log,
          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, coverage=args.coverage, records=args.records,
          monitor_window=args.monitor_window)
    return 0


def run_keys(args) -> int:
    from lungxray.serve.keys import KeyStore

    store = KeyStore(args.keys)
    if args.keys_command == "create":
        print(store.create(args.name))
        print(f"key {args.name!r} added to {args.keys}; the token above is shown only now", file=sys.stderr)
    elif args.keys_command == "revoke":
        store.revoke(args.name)
        print(f"key {args.name!r} revoked", file=sys.stderr)
    else:
        for key in store.keys.values():
            print(f"{key.name}\tcreated {key.created}\t{'revoked ' + key.revoked if key.revoked else 'active'}")
    return 0
