"""The server as an IT team runs it: API keys (missing, unknown, revoked), the refusal to serve a
network address without them, security headers, request ids, /api/ready, /metrics after known
requests, HTTPS with a certificate the test makes, and the keys command."""

import asyncio
import hashlib
import json
import math
import shutil
import signal
import ssl
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from lungxray import KerasPredictor, RunDir
from lungxray.cli import main
from lungxray.errors import ConfigError
from lungxray.infer.lite_predictor import LitePredictor
from lungxray.infer.loader import checked_export, load_predictor
from lungxray.serve import create_app, serve
from lungxray.serve.batching import Batcher
from lungxray.serve.keys import KeyStore
from lungxray.serve.operations import parse_rate
from tests.servers import lungxray_serve
from tests.test_distribute import free_ports
from tests.test_dicom_node import certificate, chest_film
from tests.test_export import WITHOUT_TENSORFLOW
from tests.test_serve import png_bytes


@pytest.fixture(scope="module")
def predictor(run):
    run_dir, _, cache = run
    return KerasPredictor.load(run_dir, cache_dir=cache), RunDir.open(run_dir)


def test_keys_guard_the_api(predictor, tmp_path):
    keys = KeyStore(tmp_path / "keys.json")
    token, old = keys.create("ward-3"), keys.create("old-pc")
    keys.revoke("old-pc")
    assert token not in (tmp_path / "keys.json").read_text()  # only a salted hash is kept
    client = TestClient(create_app(*predictor, keys=KeyStore(tmp_path / "keys.json")))
    image = {"file": ("x.png", png_bytes(), "image/png")}
    missing = client.post("/api/predict", files=image)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert client.post("/api/predict", files=image, headers={"Authorization": "Bearer lx_wrong"}).status_code == 401
    revoked = client.get("/api/model", headers={"Authorization": f"Bearer {old}"})
    assert revoked.status_code == 403 and "revoked" in revoked.json()["error"]
    good = client.post("/api/predict", files=image, headers={"Authorization": f"Bearer {token}"})
    assert good.status_code == 200 and good.json()["predicted"]
    assert client.get("/api/health").status_code == 200 and client.get("/api/ready").json()["status"] == "ready"
    assert client.get("/metrics").status_code == 401  # the metrics need a key too
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert "access-control-allow-origin" not in client.options(
        "/api/predict", headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}).headers
    with pytest.raises(ConfigError, match="exists"):
        keys.create("ward-3")


def test_metrics_count_what_was_asked(predictor):
    client = TestClient(create_app(*predictor, max_upload_mb=1))
    first = client.post("/api/predict", files={"file": ("x.png", png_bytes(), "image/png")})
    second = client.post("/api/predict", files={"file": ("x.png", png_bytes(value=30), "image/png")})
    client.post("/api/predict", files={"file": ("bad.png", b"not an image", "image/png")})
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    assert first.headers["x-content-type-options"] == "nosniff"
    text = client.get("/metrics").text
    assert 'lungxray_requests_total{route="/api/predict",status="200"} 2.0' in text
    assert 'lungxray_refused_uploads_total{reason="unreadable"} 1.0' in text
    decisions = [first.json()["predicted"] or "withheld", second.json()["predicted"] or "withheld"]
    for decision in set(decisions):
        assert f'lungxray_predictions_total{{decision="{decision}"}} {decisions.count(decision):.1f}' in text
    assert 'lungxray_request_seconds_count{route="/api/predict"} 3.0' in text
    assert "lungxray_images_in_hand 0.0" in text and "lungxray_model_info{" in text


def test_a_network_address_without_keys_is_refused(export):
    with pytest.raises(ConfigError, match="without --keys"):
        serve(export, host="0.0.0.0")
    assert main(["serve", "--model", str(export), "--host", "0.0.0.0"]) == 2


