"""`lungxray serve`: a REST API and a one-page web app around a trained model.

The model is loaded once (safe mode). Uploads are decoded in worker threads and predicted in
others (`batching.Batcher`), at most one of each per CPU core; with `max_batch` > 1, images that
arrive together are predicted together. Images beyond a bounded number in hand (a batch counts
each image) get 503 at once instead of waiting; connections beyond a limit get 503 from uvicorn; uploads are capped in size (413) and in stall time (408); work
for a client that has gone is dropped. Uploads are sniffed by content rather than trusted by
extension, and every bad request gets one JSON error, never a 500. Around it (`operations`): API
keys, rate limits, security headers, request ids, metrics and the audit log.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from lungxray.conformal import DEFAULT_COVERAGE, check_coverage, set_fields
from lungxray.errors import ConfigError, ImageError
from lungxray.io import sha256_of
from lungxray.lite import LitePredictor, is_export
from lungxray.loader import load_predictor
from lungxray.predictions import OOD_NOTE
from lungxray.rundir import RunDir
from lungxray.serve.batching import Batcher
from lungxray.serve.guards import Admission, GuardRequests, admitted
from lungxray.serve.keys import KeyStore
from lungxray.serve.metrics import Metrics
from lungxray.serve.operations import Operations, RateLimit, audit_logger
from lungxray.serve.schema import BatchResults, Health, ModelIdentity, Prediction, Ready, errors

if TYPE_CHECKING:  # a server for an export runs without TensorFlow, which the Keras predictor imports
    from lungxray.predict import Predictor

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_MB = 20
DEFAULT_MAX_PENDING = 64  # images waiting or running
DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_READ_TIMEOUT = 10.0  # seconds an upload may stall between two chunks
# Off by default: on 2 CPU cores batching made no runtime faster (docs/benchmarks.md#serving).
DEFAULT_MAX_BATCH = 1  # images predicted in one call
DEFAULT_MAX_WAIT_MS = 2.0  # how long a batch waits for images still being decoded
MAX_BATCH = 64  # files in one /api/predict/batch request
NOTICE = "Research use only: not a medical device, not a diagnosis."


def model_identity(predictor: Predictor | LitePredictor, run: RunDir | None) -> dict:
    """What /api/model tells about the model: a run folder's, or an export's (`predictor.model_path`)."""
    info = predictor.info
    exported = getattr(predictor, "model_path", None)
    identity = {"classes": predictor.classes, "image_size": predictor.image_size,
                "temperature": predictor.temperature, "engine": info.get("engine"), "trained": info.get("trained"),
                "training_data": Path(str(info.get("data", ""))).name or None,  # a name, never a server path
                "training_counts": info.get("counts"),
                "ood_threshold": predictor.ood.threshold if predictor.ood else None,
                "runtime": getattr(predictor, "runtime", "keras")}
    model_file = run.model if run is not None else exported
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


class Explainer:
    """Grad-CAM overlays: with the Keras predictor's own model, or, for a run served through its
    export, the run's Keras model, loaded (with TensorFlow) on the first request that asks."""

    def __init__(self, predictor, run: RunDir | None):
        self.predictor, self.run, self.gradcam, self.lock = predictor, run, None, threading.Lock()

    @property
    def available(self) -> bool:
        return hasattr(self.predictor, "model") or self.run is not None

    def __call__(self, image: np.ndarray, class_index: int) -> str:
        from lungxray.explain import GradCam, overlay

        with self.lock:
            if self.gradcam is None:
                if hasattr(self.predictor, "model"):
                    network = self.predictor.model
                else:
                    from lungxray.model import load_model

                    network = load_model(self.run.model)
                self.gradcam = GradCam(network)
        heat, _ = self.gradcam.heatmap(image, class_index)
        return png_data_url(overlay(image, heat))


