"""The server as an IT team runs it: API keys (missing, unknown, revoked), the refusal to serve a
network address without them, security headers, request ids, /api/ready, /metrics after known
requests, HTTPS with a certificate the test makes, and the keys command."""

import ssl
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from lungxray import Predictor, RunDir
from lungxray.cli import main
from lungxray.errors import ConfigError
from lungxray.serve import create_app, serve
from lungxray.serve.keys import KeyStore
from tests.test_dicom_node import certificate
from tests.test_distribute import free_ports
from tests.test_serve import png_bytes


@pytest.fixture(scope="module")
def predictor(run):
    run_dir, _, cache = run
    return Predictor.load(run_dir, cache_dir=cache), RunDir.open(run_dir)


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
    port = free_ports(1)[0]
    process = subprocess.Popen([sys.executable, "-m", "lungxray.cli", "serve", "--model", str(export), "--port",
                                str(port), "--keys", str(keys), "--tls-cert", cert, "--tls-key", key],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url, trusted = f"https://127.0.0.1:{port}", ssl.create_default_context(cafile=cert)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/api/health", verify=trusted, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        answer = httpx.get(f"{url}/api/model", verify=trusted, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200 and answer.json()["classes"]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5)  # plain HTTP is not served
        assert main(["keys", "revoke", "scanner", "--keys", str(keys)]) == 0
    finally:
        process.terminate()
        process.wait(timeout=30)