def test_https_and_the_keys_command(export, tmp_path, capsys):
    keys = tmp_path / "keys.json"
    assert main(["keys", "create", "scanner", "--keys", str(keys)]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["keys", "list", "--keys", str(keys)]) == 0 and "scanner" in capsys.readouterr().out
    cert, key = certificate(tmp_path, "server")
    trusted = ssl.create_default_context(cafile=cert)
    with lungxray_serve(export, "--keys", str(keys), "--tls-cert", cert, "--tls-key", key, scheme="https",
                        verify=trusted) as (url, port, _):
        answer = httpx.get(f"{url}/api/model", verify=trusted, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200 and answer.json()["classes"]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5)  # plain HTTP is not served
        assert main(["keys", "revoke", "scanner", "--keys", str(keys)]) == 0


def test_rate_limit_per_key(predictor, tmp_path):
    keys = KeyStore(tmp_path / "keys.json")
    busy, other = keys.create("busy"), keys.create("other")
    client = TestClient(create_app(*predictor, keys=keys, rate=2.0))
    answers = [client.get("/api/model", headers={"Authorization": f"Bearer {busy}"}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]  # a burst of one second's worth, then refused
    assert int(answers[2].headers["retry-after"]) >= 1 and "2 requests a second" in answers[2].json()["error"]
    assert client.get("/api/model", headers={"Authorization": f"Bearer {other}"}).status_code == 200  # its own bucket
    assert client.get("/api/health").status_code == 200  # probes are not limited
    time.sleep(0.6)  # half a second refills one request at 2/s
    assert client.get("/api/model", headers={"Authorization": f"Bearer {busy}"}).status_code == 200
    with pytest.raises(ConfigError, match="10/s"):
        parse_rate("fast")
    assert parse_rate("600/min") == 10 and parse_rate("2.5/s") == 2.5


def test_workers_share_the_rate_limit_and_the_metrics(export, tmp_path):
    """`serve --workers 2`: both processes answer, and the limits and the counts hold for the server
    as a whole (a bucket per worker would let a key through twice as often)."""
    keys = KeyStore(tmp_path / "keys.json")
    busy, monitor = keys.create("busy"), keys.create("monitor")
    audit = tmp_path / "audit.jsonl"
    with lungxray_serve(export, "--workers", "2", "--keys", str(tmp_path / "keys.json"), "--rate", "4/s",
                        "--audit-log", str(audit)) as (url, _, process):
        # The port opens with the first worker; the test starts once the second answers too, as the
        # audit log tells (a burst taken by one worker alone would not test what they share).
        deadline = time.monotonic() + 90
        while len(audited_workers(audit)) < 2:
            assert time.monotonic() < deadline, "the second worker never answered"
            httpx.get(f"{url}/api/health", headers={"Connection": "close"})
            time.sleep(0.05)

        def one_request(_) -> int:  # a connection of its own, which either worker may take
            return httpx.get(f"{url}/api/model", headers={"Authorization": f"Bearer {busy}",
                                                          "Connection": "close"}).status_code

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one_request, range(40)))
        elapsed = time.monotonic() - started
        assert set(statuses) == {200, 429}
        assert statuses.count(200) <= 4 + math.ceil(4 * elapsed)  # a burst of one second's worth, then 4/s
        watch = {"Authorization": f"Bearer {monitor}"}
        film = httpx.post(f"{url}/api/predict", files={"file": ("x.png", png_bytes(), "image/png")}, headers=watch)
        assert film.status_code == 200 and film.json()["predicted"] in film.json()["probabilities"]
        text = httpx.get(f"{url}/metrics", headers=watch).text
        for status in (200, 429):  # summed over the workers
            assert f'lungxray_requests_total{{route="/api/model",status="{status}"}} {statuses.count(status):.1f}' in text
        assert 'lungxray_requests_total{route="/api/predict",status="200"} 1.0' in text
        assert "lungxray_images_in_hand 0.0" in text and "lungxray_model_info{" in text
        assert len(audited_workers(audit)) == 2 and None not in audited_workers(audit)  # each line says which
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def audited_workers(audit: Path) -> set:
    """The workers the audit log has lines from (None for a line that names none)."""
    if not audit.exists():
        return set()
    return {json.loads(line).get("worker") for line in audit.read_text().splitlines() if line.strip()}


