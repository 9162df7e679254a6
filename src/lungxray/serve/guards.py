"""What keeps the server standing: a cap on upload size and stall time (`GuardRequests`, ASGI) and
a bound on the images in hand (`Admission`), so that excess work is refused at once, not queued."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import anyio
from fastapi import HTTPException


class GuardRequests:
    """ASGI middleware: refuse bodies over `max_bytes` with 413, whether or not Content-Length is
    sent, and with 408 bodies that stall for `read_timeout` seconds between two chunks or take more
    than `body_timeout` seconds in all (a client trickling an upload, a byte a second, must not hold
    a connection and a worker forever)."""

    def __init__(self, app, max_bytes: int, read_timeout: float, body_timeout: float = 60.0):
        self.app, self.max_bytes, self.read_timeout, self.body_timeout = app, max_bytes, read_timeout, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_error(send, 413, f"upload larger than the {self.max_bytes // (1 << 20)} MB limit")
        received, refusal, answered = 0, None, False
        deadline = time.monotonic() + self.body_timeout

        async def guarded_receive():
            nonlocal received, refusal
            left = deadline - time.monotonic()
            try:
                with anyio.fail_after(max(0.0, min(self.read_timeout, left))):
                    message = await receive()
            except TimeoutError:
                refusal = (408, f"upload stalled for {self.read_timeout:g} s; send the body without pauses"
                           if left > self.read_timeout else
                           f"upload took longer than {self.body_timeout:g} s; send it faster, or a smaller one")
                return {"type": "http.disconnect"}
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                refusal = (413, f"upload larger than the {self.max_bytes // (1 << 20)} MB limit")
                return {"type": "http.disconnect"}  # the app stops reading; its answer is replaced below
            return message

        async def guarded_send(message):
            nonlocal answered
            if refusal:
                if not answered:
                    answered = True
                    await send_error(send, *refusal)
                return
            answered = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not refusal:
                raise
        if refusal and not answered:
            await send_error(send, *refusal)


async def send_error(send, status: int, error: str, headers: list | tuple = ()) -> None:
    """A whole JSON error answer, {"error": ...}, from ASGI middleware."""
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class Admission:
    """Images admitted (waiting or running), counted one by one: a batch of 50 is 50, not 1. Under
    `serve --workers N` the count is one for all of them (`workers.SharedAdmission`)."""

    def __init__(self, limit: int):
        self.limit, self.count, self.lock = limit, 0, threading.Lock()

    def reserve(self, images: int) -> str | None:
        """None if `images` more fit (and they are counted), else why not."""
        with self.lock:
            if self.count + images > self.limit:
                return f"server busy: {self.count} images in hand, limit {self.limit}; retry shortly"
            self.count += images
            return None

    def release(self, images: int) -> None:
        with self.lock:
            self.count -= images

    def in_hand(self) -> int:
        return self.count


@contextlib.contextmanager
def admitted(admission: Admission, images: int):
    """Hold `images` of the admission's room for the block, or answer 503 at once."""
    refusal = admission.reserve(images)
    if refusal is not None:
        raise HTTPException(503, refusal)
    try:
        yield
    finally:
        admission.release(images)
