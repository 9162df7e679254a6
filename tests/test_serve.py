"""The REST API with FastAPI's test client: good images, DICOM, garbage, empty, huge, wrong type."""

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lungxray import KerasPredictor, RunDir
from lungxray.serve import create_app
from tests.conftest import TINY
from tests.test_dicom import make_dicom


def png_bytes(size=64, value=128) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_and_model(client):
    assert client.get("/api/health").json()["status"] == "ok"
    model = client.get("/api/model").json()
    assert model["classes"] == ["covid", "normal", "pneumonia"] and len(model["sha256"]) == 64
    assert model["test_metrics"]["n"] == 24 and model["ood_threshold"] > 0


def test_predict_png_with_explanation(client, run):
    image = sorted((run[1] / "test" / "covid").iterdir())[0].read_bytes()
    response = client.post("/api/predict?explain=true", files={"file": ("x.png", image, "image/png")})
    assert response.status_code == 200
    answer = response.json()
    assert abs(sum(answer["probabilities"].values()) - 1) < 1e-4
    assert answer["predicted"] == max(answer["probabilities"], key=answer["probabilities"].get)
    assert set(answer["ood"]) == {"flag", "score", "threshold"} and answer["gradcam"].startswith("data:image/png")
    assert "not a diagnosis" in answer["notice"]


def test_predict_dicom_and_sniffing(client, tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (64, 1))
    dicom = make_dicom(tmp_path / "a.dcm", ramp).read_bytes()
    assert client.post("/api/predict", files={"file": ("scan.dcm", dicom, "application/dicom")}).status_code == 200
    # a PNG named .jpg with a wrong content type is still a PNG
    assert client.post("/api/predict", files={"file": ("x.jpg", png_bytes(), "text/plain")}).status_code == 200


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b"\x00\x01garbage bytes that are no image" * 10, "not a recognised image format"),
    (png_bytes()[:60], "corrupt or truncated"),
])
def test_bad_uploads_get_one_json_error(client, content, message):
    response = client.post("/api/predict", files={"file": ("bad.png", content, "image/png")})
    assert response.status_code == 422 and message in response.json()["error"]


def test_huge_upload_is_refused_with_413(client):
    huge = b"\x89PNG" + b"\x00" * (2 << 20)
    response = client.post("/api/predict", files={"file": ("huge.png", huge, "image/png")})
    assert response.status_code == 413 and "limit" in response.json()["error"]


def test_wrong_content_type_and_missing_file(client):
    response = client.post("/api/predict", json={"image": "x"})
    assert response.status_code == 422 and "multipart/form-data" in response.json()["error"]
    assert client.post("/api/predict", files={"other": ("x.png", png_bytes(), "image/png")}).status_code == 422


def test_batch_mixes_results_and_errors(client):
    files = [("files", ("a.png", png_bytes(), "image/png")), ("files", ("b.png", b"junk", "image/png")),
             ("files", ("c.png", png_bytes(value=10), "image/png"))]
    results = client.post("/api/predict/batch", files=files).json()["results"]
    assert [r["file"] for r in results] == ["a.png", "b.png", "c.png"]
    assert "predicted" in results[0] and "error" in results[1] and "predicted" in results[2]


def test_page_and_docs_are_served_without_external_requests(client):
    page = client.get("/").text
    assert "not a diagnosis" in page and "http://" not in page and "https://" not in page
    for asset in ("/static/app.js", "/static/style.css"):
        body = client.get(asset).text
        assert client.get(asset).status_code == 200 and "http" not in body
    # The interactive docs load a script from a CDN: off unless asked for; the schema is always there.
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 200


def test_huge_chunked_upload_without_length_is_refused_with_413(client):
    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        for _ in range(3):
            yield b"\x00" * (1 << 20)
        yield b"\r\n--b--\r\n"

    response = client.post("/api/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and "limit" in response.json()["error"]


def noise_photo() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_explanation_carries_what_the_model_saw(client, tmp_path):
    dicom = make_dicom(tmp_path / "a.dcm", np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (64, 1))).read_bytes()
    answer = client.post("/api/predict?explain=true", files={"file": ("scan.dcm", dicom, "application/dicom")}).json()
    image = Image.open(io.BytesIO(base64.b64decode(answer["image"].split(",", 1)[1])))
    assert image.size == (TINY, TINY) and answer["gradcam"] != answer["image"]


def test_refuse_ood_withholds_the_class_of_flagged_images(run):
    run_dir, _, cache = run
    predictor = KerasPredictor.load(run_dir, cache_dir=cache)
    predictor.ood.threshold = -1.0  # every image is flagged
    refusing = TestClient(create_app(predictor, RunDir.open(run_dir), refuse_ood=True))
    answer = refusing.post("/api/predict", files={"file": ("x.png", noise_photo(), "image/png")}).json()
    assert answer["ood"]["flag"] and answer["predicted"] is None and answer["probabilities"] is None
    assert "not to be trusted" in answer["withheld"]
    showing = TestClient(create_app(predictor, RunDir.open(run_dir)))
    answer = showing.post("/api/predict", files={"file": ("x.png", noise_photo(), "image/png")}).json()
    assert answer["ood"]["flag"] and answer["predicted"] in predictor.classes


def test_a_ct_slice_is_refused_with_its_reason(client, tmp_path):
    ct = make_dicom(tmp_path / "ct.dcm", np.zeros((64, 64), np.uint16), header={"Modality": "CT"}).read_bytes()
    response = client.post("/api/predict", files={"file": ("ct.dcm", ct, "application/dicom")})
    assert response.status_code == 422 and "CT image (DICOM Modality CT), not a chest radiograph" in response.json()["error"]