def test_workers_count_the_images_in_hand_together(tmp_path):
    """--max-pending holds for all the workers: each maps the same count (here two in this process
    and one in another)."""
    from lungxray.serve.workers import COUNT, SharedAdmission

    path = tmp_path / "admission"
    path.write_bytes(bytes(COUNT.size))
    first, second = SharedAdmission(path, 3), SharedAdmission(path, 3)
    assert first.reserve(2) is None and second.in_hand() == 2
    assert "2 images in hand, limit 3" in second.reserve(2)
    other = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from lungxray.serve.workers "
                            "import SharedAdmission; print(SharedAdmission(Path(sys.argv[1]), 3).reserve(1))",
                            str(path)], capture_output=True, text=True, timeout=60)
    assert other.stdout.strip() == "None" and first.in_hand() == 3
    first.release(2)
    assert second.in_hand() == 1 and second.reserve(2) is None


def test_a_worker_that_cannot_start_stops_the_server(tmp_path):
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"not a model")
    started = subprocess.run([sys.executable, "-m", "lungxray.cli", "serve", "--model", str(broken), "--workers", "2",
                              "--port", str(free_ports(1)[0])], capture_output=True, text=True, timeout=180)
    assert started.returncode == 2, started.stderr[-2000:]
    assert "a worker could not start" in started.stderr and "broken.tflite" in started.stderr


def test_audit_log_keeps_who_what_and_the_answer_but_no_patient(predictor, tmp_path):
    keys = KeyStore(tmp_path / "keys.json")
    token = keys.create("ward-3")
    log = tmp_path / "audit.jsonl"
    client = TestClient(create_app(*predictor, keys=keys, audit_log=log))
    auth = {"Authorization": f"Bearer {token}"}
    image = png_bytes(value=77)
    dicom = chest_film(tmp_path / "doe.dcm", np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))).read_bytes()
    good = client.post("/api/predict", files={"file": ("DOE_JANE.png", image, "image/png")}, headers=auth)
    from_dicom = client.post("/api/predict", files={"file": ("Doe^Jane.dcm", dicom, "application/dicom")}, headers=auth)
    bad = client.post("/api/predict", files={"file": ("x.png", b"not an image", "image/png")}, headers=auth)
    client.get("/api/model")  # no key: 401, logged too
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["status"] for line in lines] == [200, 200, 422, 401]
    assert [line["request_id"] for line in lines[:3]] == [r.headers["x-request-id"] for r in (good, from_dicom, bad)]
    assert [line["key"] for line in lines] == ["ward-3", "ward-3", "ward-3", None]
    assert lines[0]["images"] == [{"sha256": hashlib.sha256(image).hexdigest(), "decision": good.json()["predicted"]
                                   or "withheld", "ood": good.json()["ood"]["flag"], "set": good.json()["set"]}]
    assert good.json()["sha256"] == lines[0]["images"][0]["sha256"]
    assert lines[2]["images"] == [{"sha256": hashlib.sha256(b"not an image").hexdigest(), "decision": "unreadable"}]
    assert all(line["ms"] > 0 and line["time"].endswith("+00:00") for line in lines)
    text = log.read_text()
    for personal in ("Doe", "Jane", "DOE_JANE", "P-0042", "19700101", "data:image"):
        assert personal not in text


