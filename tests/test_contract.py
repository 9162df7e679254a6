"""The API's contract, against a real `lungxray serve` with keys and limits: Schemathesis fuzzes it from
its own /openapi.json with every check (no 5xx; statuses, headers, content types and bodies as
documented; the key enforced where the schema says it is; what the schema forbids refused), every status code the schema documents is reached by a request
made here, and SIGTERM lets a request in flight finish before the process exits."""

import concurrent.futures
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from lungxray.serve.keys import KeyStore
from tests.servers import lungxray_serve
from tests.test_serve import png_bytes

RATE, MAX_PENDING, MAX_UPLOAD_MB, READ_TIMEOUT = 30, 2, 1, 1.0
SCHEMATHESIS_SETTINGS = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def guarded_server(export, tmp_path_factory):
    """(url, token, revoked token) of a server with keys, a rate limit and tight limits."""
    store = KeyStore(tmp_path_factory.mktemp("keys") / "keys.json")
    token, revoked = store.create("fuzzer"), store.create("old")
    store.revoke("old")
    with lungxray_serve(export, "--keys", str(store.path), "--rate", f"{RATE}/s", "--max-pending", str(MAX_PENDING),
                        "--max-upload-mb", str(MAX_UPLOAD_MB), "--read-timeout", str(READ_TIMEOUT),
                        "--audit-log", "off") as (url, port, _):
        yield url, port, token, revoked


def test_schemathesis_finds_nothing(guarded_server, tmp_path):
    url, _, token, _ = guarded_server
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(SCHEMATHESIS_SETTINGS), "run", f"{url}/openapi.json",
         "--checks", "all", "-H", f"Authorization: Bearer {token}", "--max-examples", "60", "--seed", "7", "--workers",
         "1", "--rate-limit", f"{RATE - 5}/s", "--no-color", "--generation-database", "none"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "5 selected" in result.stdout and "passed" in result.stdout


def test_every_documented_status_is_reached(guarded_server):
    url, port, token, revoked = guarded_server
    schema = httpx.get(f"{url}/openapi.json").json()
    documented = {(path, int(code)) for path, item in schema["paths"].items() for operation in item.values()
                  for code in operation["responses"]}
    auth = {"Authorization": f"Bearer {token}"}
    image = {"file": ("x.png", png_bytes(), "image/png")}
    reached = set()

    def record(path: str, response: httpx.Response) -> None:
        reached.add((path, response.status_code))

    for path in ("/api/health", "/api/ready"):
        record(path, httpx.get(url + path))
    for path, send in (("/api/model", lambda **kw: httpx.get(f"{url}/api/model", **kw)),
                       ("/api/predict", lambda **kw: httpx.post(f"{url}/api/predict", files=image, **kw)),
                       ("/api/predict/batch", lambda **kw: httpx.post(f"{url}/api/predict/batch", files=[
                           ("files", image["file"])], **kw))):
        record(path, send(headers=auth))
        record(path, send())  # 401
        record(path, send(headers={"Authorization": f"Bearer {revoked}"}))  # 403
        time.sleep(1.1)  # a full bucket again
    huge = os.urandom(int(1.5 * MAX_UPLOAD_MB * (1 << 20)))
    for path, field in (("/api/predict", "file"), ("/api/predict/batch", "files")):
        record(path, httpx.post(url + path, files=[(field, ("big.png", huge, "image/png"))], headers=auth))  # 413
        record(path, httpx.post(url + path, files=[(field, ("bad.png", b"not an image", "image/png"))] * (
            field == "file"), data={"other": "x"}, headers=auth))  # 422: unreadable, or the field missing
        record(path, stalled(port, path, token))  # 408
        record(path, httpx.post(url + path, content=b"--b\r\n--b--\r\n", headers={
            **auth, "Content-Type": "multipart/form-data; boundary=b"}))  # 400: not multipart
        time.sleep(1.1)
    many = [("files", ("x.png", png_bytes(), "image/png"))] * (MAX_PENDING + 1)
    record("/api/predict/batch", httpx.post(f"{url}/api/predict/batch", files=many, headers=auth))  # 422: never fits
    slow = ("big.png", flat_png(4000), "image/png")  # ~0.1 s to decode: requests sent together overlap

    def one_slow(path: str) -> httpx.Response:
        files = {"file": slow} if path == "/api/predict" else [("files", slow)]
        return httpx.post(url + path, files=files, headers=auth, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(2 * MAX_PENDING + 2) as pool:
        for _ in range(5):  # beyond MAX_PENDING images in hand, 503 (a few rounds, should the requests not overlap)
            paths = ["/api/predict", "/api/predict/batch"] * (MAX_PENDING + 1)
            for path, response in zip(paths, pool.map(one_slow, paths)):
                record(path, response)
            if {("/api/predict", 503), ("/api/predict/batch", 503)} <= reached:
                break
            time.sleep(1.1)
    time.sleep(1.1)
    with httpx.Client(headers=auth) as client:  # keep-alive: fast enough to outrun the rate
        for path, send in (("/api/model", lambda: client.get(f"{url}/api/model")),
                           ("/api/predict", lambda: client.post(f"{url}/api/predict", files={})),
                           ("/api/predict/batch", lambda: client.post(f"{url}/api/predict/batch", files={}))):
            for _ in range(10 * RATE):
                response = send()
                record(path, response)
                if response.status_code == 429:
                    break
            time.sleep(1.1)
    assert documented - reached == set(), "documented but never answered"
    assert {(p, s) for p, s in reached if p in schema["paths"]} - documented == set(), "answered but not documented"


def stalled(port: int, path: str, token: str) -> httpx.Response:
    """An upload that announces more than it sends, answered (408) once the read timeout passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT + 10) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: "
                           "multipart/form-data; boundary=b\r\nContent-Length: 5000\r\n\r\n--b\r\nConte".encode())
        status_line = connection.makefile("rb").readline().decode()
    return httpx.Response(int(status_line.split()[1]))


def flat_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side), 100, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_sigterm_lets_the_request_in_flight_finish(export):
    body, boundary = png_bytes(), "lungxray-boundary"
    upload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
              "Content-Type: image/png\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
    with lungxray_serve(export, "--audit-log", "off") as (_, port, process):
        connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        connection.sendall(f"POST /api/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary="
                           f"{boundary}\r\nContent-Length: {len(upload)}\r\n\r\n".encode() + upload[:100])
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert process.poll() is None  # still serving the request in flight
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).recv(1)  # but taking no new ones
        connection.sendall(upload[100:])
        answer = connection.makefile("rb").read().decode("latin-1")
        connection.close()
        assert answer.startswith("HTTP/1.1 200") and '"predicted"' in answer
        # uvicorn raises the signal again once it has drained, so the process ends as SIGTERM'd.
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
