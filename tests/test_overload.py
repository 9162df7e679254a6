"""A real `lungxray serve` on 127.0.0.1 under abuse, bounded in count and time: stalled uploads are
cut off, images beyond the limit get 503 at once (a batch larger than the limit, 422: the schema's
maxItems), connections beyond the limit get 503, health stays fast, nothing answers 500 and memory
comes back."""

import io
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.servers import lungxray_serve


MAX_PENDING, MAX_CONNECTIONS, READ_TIMEOUT = 8, 12, 1.0


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def rss_mb(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


@pytest.fixture(scope="module")
def server(run):
    run_dir, _, cache = run
    with lungxray_serve(run_dir, "--cache", str(cache), "--max-pending", str(MAX_PENDING), "--max-connections",
                        str(MAX_CONNECTIONS), "--read-timeout", str(READ_TIMEOUT), "--audit-log", "off") as server:
        yield server


def stalled_upload(port: int) -> socket.socket:
    """A connection that announces 100 kB and sends 10 bytes of it."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.sendall(b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                       b"Content-Length: 100000\r\n\r\n--b\r\nConte")
    return connection


def test_a_stalled_upload_is_cut_off(server):
    _, port, _ = server
    connection = stalled_upload(port)
    started = time.monotonic()
    answer = b""
    while b"stalled" not in answer and time.monotonic() - started < READ_TIMEOUT + 3:
        part = connection.recv(4096)  # headers and body may come in separate packets
        if not part:
            break
        answer += part
    connection.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"stalled" in answer
    assert time.monotonic() - started < READ_TIMEOUT + 3


def test_a_batch_the_server_could_never_hold_gets_422_at_once(server):
    url, _, _ = server
    files = [("files", (f"{i}.png", png(), "image/png")) for i in range(MAX_PENDING + 1)]
    started = time.monotonic()
    response = httpx.post(f"{url}/api/predict/batch", files=files, timeout=30)
    # Not 503: retrying could never clear it, since the server holds at most MAX_PENDING images.
    assert response.status_code == 422 and f"at most {MAX_PENDING}" in response.json()["error"]
    assert time.monotonic() - started < 2
    files = files[:MAX_PENDING]
    assert httpx.post(f"{url}/api/predict/batch", files=files, timeout=30).status_code == 200


def test_many_clients_health_stays_fast_and_memory_comes_back(server):
    url, port, process = server
    httpx.post(f"{url}/api/predict", files={"file": ("x.png", png(), "image/png")}, timeout=30)  # warm
    baseline = rss_mb(process.pid)
    statuses, health_seconds = [], []

    def client():
        with httpx.Client(timeout=30) as session:
            for _ in range(5):
                files = [("files", (f"{i}.png", png(), "image/png")) for i in range(4)]
                try:
                    statuses.append(session.post(f"{url}/api/predict/batch", files=files).status_code)
                except httpx.HTTPError:
                    statuses.append("dropped")

    threads = [threading.Thread(target=client) for _ in range(16)]  # 16 clients x 4 images, limit 8
    for thread in threads:
        thread.start()
    with httpx.Client(timeout=5) as probe:  # one client, as a kubelet keeps one: its set-up is not the server's time
        while any(t.is_alive() for t in threads):
            started = time.monotonic()
            assert probe.get(f"{url}/api/health").status_code in (200, 503)
            health_seconds.append(time.monotonic() - started)
            time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and max(health_seconds) < 1.0
    assert rss_mb(process.pid) < baseline + 100


def test_connections_beyond_the_limit_get_503(server):
    url, port, _ = server
    held = [stalled_upload(port) for _ in range(MAX_CONNECTIONS + 4)]
    answers = []
    started = time.monotonic()
    try:
        for connection in held:
            connection.settimeout(READ_TIMEOUT / 2)  # a 503 comes at once; the others are still being read
            try:
                answers.append(connection.recv(4096)[:12])
            except TimeoutError:
                answers.append(b"waiting")
    finally:
        for connection in held:
            connection.close()
    assert answers.count(b"HTTP/1.1 503") >= 4, answers
    assert time.monotonic() - started < (MAX_CONNECTIONS + 4) * READ_TIMEOUT
    time.sleep(READ_TIMEOUT + 0.5)
    assert httpx.get(f"{url}/api/health", timeout=5).status_code == 200
