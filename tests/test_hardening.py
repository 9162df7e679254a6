"""`lungxray serve` against what a security reviewer tried (#33): keys that change while it runs,
keys files that are not keys files, concurrent key changes, spoofed X-Forwarded-For, foreign Host
headers and cross-site posts, what audit lines and files reveal, and uvicorn's own headers."""

import json
import os
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from lungxray.cli import main
from lungxray.errors import ConfigError
from lungxray.serve import create_app
from lungxray.serve.keys import RELOAD_SECONDS, KeyStore
from tests.servers import lungxray_serve
from tests.test_serve import png_bytes


def image():
    return {"file": ("x.png", png_bytes(), "image/png")}


def wait_for(predicate, seconds: float = 5.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)
    return time.monotonic()


def test_a_key_revoked_or_created_while_the_server_runs_counts_within_a_second(export, tmp_path):
    keys_file = tmp_path / "keys.json"
    token = KeyStore(keys_file).create("ward-3")
    with lungxray_serve(export, "--keys", str(keys_file), "--workers", "2", "--audit-log", "off") as (url, _, _):
        def statuses(key: str, count: int = 12) -> set[int]:  # new connections: both workers answer
            return {httpx.get(f"{url}/api/model", headers={"Authorization": f"Bearer {key}"},
                              timeout=10).status_code for _ in range(count)}

        assert statuses(token) == {200}
        revoked_at = time.monotonic()
        assert main(["keys", "revoke", "ward-3", "--keys", str(keys_file)]) == 0
        assert wait_for(lambda: statuses(token) == {403}) - revoked_at < 1.0 + 4 * RELOAD_SECONDS
        fresh = KeyStore(keys_file).create("ward-4")
        wait_for(lambda: statuses(fresh) == {200}, 2.0)
        assert statuses(token, 20) == {403} and statuses(fresh, 20) == {200}  # every worker agrees


def test_concurrent_creates_keep_every_key(tmp_path):
    keys_file = tmp_path / "keys.json"
    code = "import sys\nfrom lungxray.serve.keys import KeyStore\nprint(KeyStore(sys.argv[1]).create(sys.argv[2]))"
    with ThreadPoolExecutor(12) as pool:
        made = list(pool.map(lambda i: subprocess.run([sys.executable, "-c", code, str(keys_file), f"pc-{i}"],
                                                      capture_output=True, text=True, timeout=60), range(12)))
    assert all(m.returncode == 0 for m in made), [m.stderr[-500:] for m in made]
    store = KeyStore(keys_file)
    assert sorted(store.keys) == sorted(f"pc-{i}" for i in range(12))
    assert all(store.identify(m.stdout.strip()) is not None for m in made)
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600


@pytest.mark.parametrize("content,message", [
    ('{"keys": [{"name": "a", "salt": "zz", "digest": "00", "created": "x"}]}', "hex digits"),
    ('{"keys": [], "extra": 1}', "nothing else"),
    ('{"keys": [{"name": "a", "salt": "' + "0" * 32 + '", "digest": "' + "0" * 64 + '", "created": "x", "role": "admin"}]}',
     "exactly the fields"),
    ('{"keys": [{"name": "evil\\n", "salt": "' + "0" * 32 + '", "digest": "' + "0" * 64 + '", "created": "x"}]}',
     "not a valid name"),
])
def test_a_file_that_is_not_a_keys_file_is_refused_whole(tmp_path, content, message):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(content)
    with pytest.raises(ConfigError, match=message):
        KeyStore(keys_file)


