"""The API and the one-page web app around a trained model (`create_app`); `server.serve` runs it.

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
import math
import os
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

from lungxray.errors import ConfigError, ImageError
from lungxray.infer.answer import Answer, answer_row
from lungxray.infer.monitoring_record import RecordWriter, monitoring_record, observation
from lungxray.infer.outputs import answer_json, audit_fields
from lungxray.infer.predictor import Predictor
from lungxray.model.conformal import DEFAULT_COVERAGE, check_coverage
from lungxray.rundir import RunDir
from lungxray.serve.batching import Batcher
from lungxray.serve.guards import Admission, GuardRequests, admitted
from lungxray.serve.keys import KeyStore
from lungxray.serve.metrics import Metrics
from lungxray.serve.operations import EXPLAIN_COST, Operations, RateLimit, audit_logger
from lungxray.serve.schema import AN_IMAGE, BatchResults, Health, ModelDescription, Prediction, Ready, errors, images

if TYPE_CHECKING:  # imported when a monitoring window is asked for: SciPy comes with lungxray[full]
    from lungxray.monitor.live import LiveMonitor

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_MB = 20
DEFAULT_MAX_PENDING = 64  # images waiting or running
DEFAULT_READ_TIMEOUT = 10.0  # seconds an upload may stall between two chunks
DEFAULT_BODY_TIMEOUT = 60.0  # seconds an upload may take in all (20 MB at 2.7 Mbit/s)
# Off by default: on 2 CPU cores batching made no runtime faster (docs/benchmarks.md#serving).
DEFAULT_MAX_BATCH = 1  # images predicted in one call
DEFAULT_MAX_WAIT_MS = 2.0  # how long a batch waits for images still being decoded
MAX_BATCH = 64  # files in one /api/predict/batch request


def describe_model(predictor: Predictor, run: RunDir | None) -> dict:
    """What /api/model tells about the model: its identity, classes, input, calibration and gate,
    provenance (the training data's name, never a server path) and, for a run, its test metrics."""
    info, identity = predictor.info, predictor.identity
    described = {"id": identity.id, "name": identity.name, "version": identity.version, "notice": identity.notice,
                 "classes": predictor.classes, "image_size": predictor.image_size,
                 "temperature": predictor.temperature, "engine": info.get("engine"), "trained": info.get("trained"),
                 "training_data": Path(str(info.get("data", ""))).name or None,
                 "training_counts": info.get("counts"),
                 "ood_threshold": predictor.ood.threshold if predictor.ood else None, "runtime": predictor.runtime}
    if identity.fingerprint:
        described["sha256"] = identity.fingerprint
    if run is not None:
        # The evaluate package imports scikit-learn and matplotlib, which an export's server lacks.
        from lungxray.evaluate.schema import METRICS_FILE, read_metrics

        if (run.evaluation() / METRICS_FILE).is_file():
            metrics = read_metrics(run.evaluation())
            described["test_metrics"] = {k: metrics[k] for k in ("n", "accuracy", "macro_f1", "macro_auroc")}
    return described


def png_data_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Answering:
    """Uploads to answers: decoded in worker threads (at most one per core), predicted in the
    batcher's, answered by the answer's rule, explained on request, counted and audited."""

    def __init__(self, predictor: Predictor, metrics: Metrics, refuse_ood: bool, coverage: float, max_batch: int,
                 max_wait_ms: float, records: RecordWriter | None = None, live: LiveMonitor | None = None):
        cores = os.cpu_count() or 2
        self.predictor, self.metrics, self.refuse_ood, self.coverage = predictor, metrics, refuse_ood, coverage
        self.records, self.live = records, live  # where each answer's monitoring record goes
        self.decoders = anyio.CapacityLimiter(cores)
        # Even unbatched (max_batch 1), prediction runs in the batcher's threads: decoding the next
        # images then overlaps the network's call for this one (measured faster than both in one thread).
        self.batcher = Batcher(predictor.predict_images, max_batch, max_wait_ms / 1000, cores, metrics.batch.observe)
        self.explainer = None
        if predictor.can_explain:  # Grad-CAM needs gradients: a run's Keras model, not a bare export
            from lungxray.infer.explain import Explainer  # TensorFlow only when the first explanation is made

            self.explainer = Explainer(predictor)

    def decode(self, data: bytes, name: str) -> tuple[np.ndarray, dict | None]:
        """The image the model sees and, when answers are recorded, what the record says of it: made
        here, in a decoding thread, so that the event loop's share of a record is its line alone."""
        if not data:
            raise ImageError(name, "the upload is empty")
        image = self.predictor.read(data, name=name)
        recorded = self.records is not None or self.live is not None
        return image, observation(data, image, name) if recorded else None

    def shown(self, answer: Answer, image: np.ndarray, with_explanation: bool) -> dict:
        """The API's body for `answer`; with the explanation, what the model saw (decoded, cropped,
        resized: browsers cannot show DICOM) and where it looked."""
        body = {**answer_json(answer), "notice": self.predictor.identity.notice}
        if with_explanation:
            body["image"] = png_data_url(image)
            if self.explainer is not None and answer.predicted is not None:
                from lungxray.infer.explain import overlay

                body["gradcam"] = png_data_url(overlay(image, self.explainer.heatmap(image, answer.predicted)))
        return body

    async def __call__(self, request: Request, data: bytes, name: str, digest: str, with_explanation: bool) -> dict:
        state = request.scope.setdefault("state", {})  # for the audit log
        state["model"], audited = self.predictor.identity.id, state.setdefault("images", [])
        try:
            with self.batcher.expecting():
                image, observed = await anyio.to_thread.run_sync(self.decode, data, name, limiter=self.decoders)
                future = self.batcher.submit(image)
            predictions, row = await asyncio.wrap_future(future)
        except ImageError:
            audited.append({"sha256": digest, "decision": "unreadable"})
            raise
        answer = answer_row(self.predictor, predictions, row, name, digest, refuse_ood=self.refuse_ood,
                            coverage=self.coverage)
        if with_explanation:  # Grad-CAM and PNG encoding take tens of milliseconds: not on the event loop
            body = await anyio.to_thread.run_sync(self.shown, answer, image, True, limiter=self.decoders)
        else:
            body = self.shown(answer, image, False)
        self.metrics.predicted(answer.decision, bool(answer.ood))
        audited.append(audit_fields(answer))
        if observed is not None:
            record = monitoring_record(answer, observed=observed)
            if self.records is not None:
                self.records.write(record)
            if self.live is not None:
                self.live.add(record)
        return body


async def received(request: Request, upload: UploadFile) -> tuple[bytes, str, str]:
    """The upload's bytes, name and SHA-256."""
    data = await upload.read()
    if await request.is_disconnected():  # the client has gone: nobody will read the answer
        raise HTTPException(499, "client closed the request")
    return data, upload.filename or "upload", hashlib.sha256(data).hexdigest()


def create_app(predictor: Predictor, run: RunDir | None = None,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_pending: int = DEFAULT_MAX_PENDING, refuse_ood: bool = False,
               read_timeout: float = DEFAULT_READ_TIMEOUT, api_docs: bool = False, *,
               keys: KeyStore | None = None, rate: float | None = None, audit_log: str | Path | None = None,
               max_batch: int = DEFAULT_MAX_BATCH, max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
               coverage: float = DEFAULT_COVERAGE, shared=None, allowed_hosts: list[str] | None = None,
               hsts: bool = False, body_timeout: float = DEFAULT_BODY_TIMEOUT,
               records: str | Path | None = None, monitor_window: int | None = None,
               reference: str | Path | None = None) -> FastAPI:
    """The API and page; with `refuse_ood`, images the gate flags get no class (`predicted` null);
    with `keys`, the API answers only requests that carry one of their tokens, each key at most
    `rate` requests a second; `audit_log` ('-' for standard output, or a file) gets a JSON line per
    request; each answer carries its conformal set at `coverage`. Images are predicted together, up
    to `max_batch` (1: each alone), a batch waiting at most `max_wait_ms` for images still being decoded.
    `run`: the run folder the model came from, whose test metrics /api/model shows.
    `api_docs` serves the interactive docs at /docs, which load their script from a CDN (off by
    default: they break offline); /openapi.json is always served. `shared`: what the workers of
    `serve --workers N` share (`workers.Shared`), whose limits then hold for all of them.
    `allowed_hosts`: the Host names it answers to (None: any) and the origins a browser may post
    from; `hsts`: it is served over TLS (`operations.Operations`); an upload stalled `read_timeout`
    seconds, or longer than `body_timeout` in all, gets 408. `records`: a file that gets each answer's
    monitoring record (`lungxray.infer.monitoring_record`); `monitor_window`: every that many answers,
    their drift and estimates against `reference` (the run's reference.jsonl) become gauges on
    /metrics (`lungxray.monitor.live`)."""
    check_coverage(coverage)
    if max_batch < 1 or max_wait_ms < 0:
        raise ConfigError(f"--max-batch must be at least 1 and --max-wait-ms at least 0. Got {max_batch} and "
                          f"{max_wait_ms} instead.")
    app = FastAPI(title="lungxray", description=f"Chest X-ray classification. {predictor.identity.notice}",
                  version="1", docs_url="/docs" if api_docs else None, redoc_url=None)
    described = describe_model(predictor, run)
    admission = shared.admission if shared is not None else Admission(max_pending)
    metrics = Metrics(described, admission.in_hand)
    live = None
    if monitor_window:
        from lungxray.monitor.live import LiveMonitor  # SciPy: lungxray[full]
        from lungxray.monitor.records import read_jsonl

        live = LiveMonitor(read_jsonl(Path(reference)), monitor_window, metrics.registry)
    answering = Answering(predictor, metrics, refuse_ood, coverage, max_batch, max_wait_ms,
                          RecordWriter(records) if records else None, live)
    # What the middleware may answer on a guarded route, documented there (and the key it asks for).
    guarded = {**(errors(401, 403) if keys is not None else {}), **(errors(429) if rate is not None else {})}
    bearer = {"security": [{"bearer": []}]} if keys is not None else None
    if rate is not None:
        rate = shared.rate_limit if shared is not None else RateLimit(rate)
    add_error_handlers(app)
    add_status_routes(app, described, admission, metrics, guarded, bearer)
    add_prediction_routes(app, answering, admission, min(MAX_BATCH, max_pending), guarded, bearer, rate)
    if keys is not None:
        app.openapi = with_bearer_scheme(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(GuardRequests, max_bytes=int(max_upload_mb * (1 << 20)), read_timeout=read_timeout,
                       body_timeout=body_timeout)
    app.add_middleware(Operations, metrics=metrics, keys=keys, api_docs=api_docs,  # outermost: sees every answer
                       rate=rate, audit=audit_logger(audit_log), worker=os.getpid() if shared is not None else None,
                       allowed_hosts=allowed_hosts, hsts=hsts)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal the app makes is one JSON error."""

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


def add_status_routes(app: FastAPI, described: dict, admission, metrics: Metrics, guarded: dict, bearer) -> None:
    """The page, health, readiness, metrics and the model's description."""

    @app.get("/api/health", response_model=Health)
    async def health() -> dict:  # on the event loop: answers while every worker thread is busy
        return {"status": "ok", "model": described["id"], "images_in_hand": admission.in_hand()}

    @app.get("/api/ready", response_model=Ready)
    async def ready() -> dict:  # the model is loaded before the port opens: reachable means ready
        return {"status": "ready", "model": described["id"]}

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        content, media_type = metrics.exposition()
        return Response(content, media_type=media_type)

    @app.get("/api/model", response_model=ModelDescription, response_model_exclude_unset=True, responses=guarded,
             openapi_extra=bearer)
    def model() -> dict:
        return described

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")


def charge(rate, request: Request, extra: float) -> None:
    """The cost of a request beyond the token `Operations` took for it (a batch's other images, an
    explanation's Grad-CAM); 429 when the caller has not that much left."""
    if rate is None or extra <= 0:
        return
    wait = rate.retry_after(request.scope["state"]["caller"], extra, paid=1)
    if wait > 0:
        raise HTTPException(429, f"this request costs {extra + 1:g} of --rate's tokens; retry in {wait:.1f} s",
                            headers={"Retry-After": str(math.ceil(wait))})


def add_prediction_routes(app: FastAPI, answering: Answering, admission, most: int, guarded: dict, bearer,
                          rate) -> None:
    """/api/predict and /api/predict/batch (at most `most` files: a batch larger than the server
    ever holds could never go), charged by `rate` for what they cost."""

    @app.post("/api/predict", response_model=Prediction, response_model_exclude_unset=True,
              responses={**guarded, **errors(400, 408, 413, 422, 503)}, openapi_extra=bearer)
    async def predict(request: Request, file: UploadFile = File(..., json_schema_extra=AN_IMAGE),
                      explain: bool = False) -> dict:
        """Class probabilities for one image (PNG, JPEG, DICOM...); `explain=true` adds a Grad-CAM overlay."""
        charge(rate, request, EXPLAIN_COST - 1 if explain else 0)
        with admitted(admission, 1):
            return await answering(request, *await received(request, file), explain)

    @app.post("/api/predict/batch", response_model=BatchResults, response_model_exclude_unset=True,
              responses={**guarded, **errors(400, 408, 413, 422, 503)}, openapi_extra=bearer)
    async def predict_batch(request: Request, files: list[UploadFile] = File(..., json_schema_extra=images(most))) -> dict:
        """Several images (at most MAX_BATCH), predicted together; each gets its result or its own error."""
        if len(files) > most:  # the schema's maxItems: a request it forbids, like any other
            raise HTTPException(422, f"{len(files)} files in one batch; send at most {most}")
        charge(rate, request, len(files) - 1)

        async def one(upload: UploadFile) -> dict:
            data, name, digest = await received(request, upload)
            try:
                return await answering(request, data, name, digest, False)
            except ImageError as error:
                return {"file": upload.filename, "sha256": digest, "error": f"cannot read the image: {error.reason}"}

        with admitted(admission, len(files)):
            return {"results": list(await asyncio.gather(*map(one, files)))}


def with_bearer_scheme(app: FastAPI):
    """The app's `openapi` with the API keys' scheme declared (the routes name it in `security`)."""
    make = app.openapi

    def openapi() -> dict:
        schema = make()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer", "description": "a token from `lungxray keys create`"}
        return schema

    return openapi