def test_requests_that_arrive_together_are_predicted_together(predictor):
    app = create_app(*predictor, max_batch=8, max_wait_ms=50)
    images = [png_bytes(value=v) for v in range(20, 220, 10)]

    async def all_at_once():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://lungxray") as client:
            return await asyncio.gather(*(client.post("/api/predict", files={"file": (f"{i}.png", data, "image/png")})
                                          for i, data in enumerate(images)))

    answers = asyncio.run(all_at_once())
    keras_predictor, _ = predictor
    for answer, data in zip(answers, images):
        alone = keras_predictor.predict_images(keras_predictor.read(data)[None]).probabilities[0]
        assert answer.status_code == 200
        np.testing.assert_allclose(list(answer.json()["probabilities"].values()), alone, atol=1e-6)
    metrics = TestClient(app).get("/metrics").text
    calls = float(metrics.split("lungxray_batch_images_count ")[1].split()[0])
    assert calls < len(images)  # some calls held several images
    assert float(metrics.split("lungxray_batch_images_sum ")[1].split()[0]) == len(images)
    with pytest.raises(ConfigError, match="max-batch"):
        create_app(*predictor, max_batch=0)


def test_a_lone_request_does_not_wait_for_a_batch():
    seen = []
    batcher = Batcher(lambda images: seen.append(len(images)) or images.sum(axis=(1, 2, 3)), max_batch=8,
                      max_wait=5.0, workers=1)
    started = time.monotonic()
    predictions, row = batcher.submit(np.ones((2, 2, 3))).result(timeout=10)
    assert time.monotonic() - started < 1.0 and seen == [1] and predictions[row] == 12  # nothing else was coming
    with batcher.expecting():  # an image being decoded: the batch waits for it
        first = batcher.submit(np.zeros((2, 2, 3)))
        time.sleep(0.3)
        second = batcher.submit(np.ones((2, 2, 3)))
    assert first.result(timeout=10)[1] == 0 and second.result(timeout=10)[1] == 1 and seen == [1, 2]


def test_runtime_auto_takes_the_runs_checked_export(run, export, tmp_path):
    run_dir, data, cache = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    image = str(sorted((data / "test" / "normal").iterdir())[0])
    predict = [sys.executable, "-m", "lungxray.cli", "predict", "--model", str(copy), "--cache", str(cache), image]
    assert "runtime keras" in subprocess.run(predict, capture_output=True, text=True, timeout=120).stderr
    (copy / "export").mkdir()
    for file in export.parent.glob("model.tflite*"):
        shutil.copy(file, copy / "export" / file.name)
    fast = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW, *predict[3:]], capture_output=True, text=True,
                          timeout=120)
    assert fast.returncode == 0, fast.stderr[-2000:]
    assert "runtime litert" in fast.stderr and "largest probability difference" in fast.stderr
    assert load_predictor(copy, cache, keras=True).__class__.__name__ == "KerasPredictor"  # asked for
    sidecar = copy / "export" / "model.tflite.json"
    checked = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**checked, "parity": {**checked["parity"], "max_abs_difference": 1.0}}))
    assert load_predictor(copy, cache).__class__.__name__ == "KerasPredictor"  # an export that failed parity is not used
    sidecar.write_text(json.dumps(checked))
    (copy / "model.keras").touch()  # retrained since the export: the export is stale
    assert checked_export(copy) is None


def test_a_run_served_through_its_export_still_explains(run, export):
    run_dir, _, _ = run
    client = TestClient(create_app(LitePredictor.load(export, run_model=RunDir.open(run_dir).model), RunDir.open(run_dir)))
    assert client.get("/api/model").json()["runtime"] == "litert"
    answer = client.post("/api/predict?explain=true", files={"file": ("x.png", png_bytes(), "image/png")}).json()
    assert answer["gradcam"].startswith("data:image/png;base64,")  # from the run's Keras model, loaded on demand
    bare = TestClient(create_app(LitePredictor.load(export))).post(
        "/api/predict?explain=true", files={"file": ("x.png", png_bytes(), "image/png")}).json()
    assert "gradcam" not in bare and bare["image"].startswith("data:image/png")  # an export alone has no gradients