def test_keys_files_that_cannot_be_read_and_names_that_end_in_a_newline_are_said_in_one_line(tmp_path, capsys):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert main(["keys", "list", "--keys", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "cannot read the keys file" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["keys", "create", "evil\n", "--keys", str(tmp_path / "k.json")]) == 2
    assert "key name" in capsys.readouterr().err and not (tmp_path / "k.json").exists()


def test_a_symlinked_keys_file_stays_a_link(tmp_path):
    target, link = tmp_path / "real" / "keys.json", tmp_path / "keys.json"
    target.parent.mkdir()
    KeyStore(target).create("first")
    link.symlink_to(target)
    KeyStore(link).create("second")
    assert link.is_symlink() and sorted(KeyStore(target).keys) == ["first", "second"]


def test_a_revoked_key_is_named_in_the_audit_log_which_is_private(run, export, tmp_path):
    from lungxray.infer.lite_predictor import LitePredictor

    keys = KeyStore(tmp_path / "keys.json")
    old = keys.create("old-pc")
    keys.revoke("old-pc")
    audit = tmp_path / "audit.jsonl"
    client = TestClient(create_app(LitePredictor.load(export), keys=KeyStore(tmp_path / "keys.json"), audit_log=audit))
    assert client.get("/api/model", headers={"Authorization": f"Bearer {old}"}).status_code == 403
    (line,) = [json.loads(line) for line in audit.read_text().splitlines()]
    assert line["key"] == "old-pc" and line["status"] == 403
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600


def test_foreign_hosts_and_cross_site_posts_are_refused(export):
    from lungxray.infer.lite_predictor import LitePredictor

    client = TestClient(create_app(LitePredictor.load(export), allowed_hosts=["127.0.0.1", "localhost"]),
                        base_url="http://127.0.0.1:8000")
    assert client.post("/api/predict", files=image()).status_code == 200
    rebound = client.post("/api/predict", files=image(), headers={"Host": "rebind.attacker.example"})
    assert rebound.status_code == 400 and "rebind.attacker.example" in rebound.json()["error"]
    assert rebound.headers["x-content-type-options"] == "nosniff"  # a refusal carries the security headers
    assert client.get("/api/model", headers={"Host": "localhost:8000"}).status_code == 200
    cross = client.post("/api/predict", files=image(), headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403 and "another origin" in cross.json()["error"]
    assert client.post("/api/predict", files=image(), headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert client.post("/api/predict", files=image(), headers={"Origin": "http://127.0.0.1:8000"}).status_code == 200


def test_x_forwarded_for_is_believed_only_from_a_named_proxy(export, tmp_path):
    audit = tmp_path / "audit.jsonl"
    spoofed = {"X-Forwarded-For": "203.0.113.9"}
    with lungxray_serve(export, "--rate", "2/s", "--audit-log", str(audit)) as (url, _, _):
        codes = [httpx.get(f"{url}/api/model", headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code
                 for i in range(5)]
        assert codes.count(429) >= 2  # one caller however it names itself
        headers = httpx.get(f"{url}/api/health").headers
        assert "server" not in headers
    clients = {json.loads(line)["client"] for line in audit.read_text().splitlines()}
    assert clients == {"127.0.0.1"}
    with lungxray_serve(export, "--forwarded-allow-ips", "127.0.0.1", "--audit-log", str(audit)) as (url, _, _):
        httpx.get(f"{url}/api/model", headers=spoofed)
    assert json.loads(audit.read_text().splitlines()[-1])["client"] == "203.0.113.9"  # the proxy's word


def test_the_bound_address_and_localhost_are_the_default_hosts(export):
    with lungxray_serve(export, "--audit-log", "off") as (url, port, _):
        assert httpx.get(f"{url}/api/health").status_code == 200
        assert httpx.get(f"http://localhost:{port}/api/health").status_code == 200
        foreign = httpx.get(f"{url}/api/health", headers={"Host": "rebind.attacker.example"})
        assert foreign.status_code == 400 and foreign.headers["content-type"] == "application/json"


class Flood:
    """`idle` connections that send nothing and `slow` ones that send a request's headers a byte a
    second, all from 127.0.0.1 (TLS ones complete their handshake first); closed by `close`."""

    def __init__(self, port: int, idle: int, slow: int, tls: bool = False):
        import socket
        import ssl

        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        self.sockets, self.slow = [], []
        for index in range(idle + slow):
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            connection = context.wrap_socket(raw, server_hostname="127.0.0.1") if tls and index >= idle else raw
            self.sockets.append(connection)
            if index >= idle:
                self.slow.append(connection)

    def trickle(self, seconds: float) -> None:
        """One byte a second to every slow connection still open, for `seconds`."""
        request = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        for second in range(int(seconds)):
            for connection in self.slow:
                try:
                    connection.send(request[second % len(request):][:1])
                except OSError:
                    pass  # closed by the server: what it should do
            time.sleep(1.0)

    def answers(self, wait: float = 1.0) -> list[bytes]:
        """What each connection got back within `wait` seconds in all (b"" for nothing): one wait for
        every connection, not one each, which 200 silent TLS connections made 40 s."""
        import select

        got = {connection: b"" for connection in self.sockets}
        pending, deadline = list(self.sockets), time.monotonic() + wait
        while pending and (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select(pending, [], [], left)
            if not readable:
                break
            for connection in readable:
                pending.remove(connection)
                try:
                    connection.settimeout(0.2)
                    got[connection] = connection.recv(4096)
                except OSError:
                    pass
        return [got[connection] for connection in self.sockets]

    def close(self) -> None:
        for connection in self.sockets:
            connection.close()


@pytest.mark.parametrize("tls,workers", [(False, 1), (True, 1), (False, 2)], ids=["http", "https", "two-workers"])
def test_idle_and_slow_connections_from_one_address_do_not_shut_the_server(export, tmp_path, tls, workers):
    """200 idle and 200 slow-header connections from 127.0.0.1; another client (127.0.0.2) keeps
    getting its health probe answered, p99 within 200 ms; the flood gets JSON 503s and 408s."""
    from threading import Thread

    from tests.test_dicom_node import certificate

    options = ["--header-timeout", "3", "--audit-log", "off", "--workers", str(workers)]
    scheme, verify = "http", True
    if tls:
        cert, key = certificate(tmp_path, "server")
        options += ["--tls-cert", cert, "--tls-key", key]
        scheme, verify = "https", cert
    with lungxray_serve(export, *options, scheme=scheme, verify=verify) as (url, port, _):
        flood = Flood(port, idle=200, slow=200, tls=tls)
        trickling = Thread(target=flood.trickle, args=(5,))
        trickling.start()
        try:
            other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2", verify=verify), timeout=5)
            latencies, statuses = [], []
            for _ in range(50):
                started = time.perf_counter()
                statuses.append(other.get(f"{url}/api/health", headers={"Connection": "close"}).status_code)
                latencies.append(time.perf_counter() - started)
                time.sleep(0.08)
            trickling.join()
            answers = flood.answers()
        finally:
            flood.close()
    assert statuses == [200] * 50
    assert np_percentile(latencies, 99) <= 0.2, sorted(latencies)[-5:]
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
    assert all(b"application/json" in a and b"nosniff" in a for a in refused + timed_out)
    if tls:  # idle connections never finish the handshake (asyncio drops them after 60 s); the slow ones are capped
        assert refused or timed_out
    else:  # beyond the first 16 (per worker), the idle connections were refused; the first got their 408
        assert len(refused) >= 200 - 16 * workers and len(timed_out) >= 1


def np_percentile(values, q):
    import numpy as np

    return float(np.percentile(values, q))


def test_an_upload_a_byte_a_second_gets_its_408_within_the_body_deadline(export):
    import socket

    with lungxray_serve(export, "--body-timeout", "3", "--read-timeout", "2", "--audit-log", "off") as (_, port, _):
        with socket.create_connection(("127.0.0.1", port), timeout=15) as connection:
            connection.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                               b"boundary=b\r\nContent-Length: 5000\r\n\r\n--b\r\nContent-Disposition: form-data; "
                               b'name="file"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n')  # then its bytes
            started, answer = time.monotonic(), b""
            connection.settimeout(1.5)
            while not answer and time.monotonic() - started < 10:
                connection.send(b"x")  # a byte a second: never a stall of --read-timeout
                try:
                    answer = connection.recv(4096)
                except socket.timeout:
                    pass
            took = time.monotonic() - started
            while answer and not answer.endswith(b"}"):  # the body may follow the head in its own segment
                more = connection.recv(4096)
                if not more:
                    break
                answer += more
    assert answer.startswith(b"HTTP/1.1 408") and b"longer than 3 s" in answer, answer
    assert took < 3 + 2.5


def test_the_rate_limit_counts_work_and_failed_authentications(export, tmp_path):
    from lungxray.infer.lite_predictor import LitePredictor
    from lungxray.serve.operations import EXPLAIN_COST

    predictor = LitePredictor.load(export)
    batch = [("files", (f"{i}.png", png_bytes(), "image/png")) for i in range(6)]
    client = TestClient(create_app(predictor, rate=2.0))
    assert client.post("/api/predict/batch", files=batch).status_code == 200  # from a full bucket: into debt
    owed = client.post("/api/predict", files=image())
    assert owed.status_code == 429 and int(owed.headers["retry-after"]) >= 1  # 6 images cost 6 tokens, not 1
    time.sleep(0.8)
    assert client.post("/api/predict", files=image()).status_code == 429  # still paying for the batch
    fresh = TestClient(create_app(predictor, rate=float(EXPLAIN_COST)))
    assert fresh.post("/api/predict?explain=true", files=image()).status_code == 200
    assert fresh.post("/api/predict", files=image()).status_code == 429  # one explanation spent a second's worth

    keys = KeyStore(tmp_path / "keys.json")
    token = keys.create("ward-3")
    guarded = TestClient(create_app(predictor, keys=KeyStore(tmp_path / "keys.json")))
    guesses = [guarded.get("/api/model", headers={"Authorization": f"Bearer lx_guess{i}"}).status_code
               for i in range(8)]
    assert guesses[:5] == [401] * 5 and guesses[-1] == 429  # guessing is slowed down, per address
    assert guarded.get("/api/model", headers={"Authorization": f"Bearer {token}"}).status_code == 429
    time.sleep(1.1)
    assert guarded.get("/api/model", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_many_callers_are_forgotten_a_few_at_a_time():
    from lungxray.serve.operations import RateLimit

    limit = RateLimit(1000.0)
    limit.MAX_CALLERS = 100
    for index in range(5000):
        assert limit.retry_after(f"203.0.113.{index}") == 0.0
    assert len(limit.buckets) < 1000  # only callers whose buckets are not yet full again are kept beyond 100
    time.sleep(0.01)
    for index in range(300):
        limit.retry_after("198.51.100.1")
    assert len(limit.buckets) <= limit.MAX_CALLERS + 1


def test_a_run_served_through_its_export_loads_no_tensorflow_until_it_explains(run, export):
    """Its server can explain (the run's Keras model is there), and still starts without TensorFlow."""
    from lungxray.rundir import RunDir

    code = ("import sys\nfor name in ('tensorflow', 'keras'):\n    sys.modules[name] = None\n"
            "from fastapi.testclient import TestClient\nfrom lungxray.infer.lite_predictor import LitePredictor\n"
            "from lungxray.serve import create_app\n"
            "predictor = LitePredictor.load(sys.argv[1], run_model=sys.argv[2])\n"
            "client = TestClient(create_app(predictor))\n"
            "print(predictor.can_explain, client.get('/api/health').status_code)")
    result = subprocess.run([sys.executable, "-c", code, str(export), str(RunDir.open(run[0]).model)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "200"]
