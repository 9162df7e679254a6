"""ASGI middleware around the app for the people who run it: a request id on every answer, API keys
on the API (`--keys`), security headers and a Content-Security-Policy the page satisfies, and the
request metrics of `/metrics`."""

from __future__ import annotations

import json
import time
import uuid

from lungxray.serve.keys import KeyStore
from lungxray.serve.metrics import Metrics

OPEN = ("/api/health", "/api/ready", "/openapi.json")  # probes and the contract need no key
# The page loads only its own script and style and shows images as data: URLs.
CSP = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")
HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
           (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-store")]


def needs_key(path: str) -> bool:
    return (path.startswith("/api/") or path == "/metrics") and path not in OPEN


class Operations:
    def __init__(self, app, metrics: Metrics, keys: KeyStore | None = None, api_docs: bool = False):
        self.app, self.metrics, self.keys, self.api_docs = app, metrics, keys, api_docs

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, request_id, path = time.perf_counter(), uuid.uuid4().hex, scope["path"]
        status = 500
        headers = [*HEADERS, (b"x-request-id", request_id.encode())]
        if not (self.api_docs and path.startswith("/docs")):  # the interactive docs load a CDN script
            headers.append((b"content-security-policy", CSP.encode()))

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        scope.setdefault("state", {})["request_id"] = request_id
        try:
            refusal = self.refusal(scope) if self.keys is not None and needs_key(path) else None
            if refusal is not None:
                await answer(send_with_headers, *refusal)
            else:
                await self.app(scope, receive, send_with_headers)
        finally:
            self.metrics.answered(path, status, time.perf_counter() - started)

    def refusal(self, scope) -> tuple[int, str, list] | None:
        """None if the request carries a valid key (its name goes in scope["state"]["key"]), or the
        answer: 401 without a known key, 403 for a revoked one."""
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = authorization.partition(" ")
        challenge = [(b"www-authenticate", b'Bearer realm="lungxray"')]
        if scheme.lower() != "bearer" or not token:
            return 401, "this server needs an API key: send 'Authorization: Bearer TOKEN'", challenge
        key = self.keys.identify(token.strip())
        if key is None:
            return 401, "unknown API key", challenge
        if key.revoked:
            return 403, f"the API key {key.name!r} was revoked on {key.revoked}", []
        scope["state"]["key"] = key.name
        return None


async def answer(send, status: int, error: str, headers: list) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
