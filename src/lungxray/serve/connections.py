"""Connection limits uvicorn does not have, as its own HTTP/1.1 protocol (h11) with guards added.

uvicorn counts idle connections against `limit_concurrency` and sets no deadline for a request's
headers, so a hundred connections that send nothing (or a byte a second) from one address shut the
server for everyone. This protocol instead:
- gives each request HEADER_TIMEOUT seconds from the connection (or from the previous answer on a
  kept-alive one) to send its headers whole; then the connection is closed with a 408;
- caps the connections one client address holds open (`per_client`) and all of them (`total`): a
  connection beyond either gets a 503 and is closed at once;
- counts only requests being answered, not idle connections, as load (the app's own admission
  control answers 503 beyond `--max-pending` images);
- answers every refusal it makes itself, and uvicorn's 400 for a request that is not HTTP, as the
  app does: one JSON error with the security headers.

A reverse proxy in front (nginx, HAProxy) does the same for a public deployment; these guards keep
a server reached directly (a hospital's LAN, loopback) from being shut by one careless or hostile
client. The limits hold per process: with `serve --workers N`, each worker has its own.
"""

from __future__ import annotations

import collections
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from lungxray.serve.operations import HEADERS

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_PER_CLIENT = 16
REASONS = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}


def refusal_bytes(status: int, error: str) -> bytes:
    """A whole HTTP/1.1 answer, closing the connection: the JSON error and the security headers."""
    body = json.dumps({"error": error}).encode()
    head = [b"HTTP/1.1 %d %s" % (status, REASONS[status]), b"content-type: application/json",
            b"content-length: %d" % len(body), b"connection: close", *(k + b": " + v for k, v in HEADERS)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with the limits above; `configure` sets them for this process."""

    header_timeout = DEFAULT_HEADER_TIMEOUT
    per_client = DEFAULT_PER_CLIENT
    total = 100
    open_by_client: collections.Counter = collections.Counter()

    @classmethod
    def configure(cls, total: int, per_client: int = DEFAULT_PER_CLIENT,
                  header_timeout: float = DEFAULT_HEADER_TIMEOUT) -> None:
        cls.total, cls.per_client, cls.header_timeout = total, per_client, header_timeout

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # idle connections are not load; the caps below bound them
        self.address, self.header_deadline, self.waiting_since_cycle = None, None, None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.address = (self.client or ("unknown",))[0]
        cls = type(self)
        if cls.open_by_client[self.address] >= cls.per_client or cls.open_by_client.total() >= cls.total:
            self.address = None  # not counted: it is refused
            return self.refuse(503, "too many open connections; close idle ones and retry")
        cls.open_by_client[self.address] += 1
        self.arm_header_deadline()

    def connection_lost(self, exc) -> None:
        if self.address is not None:
            type(self).open_by_client[self.address] -= 1
            if type(self).open_by_client[self.address] <= 0:
                del type(self).open_by_client[self.address]
            self.address = None
        self.disarm_header_deadline()
        super().connection_lost(exc)

    def arm_header_deadline(self) -> None:
        """The next request's headers must be in within `header_timeout` seconds."""
        self.disarm_header_deadline()
        self.waiting_since_cycle = self.cycle
        self.header_deadline = self.loop.call_later(self.header_timeout, self.on_header_timeout)

    def disarm_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def on_header_timeout(self) -> None:
        self.header_deadline = None
        if self.cycle is self.waiting_since_cycle and not self.transport.is_closing():  # no new request began
            self.refuse(408, f"the request's headers did not arrive within {self.header_timeout:g} s")

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self.waiting_since_cycle:  # a request's headers arrived whole
            self.disarm_header_deadline()
            self.waiting_since_cycle = self.cycle

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self.arm_header_deadline()  # before uvicorn runs a pipelined request, which disarms it
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        self.refuse(400, f"not a valid HTTP request ({msg.rstrip('.')})")

    def refuse(self, status: int, error: str) -> None:
        self.disarm_header_deadline()
        self.transport.write(refusal_bytes(status, error))
        self.transport.close()