def create_app(predictor: Predictor | LitePredictor, run: RunDir | None = None,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_pending: int = DEFAULT_MAX_PENDING, refuse_ood: bool = False,
               read_timeout: float = DEFAULT_READ_TIMEOUT, api_docs: bool = False, *,
               keys: KeyStore | None = None, rate: float | None = None, audit_log: str | Path | None = None,
               max_batch: int = DEFAULT_MAX_BATCH, max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
               coverage: float = DEFAULT_COVERAGE, shared=None) -> FastAPI:
    """The API and page; with `refuse_ood`, images the gate flags get no class (`predicted` null);
    with `keys`, the API answers only requests that carry one of their tokens, each key at most
    `rate` requests a second; `audit_log` ('-' for standard output, or a file) gets a JSON line per
    request; each answer carries its conformal set at `coverage`. Images are predicted together, up
    to `max_batch` (1: each alone), a batch waiting at most `max_wait_ms` for images still being decoded.
    `api_docs` serves the interactive docs at /docs, which load their script from a CDN (off by
    default: they break offline); /openapi.json is always served. `shared`: what the workers of
    `serve --workers N` share (`workers.Shared`), whose limits then hold for all of them."""
    check_coverage(coverage)
    if max_batch < 1 or max_wait_ms < 0:
        raise ConfigError(f"--max-batch must be at least 1 and --max-wait-ms at least 0. Got {max_batch} and "
                          f"{max_wait_ms} instead.")
    app = FastAPI(title="lungxray", description=f"Chest X-ray classification. {NOTICE}", version="1",
                  docs_url="/docs" if api_docs else None, redoc_url=None)
    identity = model_identity(predictor, run)
    cores = os.cpu_count() or 2
    decoders = anyio.CapacityLimiter(cores)
    admission = shared.admission if shared is not None else Admission(max_pending)
    metrics = Metrics(identity, admission.in_hand)
    # Even unbatched (max_batch 1), prediction runs in the batcher's threads: decoding the next
    # images then overlaps the network's call for this one (measured faster than both in one thread).
    batcher = Batcher(predictor.predict_images, max_batch, max_wait_ms / 1000, cores, metrics.batch.observe)
    explainer = Explainer(predictor, run)

    def decode(data: bytes, name: str) -> np.ndarray:
        if not data:
            raise ImageError(name, "the upload is empty")
        return predictor.read(data, name=name)

    def answer_for(predictions, row: int, name: str, digest: str, image: np.ndarray, with_explanation: bool) -> dict:
        probabilities = predictions.probabilities[row]
        predicted = int(probabilities.argmax())
        answer = {"file": name, "sha256": digest, "predicted": predictor.classes[predicted],
                  "probabilities": {c: float(p) for c, p in zip(predictor.classes, probabilities)},
                  "model": identity["id"], "notice": NOTICE}
        if predictor.conformal is not None:
            in_set = predictor.conformal.sets(predictions.raw[row:row + 1], coverage)[0]
            answer.update(set_fields(in_set, probabilities, predictor.classes, coverage))
        if predictions.ood is not None:
            answer["ood"] = {"flag": bool(predictions.ood[row]), "score": float(predictions.ood_score[row]),
                             "threshold": predictor.ood.threshold}
            if answer["ood"]["flag"] and refuse_ood:
                answer.update(predicted=None, probabilities=None, set=None, set_says=None, withheld=OOD_NOTE)
        if with_explanation:
            # What the model saw (decoded, cropped, resized: browsers cannot show DICOM), and where it looked.
            answer["image"] = png_data_url(image)
            if explainer.available:  # Grad-CAM needs gradients: a run's Keras model, not a bare export
                answer["gradcam"] = explainer(image, predicted)
        return answer

    async def received(request: Request, upload: UploadFile) -> tuple[bytes, str, str]:
        """The upload's bytes, name and SHA-256."""
        data = await upload.read()
        if await request.is_disconnected():  # the client has gone: nobody will read the answer
            raise HTTPException(499, "client closed the request")
        return data, upload.filename or "upload", hashlib.sha256(data).hexdigest()

    async def run_prediction(request: Request, data: bytes, name: str, digest: str, with_explanation: bool) -> dict:
        audited = request.scope.setdefault("state", {}).setdefault("images", [])  # for the audit log
        try:
            with batcher.expecting():
                image = await anyio.to_thread.run_sync(decode, data, name, limiter=decoders)
                future = batcher.submit(image)
            predictions, row = await asyncio.wrap_future(future)
        except ImageError:
            audited.append({"sha256": digest, "decision": "unreadable"})
            raise
        if with_explanation:  # Grad-CAM and PNG encoding take tens of milliseconds: not on the event loop
            answer = await anyio.to_thread.run_sync(answer_for, predictions, row, name, digest, image, True,
                                                    limiter=decoders)
        else:
            answer = answer_for(predictions, row, name, digest, image, False)
        decision, flagged = answer["predicted"] or "withheld", bool(answer.get("ood", {}).get("flag"))
        metrics.predicted(decision, flagged)
        audited.append({"sha256": digest, "decision": decision, "ood": flagged, "set": answer.get("set")})
        return answer

    @app.exception_handler(ImageError)
    async def image_error(request: Request, error: ImageError):
        return JSONResponse({"error": f"cannot read the image: {error.reason}", "file": error.path}, status_code=422)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's (404, 405): one error shape
    async def http_error(request: Request, error: StarletteHTTPException):
        return JSONResponse({"error": error.detail}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return JSONResponse({"error": f"bad request: {problems}. Send multipart/form-data with an image "
                                      "in the field 'file' (or 'files' for /api/predict/batch)"}, status_code=422)

    # What the middleware may answer on a guarded route, documented there (and the key it asks for).
    guarded = {**(errors(401, 403) if keys is not None else {}), **(errors(429) if rate is not None else {})}
    bearer = {"security": [{"bearer": []}]} if keys is not None else None

    @app.get("/api/health", response_model=Health)
    async def health() -> dict:  # on the event loop: answers while every worker thread is busy
        return {"status": "ok", "model": identity["id"], "images_in_hand": admission.in_hand()}

    @app.get("/api/ready", response_model=Ready)
    async def ready() -> dict:  # the model is loaded before the port opens: reachable means ready
        return {"status": "ready", "model": identity["id"]}

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        content, media_type = metrics.exposition()
        return Response(content, media_type=media_type)

    @app.get("/api/model", response_model=ModelIdentity, response_model_exclude_unset=True, responses=guarded,
             openapi_extra=bearer)
    def model() -> dict:
        return identity

    @app.post("/api/predict", response_model=Prediction, response_model_exclude_unset=True,
              responses={**guarded, **errors(400, 408, 413, 422, 503)}, openapi_extra=bearer)
    async def predict(request: Request, file: UploadFile = File(...), explain: bool = False) -> dict:
        """Class probabilities for one image (PNG, JPEG, DICOM...); `explain=true` adds a Grad-CAM overlay."""
        with admitted(admission, 1):
            return await run_prediction(request, *await received(request, file), explain)

    @app.post("/api/predict/batch", response_model=BatchResults, response_model_exclude_unset=True,
              responses={**guarded, **errors(400, 408, 413, 422, 503)}, openapi_extra=bearer)
    async def predict_batch(request: Request, files: list[UploadFile] = File(...)) -> dict:
        """Several images (at most MAX_BATCH), predicted together; each gets its result or its own error."""
        most = min(MAX_BATCH, max_pending)  # a batch larger than the server ever holds could never go
        if len(files) > most:
            raise HTTPException(413, f"{len(files)} files in one batch; send at most {most}")

        async def one(upload: UploadFile) -> dict:
            data, name, digest = await received(request, upload)
            try:
                return await run_prediction(request, data, name, digest, False)
            except ImageError as error:
                return {"file": upload.filename, "sha256": digest, "error": f"cannot read the image: {error.reason}"}

        with admitted(admission, len(files)):
            return {"results": list(await asyncio.gather(*map(one, files)))}

    if keys is not None:
        app.openapi = with_bearer_scheme(app)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(GuardRequests, max_bytes=int(max_upload_mb * (1 << 20)), read_timeout=read_timeout)
    if rate is not None:
        rate = shared.rate_limit if shared is not None else RateLimit(rate)
    app.add_middleware(Operations, metrics=metrics, keys=keys, api_docs=api_docs,  # outermost: sees every answer
                       rate=rate, audit=audit_logger(audit_log), worker=os.getpid() if shared is not None else None)
    return app


def with_bearer_scheme(app: FastAPI):
    """The app's `openapi` with the API keys' scheme declared (the routes name it in `security`)."""
    make = app.openapi

    def openapi() -> dict:
        schema = make()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer", "description": "a token from `lungxray keys create`"}
        return schema

    return openapi


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, *, cache_dir: Path | None = None,
          runtime: str = "auto", keys: Path | None = None, insecure: bool = False, tls_cert: str | None = None,
          tls_key: str | None = None, max_connections: int = DEFAULT_MAX_CONNECTIONS, workers: int = 1,
          **app_options) -> None:
    """Serve until stopped; `app_options` go to `create_app`. Beyond `max_connections` open
    connections uvicorn answers 503 at once; idle keep-alive connections close after 5 s. Without
    `keys`, only a loopback address is served unless `insecure`; SIGTERM lets the requests in flight
    finish (30 s at most) before exit. `workers` > 1: that many processes on the port, sharing the
    limits (`workers.py`)."""
    import uvicorn

    if keys is None and not insecure and not is_loopback(host):
        raise ConfigError(f"serving on {host} without --keys lets anyone who reaches the port use the model: "
                          "make a key with `lungxray keys create NAME --keys FILE` and pass --keys FILE "
                          "(or pass --insecure on a network you trust)")
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1. Got {workers} instead.")
    key_store = KeyStore(keys) if keys is not None else None
    if key_store is not None and not key_store.keys:
        raise ConfigError(f"{keys} holds no keys: make one with `lungxray keys create NAME --keys {keys}`")
    if workers > 1:  # each worker loads the model itself
        from lungxray.serve.workers import serve_workers

        if not is_export(model):
            RunDir.open(model)  # a wrong folder is said here, once, not by every worker
        return serve_workers(str(model), host, port, workers, cache_dir=cache_dir, runtime=runtime, keys=keys,
                             tls_cert=tls_cert, tls_key=tls_key, max_connections=max_connections,
                             app_options=app_options)
    run = None if is_export(model) else RunDir.open(model)  # an export: no TensorFlow, no Grad-CAM
    predictor = load_predictor(run.model if run else model, cache_dir, runtime)
    app = create_app(predictor, run, keys=key_store, **app_options)
    uvicorn.run(app, host=host, port=port, log_level="warning", limit_concurrency=max_connections,
                timeout_keep_alive=5, timeout_graceful_shutdown=30, ssl_certfile=tls_cert, ssl_keyfile=tls_key)


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
