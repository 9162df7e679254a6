"""ASGI middleware around the app for the people who run it: a request id on every answer, API keys
on the API (`--keys`), a rate limit per key (`--rate`), security headers and a Content-Security-Policy
the page satisfies, the request metrics of `/metrics`, and one JSON line per request in the audit log."""

from __future__ import annotations

import collections
import datetime
import json
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
from pathlib import Path

from lungxray.errors import ConfigError
from lungxray.serve.guards import send_error
from lungxray.serve.keys import KeyStore
from lungxray.serve.metrics import Metrics

OPEN = ("/api/health", "/api/ready", "/openapi.json")  # probes and the contract need no key
# The page loads only its own script and style and shows images as data: URLs.
CSP = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")
HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
           (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-store")]
HSTS = (b"strict-transport-security", b"max-age=31536000")  # with TLS: browsers use HTTPS only, for a year
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
FAILED_AUTHENTICATIONS = 5.0  # a second from one address, in bursts of 5; beyond, 429 without a look at the token
EXPLAIN_COST = 20  # tokens of --rate an explanation costs: Grad-CAM took 0.6-0.76 s of CPU, a prediction ~0.03 s
RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute)\s*$")


def needs_key(path: str) -> bool:
    return (path.startswith("/api/") or path == "/metrics") and path not in OPEN


def parse_rate(text: str) -> float:
    """'10/s' or '600/min' → requests per second."""
    match = RATE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--rate must look like '10/s' or '600/min'. Got {text!r} instead.")
    return float(match.group(1)) / (1 if match.group(2).startswith("s") else 60)


class RateLimit:
    """A token bucket per caller (its key's name, or its address on a server without keys): on
    average `per_second` tokens a second, in bursts of up to one second's worth. A request costs
    what it asks of the server (`cost`: an image 1, a batch its images, an explanation EXPLAIN_COST);
    one costlier than a burst goes when the bucket is full and leaves it in debt.

    Callers are kept in the order they were last seen; beyond MAX_CALLERS, the longest unseen whose
    buckets are full again (so nothing is lost by forgetting them) are dropped, a few at a time, so
    that no request pays for a rebuild of the table."""

    MAX_CALLERS = 10_000  # without keys callers are addresses

    def __init__(self, per_second: float):
        self.per_second, self.burst = per_second, max(1.0, per_second)
        self.buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self.lock = threading.Lock()  # shared by `serve --workers N`, it is called from several threads

    def retry_after(self, caller: str, cost: float = 1.0, paid: float = 0.0) -> float:
        """0 when the request may go now (and takes its `cost` in tokens), else the seconds until it
        may. `paid`: what the same request already took (its first token, before its cost was known)."""
        with self.lock:
            now = time.monotonic()
            tokens, needed = self._tokens(caller, now), min(cost + paid, self.burst) - paid
            if tokens >= needed:
                self._keep(caller, tokens - cost, now)
                return 0.0
            self._keep(caller, tokens, now)
            return (needed - tokens) / self.per_second

    def waiting(self, caller: str) -> float:
        """Seconds until `caller` has a token, taking none."""
        with self.lock:
            return max(0.0, (1 - self._tokens(caller, time.monotonic())) / self.per_second)

    def _tokens(self, caller: str, now: float) -> float:
        tokens, then = self.buckets.get(caller, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.per_second)

    def _keep(self, caller: str, tokens: float, now: float) -> None:
        self.buckets[caller] = (tokens, now)
        self.buckets.move_to_end(caller)
        for _ in range(2):  # forget at most two a request: the table shrinks faster than it can grow
            if len(self.buckets) <= self.MAX_CALLERS:
                break
            oldest, (held, seen) = next(iter(self.buckets.items()))
            if held + (now - seen) * self.per_second < self.burst:
                break  # the longest unseen caller still owes: every caller is recent, keep them all
            del self.buckets[oldest]

    def limit(self) -> float:
        """Requests a second (a method, so that a manager's proxy tells it too)."""
        return self.per_second


def audit_logger(target: str | Path | None) -> logging.Logger | None:
    """The audit log: standard output for '-', a file (appended to, reopened when logrotate moves
    it), or none."""
    if target is None:
        return None
    logger = logging.getLogger(f"lungxray.audit.{target}")
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the lines go to the audit log only, not to the root logger's handlers
    if not logger.handlers:
        if str(target) == "-":
            handler: logging.Handler = logging.StreamHandler(sys.stdout)
        else:
            from logging.handlers import WatchedFileHandler

            try:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))  # created private
                handler = WatchedFileHandler(target, encoding="utf-8")
            except OSError as error:
                raise ConfigError(f"cannot open the audit log {target}: {error.strerror}") from None
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return logger


