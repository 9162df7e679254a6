"""`lungxray serve`: the app (`app.create_app`) under uvicorn, in one process or several (`workers`)."""

from __future__ import annotations

from pathlib import Path

from lungxray.errors import ConfigError
from lungxray.infer.lite_predictor import is_export
from lungxray.infer.loader import load_predictor
from lungxray.rundir import RunDir
from lungxray.serve.app import create_app
from lungxray.serve.connections import DEFAULT_HEADER_TIMEOUT, DEFAULT_PER_CLIENT, GuardedProtocol
from lungxray.serve.keys import KeyStore

DEFAULT_MAX_CONNECTIONS = 100
# TLS 1.2's suites with forward secrecy and authenticated encryption only (no CBC); TLS 1.3 is unaffected.
TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
WILDCARDS = ("0.0.0.0", "::")  # a server bound to every address answers to whatever name reaches it


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, *, cache_dir: Path | None = None,
          runtime: str = "auto", keys: Path | None = None, insecure: bool = False, tls_cert: str | None = None,
          tls_key: str | None = None, max_connections: int = DEFAULT_MAX_CONNECTIONS, workers: int = 1,
          allowed_hosts: list[str] | None = None, forwarded_allow_ips: str | None = None,
          max_connections_per_client: int = DEFAULT_PER_CLIENT, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
          **app_options) -> None:
    """Serve until stopped; `app_options` go to `create_app`. Beyond `max_connections` open
    connections, or `max_connections_per_client` from one address, a new one gets 503 and is closed;
    a request's headers must arrive within `header_timeout` seconds (`connections.py`); idle
    keep-alive connections close after 5 s. Without
    `keys`, only a loopback address is served unless `insecure`; SIGTERM lets the requests in flight
    finish (30 s at most) before exit. `workers` > 1: that many processes on the port, sharing the
    limits (`workers.py`). `allowed_hosts`: the Host names answered (default: `host` and localhost;
    any, for a wildcard address); `forwarded_allow_ips`: the proxies whose X-Forwarded-For is
    believed (default: none, so that no client can claim another's address)."""
    import uvicorn

    if keys is None and not insecure and not is_loopback(host):
        raise ConfigError(f"serving on {host} without --keys lets anyone who reaches the port use the model: "
                          "make a key with `lungxray keys create NAME --keys FILE` and pass --keys FILE "
                          "(or pass --insecure on a network you trust)")
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1. Got {workers} instead.")
    key_store = KeyStore(keys) if keys is not None else None
    if key_store is not None and not key_store.keys:
        raise ConfigError(f"{keys} holds no keys: make one with `lungxray keys create NAME --keys {keys}`")
    if min(max_connections, max_connections_per_client) < 1 or header_timeout <= 0:
        raise ConfigError("--max-connections and --max-connections-per-client must be at least 1 and "
                          "--header-timeout above 0")
    app_options.update(allowed_hosts=allowed_hosts or default_hosts(host), hsts=bool(tls_cert))
    if app_options.get("monitor_window"):
        from lungxray.monitor.records import reference_of

        app_options["reference"] = str(reference_of(model))
    limits = dict(total=max_connections, per_client=max_connections_per_client, header_timeout=header_timeout)
    server_options = uvicorn_options(tls_cert, tls_key, forwarded_allow_ips)
    if workers > 1:  # each worker loads the model itself
        from lungxray.serve.workers import serve_workers

        if not is_export(model):
            RunDir.open(model)  # a wrong folder is said here, once, not by every worker
        return serve_workers(str(model), host, port, workers, cache_dir=cache_dir, runtime=runtime, keys=keys,
                             connection_limits=limits, app_options=app_options, server_options=server_options)
    run = None if is_export(model) else RunDir.open(model)  # an export: no TensorFlow, no Grad-CAM
    predictor = load_predictor(model, cache_dir, runtime)
    app = create_app(predictor, run, keys=key_store, **app_options)
    GuardedProtocol.configure(**limits)
    uvicorn.run(app, host=host, port=port, **server_options)


def uvicorn_options(tls_cert: str | None, tls_key: str | None, forwarded_allow_ips: str | None) -> dict:
    """What uvicorn is told, one process or several: the guarded protocol, quiet, no `server` header,
    keep-alive 5 s, 30 s to drain on SIGTERM, TLS without CBC suites, X-Forwarded-For only from the
    named proxies."""
    return dict(http=GuardedProtocol, log_level="warning", server_header=False, timeout_keep_alive=5, timeout_graceful_shutdown=30,
                ssl_certfile=tls_cert, ssl_keyfile=tls_key, ssl_ciphers=TLS_CIPHERS,
                proxy_headers=forwarded_allow_ips is not None, forwarded_allow_ips=forwarded_allow_ips)


def default_hosts(host: str) -> list[str]:
    return ["*"] if host in WILDCARDS else [host, "localhost"]


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
