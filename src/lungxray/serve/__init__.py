"""`lungxray serve`: a REST API and a one-page web app around a trained model.

The model is loaded once (safe mode); inference runs in worker threads, at most one per CPU core,
and requests beyond a bounded queue get 503 instead of waiting forever. Uploads are capped in size
(413), sniffed by content rather than trusted by extension, and every bad request gets one JSON
error, never a 500.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import threading
from pathlib import Path

import anyio
import numpy as np
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image

from lungxray.errors import ImageError
from lungxray.evaluate.schema import METRICS_FILE, read_metrics
from lungxray.predict import OOD_NOTE, Predictor
from lungxray.rundir import RunDir

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_MB = 20
DEFAULT_MAX_PENDING = 64
NOTICE = "Research use only: not a medical device, not a diagnosis."


class LimitUploadSize:
    """ASGI middleware: refuse bodies over `max_bytes` with 413, whether or not Content-Length is sent."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _too_large(send, self.max_bytes)
        received, too_large, answered = 0, False, False

        async def counting_receive():
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                too_large = True
                return {"type": "http.disconnect"}  # the app stops reading; its answer is replaced below
            return message

        async def guarded_send(message):
            nonlocal answered
            if too_large:
                if not answered:
                    answered = True
                    await _too_large(send, self.max_bytes)
                return
            answered = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not answered:
            await _too_large(send, self.max_bytes)


async def _too_large(send, max_bytes: int) -> None:
    body = json.dumps({"error": f"upload larger than the {max_bytes // (1 << 20)} MB limit"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def model_identity(predictor: Predictor, run: RunDir | None) -> dict:
    info = predictor.info
    identity = {"classes": predictor.classes, "image_size": predictor.image_size,
                "temperature": predictor.temperature, "engine": info.get("engine"), "trained": info.get("trained"),
                "training_data": info.get("data"), "training_counts": info.get("counts"),
                "ood_threshold": predictor.ood.threshold if predictor.ood else None}
    if run is not None:
        identity["sha256"] = hashlib.sha256(run.model.read_bytes()).hexdigest()
        if (run.evaluation() / METRICS_FILE).is_file():
            metrics = read_metrics(run.evaluation())
            identity["test_metrics"] = {k: metrics[k] for k in ("n", "accuracy", "macro_f1", "macro_auroc")}
    identity["id"] = identity.get("sha256", "unsaved")[:12]
    return identity


def png_data_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def create_app(predictor: Predictor, run: RunDir | None = None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               max_pending: int = DEFAULT_MAX_PENDING, refuse_ood: bool = False) -> FastAPI:
    """The API and page; with `refuse_ood`, images the gate flags get no class (`predicted` null)."""
    app = FastAPI(title="lungxray", description=f"Chest X-ray classification. {NOTICE}", version="1")
    identity = model_identity(predictor, run)
    limiter = anyio.CapacityLimiter(os.cpu_count() or 2)
    pending = {"n": 0}
    pending_lock = threading.Lock()
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
        if with_explanation:
            # What the model saw (decoded, cropped, resized: browsers cannot show DICOM), and where it looked.
            answer["image"] = png_data_url(image)
            answer["gradcam"] = explain(image, predicted)
        return answer

    async def run_prediction(upload: UploadFile, with_explanation: bool) -> dict:
        with pending_lock:
            if pending["n"] >= max_pending:
                raise HTTPException(503, "server busy: too many requests waiting; retry shortly")
            pending["n"] += 1
        try:
            data = await upload.read()
            return await anyio.to_thread.run_sync(predict_bytes, data, upload.filename or "upload", with_explanation,
                                                  limiter=limiter)
        finally:
            with pending_lock:
                pending["n"] -= 1

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
    def health() -> dict:
        return {"status": "ok", "model": identity["id"]}

    @app.get("/api/model")
    def model() -> dict:
        return identity

    @app.post("/api/predict")
    async def predict(file: UploadFile = File(...), explain: bool = False) -> dict:
        """Class probabilities for one image (PNG, JPEG, DICOM...); `explain=true` adds a Grad-CAM overlay."""
        return await run_prediction(file, explain)

    @app.post("/api/predict/batch")
    async def predict_batch(files: list[UploadFile] = File(...)) -> dict:
        """Several images; each gets its result or its own error."""
        results = []
        for upload in files:
            try:
                results.append(await run_prediction(upload, False))
            except ImageError as error:
                results.append({"file": upload.filename, "error": f"cannot read the image: {error.reason}"})
        return {"results": results}

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(LimitUploadSize, max_bytes=int(max_upload_mb * (1 << 20)))
    return app


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
          cache_dir: Path | None = None, refuse_ood: bool = False) -> None:
    import uvicorn

    run = RunDir.open(model)
    app = create_app(Predictor.load(run.model, cache_dir=cache_dir), run, max_upload_mb, refuse_ood=refuse_ood)
    uvicorn.run(app, host=host, port=port, log_level="warning")
