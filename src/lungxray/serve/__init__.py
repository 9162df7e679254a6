"""`lungxray serve`: a REST API and a one-page web app around a trained model.

The model is loaded once (safe mode); inference runs in worker threads, at most one per CPU core.
Images beyond a bounded number in hand (a batch counts each image) get 503 at once instead of
waiting; connections beyond a limit get 503 from uvicorn; uploads are capped in size (413) and in
stall time (408); work for a client that has gone is dropped. Uploads are sniffed by content
rather than trusted by extension, and every bad request gets one JSON error, never a 500.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import threading
from pathlib import Path

from typing import TYPE_CHECKING

import anyio
import numpy as np
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image

from lungxray.errors import ConfigError, ImageError
from lungxray.io import sha256_of
from lungxray.lite import LitePredictor, is_export
from lungxray.loader import load_predictor
from lungxray.predictions import OOD_NOTE
from lungxray.rundir import RunDir
from lungxray.serve.keys import KeyStore
from lungxray.serve.metrics import Metrics
from lungxray.serve.operations import Operations

if TYPE_CHECKING:  # a server for an export runs without TensorFlow, which the Keras predictor imports
    from lungxray.predict import Predictor

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_MB = 20
DEFAULT_MAX_PENDING = 64  # images waiting or running
DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_READ_TIMEOUT = 10.0  # seconds an upload may stall between two chunks
MAX_BATCH = 64
NOTICE = "Research use only: not a medical device, not a diagnosis."


class GuardRequests:
    """ASGI middleware: refuse bodies over `max_bytes` with 413, whether or not Content-Length is
    sent, and bodies that stall for `read_timeout` seconds between two chunks with 408 (a client
    trickling an upload must not hold a connection and a worker forever)."""

    def __init__(self, app, max_bytes: int, read_timeout: float):
        self.app, self.max_bytes, self.read_timeout = app, max_bytes, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _refuse(send, 413, f"upload larger than the {self.max_bytes // (1 << 20)} MB limit")
        received, refusal, answered = 0, None, False

        async def guarded_receive():
            nonlocal received, refusal
            try:
                with anyio.fail_after(self.read_timeout):
                    message = await receive()
            except TimeoutError:
                refusal = (408, f"upload stalled for {self.read_timeout:g} s; send the body without pauses")
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
                    await _refuse(send, *refusal)
                return
            answered = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not refusal:
                raise
        if refusal and not answered:
            await _refuse(send, *refusal)


async def _refuse(send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Admission:
    """Images admitted (waiting or running), counted one by one: a batch of 50 is 50, not 1."""

    def __init__(self, limit: int):
        self.limit, self.count, self.lock = limit, 0, threading.Lock()

    @contextlib.contextmanager
    def admit(self, images: int):
        with self.lock:
            if self.count + images > self.limit:
                raise HTTPException(503, f"server busy: {self.count} images in hand, limit {self.limit}; "
                                         "retry shortly")
            self.count += images
        try:
            yield
        finally:
            with self.lock:
                self.count -= images


def model_identity(predictor: Predictor | LitePredictor, run: RunDir | None) -> dict:
    """What /api/model tells about the model: a run folder's, or an export's (`predictor.model_path`)."""
    info = predictor.info
    identity = {"classes": predictor.classes, "image_size": predictor.image_size,
                "temperature": predictor.temperature, "engine": info.get("engine"), "trained": info.get("trained"),
                "training_data": Path(str(info.get("data", ""))).name or None,  # a name, never a server path
                "training_counts": info.get("counts"),
                "ood_threshold": predictor.ood.threshold if predictor.ood else None}
    model_file = run.model if run is not None else getattr(predictor, "model_path", None)
    if model_file is not None:
        identity["sha256"] = sha256_of(model_file)
    if run is not None:
        # The evaluate package imports scikit-learn and matplotlib, which an export's server lacks.
        from lungxray.evaluate.schema import METRICS_FILE, read_metrics

        if (run.evaluation() / METRICS_FILE).is_file():
            metrics = read_metrics(run.evaluation())
            identity["test_metrics"] = {k: metrics[k] for k in ("n", "accuracy", "macro_f1", "macro_auroc")}
    identity["id"] = identity.get("sha256", "unsaved")[:12]
    return identity


def png_data_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def create_app(predictor: Predictor | LitePredictor, run: RunDir | None = None,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_pending: int = DEFAULT_MAX_PENDING, refuse_ood: bool = False,
               read_timeout: float = DEFAULT_READ_TIMEOUT, api_docs: bool = False, *,
               keys: KeyStore | None = None) -> FastAPI:
    """The API and page; with `refuse_ood`, images the gate flags get no class (`predicted` null);
    with `keys`, the API answers only requests that carry one of their tokens.
    `api_docs` serves the interactive docs at /docs, which load their script from a CDN (off by
    default: they break offline); /openapi.json is always served."""
    app = FastAPI(title="lungxray", description=f"Chest X-ray classification. {NOTICE}", version="1",
                  docs_url="/docs" if api_docs else None, redoc_url=None)
    identity = model_identity(predictor, run)
    limiter = anyio.CapacityLimiter(os.cpu_count() or 2)
    admission = Admission(max_pending)
    metrics = Metrics(identity, lambda: admission.count)
    gradcam = {}

    def explain(image: np.ndarray, class_index: int) -> str:
        from lungxray.explain import GradCam, overlay

        if "cam" not in gradcam:
            gradcam["cam"] = GradCam(predictor.model)
        heat, _ = gradcam["cam"].heatmap(image, class_index)
        return png_data_url(overlay(image, heat))

    def predict_bytes(data: bytes, name: str, with_explanation: bool) -> dict:
        if not data:
            raise ImageError(name, "the upload is empty")
        image = predictor.read(data, name=name)
        result = predictor.predict_images(image[None])
        probabilities = result.probabilities[0]
        predicted = int(probabilities.argmax())
        answer = {"file": name, "predicted": predictor.classes[predicted],
                  "probabilities": {c: float(p) for c, p in zip(predictor.classes, probabilities)},
                  "model": identity["id"], "notice": NOTICE}
        if result.ood is not None:
            answer["ood"] = {"flag": bool(result.ood[0]), "score": float(result.ood_score[0]),
                             "threshold": predictor.ood.threshold}
            if answer["ood"]["flag"] and refuse_ood:
                answer.update(predicted=None, probabilities=None, withheld=OOD_NOTE)
        metrics.predicted(answer["predicted"] or "withheld", bool(answer.get("ood", {}).get("flag")))
        if with_explanation:
            # What the model saw (decoded, cropped, resized: browsers cannot show DICOM), and where it looked.
            answer["image"] = png_data_url(image)
            if hasattr(predictor, "model"):  # Grad-CAM needs the Keras model, which an export does not carry
                answer["gradcam"] = explain(image, predicted)
        return answer

    async def run_prediction(request: Request, upload: UploadFile, with_explanation: bool) -> dict:
        data = await upload.read()
        if await request.is_disconnected():  # the client has gone: nobody will read the answer
            raise HTTPException(499, "client closed the request")
        return await anyio.to_thread.run_sync(predict_bytes, data, upload.filename or "upload", with_explanation,
                                              limiter=limiter)

    @app.exception_handler(ImageError)
    async def image_error(request: Request, error: ImageError):
        return JSONResponse({"error": f"cannot read the image: {error.reason}", "file": error.path}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse({"error": error.detail}, status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return JSONResponse({"error": f"bad request: {problems}. Send multipart/form-data with an image "
                                      "in the field 'file' (or 'files' for /api/predict/batch)"}, status_code=422)

    @app.get("/api/health")
    async def health() -> dict:  # on the event loop: answers while every worker thread is busy
        return {"status": "ok", "model": identity["id"], "images_in_hand": admission.count}

    @app.get("/api/ready")
    async def ready() -> dict:  # the model is loaded before the port opens: reachable means ready
        return {"status": "ready", "model": identity["id"]}

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/model")
    def model() -> dict:
        return identity

    @app.post("/api/predict")
    async def predict(request: Request, file: UploadFile = File(...), explain: bool = False) -> dict:
        """Class probabilities for one image (PNG, JPEG, DICOM...); `explain=true` adds a Grad-CAM overlay."""
        with admission.admit(1):
            return await run_prediction(request, file, explain)

    @app.post("/api/predict/batch")
    async def predict_batch(request: Request, files: list[UploadFile] = File(...)) -> dict:
        """Several images (at most MAX_BATCH); each gets its result or its own error."""
        if len(files) > MAX_BATCH:
            raise HTTPException(413, f"{len(files)} files in one batch; send at most {MAX_BATCH}")
        results = []
        with admission.admit(len(files)):
            for upload in files:
                try:
                    results.append(await run_prediction(request, upload, False))
                except ImageError as error:
                    results.append({"file": upload.filename, "error": f"cannot read the image: {error.reason}"})
        return {"results": results}

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(GuardRequests, max_bytes=int(max_upload_mb * (1 << 20)), read_timeout=read_timeout)
    app.add_middleware(Operations, metrics=metrics, keys=keys, api_docs=api_docs)  # outermost: sees every answer
    return app


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
          cache_dir: Path | None = None, refuse_ood: bool = False, max_pending: int = DEFAULT_MAX_PENDING,
          max_connections: int = DEFAULT_MAX_CONNECTIONS, read_timeout: float = DEFAULT_READ_TIMEOUT,
          api_docs: bool = False, runtime: str = "auto", keys: Path | None = None, insecure: bool = False,
          tls_cert: str | None = None, tls_key: str | None = None) -> None:
    """Serve until stopped. Beyond `max_connections` open connections uvicorn answers 503 at once;
    idle keep-alive connections close after 5 s. Without `keys`, only a loopback address is served
    unless `insecure`; SIGTERM lets the requests in flight finish (30 s at most) before exit."""
    import uvicorn

    if keys is None and not insecure and not is_loopback(host):
        raise ConfigError(f"serving on {host} without --keys lets anyone who reaches the port use the model: "
                          "make a key with `lungxray keys create NAME --keys FILE` and pass --keys FILE "
                          "(or pass --insecure on a network you trust)")
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    key_store = KeyStore(keys) if keys is not None else None
    if key_store is not None and not key_store.keys:
        raise ConfigError(f"{keys} holds no keys: make one with `lungxray keys create NAME --keys {keys}`")
    run = None if is_export(model) else RunDir.open(model)  # an export: no TensorFlow, no Grad-CAM
    predictor = load_predictor(run.model if run else model, cache_dir, runtime)
    app = create_app(predictor, run, max_upload_mb, max_pending, refuse_ood, read_timeout, api_docs, keys=key_store)
    uvicorn.run(app, host=host, port=port, log_level="warning", limit_concurrency=max_connections,
                timeout_keep_alive=5, timeout_graceful_shutdown=30, ssl_certfile=tls_cert, ssl_keyfile=tls_key)


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