def host_of(value: str) -> str:
    """The host of a Host header or an origin's authority, without its port: "[::1]:8000" → "::1"."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Operations:
    def __init__(self, app, metrics: Metrics, keys: KeyStore | None = None, api_docs: bool = False,
                 rate: RateLimit | None = None, audit: logging.Logger | None = None, worker: int | None = None,
                 allowed_hosts: list[str] | None = None, hsts: bool = False):
        """`rate`: a RateLimit, or its proxy when workers share one; `worker`: this process's id in
        the audit lines when there are several; `allowed_hosts`: the names the server answers to
        (the Host header; None or "*": any), which a browser's state-changing request must also come
        from (its Origin), against DNS rebinding and cross-site forms; `hsts`: served over TLS."""
        self.app, self.metrics, self.keys, self.api_docs = app, metrics, keys, api_docs
        self.rate, self.audit, self.worker = rate, audit, worker
        self.allowed_hosts = None if allowed_hosts is None or "*" in allowed_hosts else {
            host_of(h) for h in allowed_hosts}
        self.hsts = hsts
        self.per_second = rate.limit() if rate is not None else None
        self.failures = RateLimit(FAILED_AUTHENTICATIONS)  # per address, in this process

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, request_id, path = time.perf_counter(), uuid.uuid4().hex, scope["path"]
        status = 500
        headers = [*HEADERS, *([HSTS] if self.hsts else []), (b"x-request-id", request_id.encode())]
        if not (self.api_docs and path.startswith("/docs")):  # the interactive docs load a CDN script
            headers.append((b"content-security-policy", CSP.encode()))

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        try:
            refusal = self.foreign(scope) or (self.refusal(scope) if needs_key(path) else None)
            if refusal is not None:
                await send_error(send_with_headers, *refusal)
            else:
                await self.app(scope, receive, send_with_headers)
        finally:
            seconds = time.perf_counter() - started
            self.metrics.answered(path, status, seconds)
            if self.audit is not None:
                line = audit_line(scope, request_id, status, seconds)
                if self.worker is not None:
                    line["worker"] = self.worker
                self.audit.info(json.dumps(line))

    def foreign(self, scope) -> tuple[int, str, list] | None:
        """400 for a Host header the server does not answer to; 403 for a browser's state-changing
        request from a page of another origin (its Origin, or Sec-Fetch-Site: cross-site)."""
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = host_of(headers.get(b"host", ""))
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return 400, f"this server does not answer to the host {host!r} (--allowed-hosts)", []
        if scope["method"] not in STATE_CHANGING:
            return None
        origin = headers.get(b"origin")
        if headers.get(b"sec-fetch-site") == "cross-site" or (
                origin is not None and host_of(origin.partition("://")[2]) != host):
            return 403, "a request from a page of another origin is refused", []
        return None

    def refusal(self, scope) -> tuple[int, str, list] | None:
        """None if the request may go on (its key's name in scope["state"]["key"], who pays for it
        in scope["state"]["caller"]), or the answer: 401 without a known key, 403 for a revoked one,
        429 beyond the rate limit, or for an address that failed to authenticate too often."""
        address = (scope.get("client") or ("unknown",))[0]
        if self.keys is not None:
            wait = self.failures.waiting(address)
            if wait > 0:  # key guessing: checking another token would tell the guesser something
                return too_many(wait, f"more than {FAILED_AUTHENTICATIONS:g} failed authentications a second from "
                                      "this address")
            refused = self.authenticate(scope)
            if refused is not None:
                if refused[0] == 401:
                    self.failures.retry_after(address)
                return refused
        scope["state"]["caller"] = scope["state"].get("key") or address
        if self.rate is not None:
            wait = self.rate.retry_after(scope["state"]["caller"])
            if wait > 0:
                return too_many(wait, f"more than {self.per_second:g} requests a second")
        return None

    def authenticate(self, scope) -> tuple[int, str, list] | None:
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = authorization.partition(" ")
        challenge = [(b"www-authenticate", b'Bearer realm="lungxray"')]
        if scheme.lower() != "bearer" or not token:
            return 401, "this server needs an API key: send 'Authorization: Bearer TOKEN'", challenge
        key = self.keys.identify(token.strip())
        if key is None:
            return 401, "unknown API key", challenge
        scope["state"]["key"] = key.name  # the audit line names a revoked key too
        if key.revoked:
            return 403, f"the API key {key.name!r} was revoked on {key.revoked}", []
        return None


def too_many(wait: float, why: str) -> tuple[int, str, list]:
    return 429, f"{why}; retry in {wait:.1f} s", [(b"retry-after", str(math.ceil(wait)).encode())]


def audit_line(scope, request_id: str, status: int, seconds: float) -> dict:
    """What the audit log keeps of a request: who, what, the answer, how long; of an image only its
    SHA-256 and decision (never its pixels, its file name or any DICOM field), and the identity of
    the model that answered."""
    state = scope["state"]
    line = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": request_id, "key": state.get("key"), "client": (scope.get("client") or (None,))[0],
            "method": scope["method"], "path": scope["path"], "status": status, "ms": round(1000 * seconds, 2)}
    if "images" in state:
        line.update(model=state.get("model"), images=state["images"])
    return line
