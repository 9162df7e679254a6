"""The API's contract: what each route answers, as pydantic models, so that /openapi.json documents
every status code a route can give and the body that comes with it (the contract test fuzzes the
server against it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Error(BaseModel):
    error: str
    file: str | None = None  # the upload's name, for an unreadable image


class Ood(BaseModel):
    flag: bool
    score: float
    threshold: float


class Prediction(BaseModel):
    """An answer (`lungxray.infer.outputs.answer_json`) with the model's notice."""

    file: str
    sha256: str  # of the upload as received, as the audit log keeps it
    decision: str  # the class, or "withheld"
    predicted: str | None  # null when the out-of-distribution gate withholds the class (--refuse-ood)
    probabilities: dict[str, float] | None
    model: str  # the model's identity id
    time: str  # when it answered (ISO 8601, UTC)
    notice: str
    set: list[str] | None = None  # the conformal set, most probable first (absent for models trained before sets)
    set_says: str | None = None  # "pneumonia", "pneumonia or covid", "cannot tell" (all), "none fits" (empty)
    coverage: float | None = None  # the set's promise: the true class is in it this often, per class
    ood: Ood | None = None
    withheld: str | None = None
    image: str | None = None  # with explain=true: what the model saw, as a PNG data URL
    gradcam: str | None = None  # with explain=true, for a model with gradients: the Grad-CAM overlay


class Unreadable(BaseModel):
    file: str | None
    sha256: str
    error: str


class BatchResults(BaseModel):
    results: list[Prediction | Unreadable]


class Health(BaseModel):
    status: str
    model: str
    images_in_hand: int


class Ready(BaseModel):
    status: str
    model: str


class ModelDescription(BaseModel):
    model_config = ConfigDict(protected_namespaces=())  # fields may start with "model"

    id: str
    name: str
    version: str
    notice: str
    classes: list[str]
    image_size: int
    temperature: float
    runtime: str
    engine: str | None = None
    trained: str | None = None
    training_data: str | None = None
    training_counts: dict | None = None
    ood_threshold: float | None = None
    sha256: str | None = None
    test_metrics: dict | None = None


# What a schema can say of an upload: it is not empty, and a batch holds one image or more, no more than
# the server may hold at once. Whether the bytes decode to an X-ray it cannot say: that is the 422.
AN_IMAGE = {"minLength": 1}


def images(most: int) -> dict:
    """The schema of a batch's `files` field, where `most` is the largest batch the server takes."""
    return {"minItems": 1, "maxItems": most}


def errors(*codes: int) -> dict:
    """The `responses` of a route: each code with the JSON error body every refusal carries."""
    reasons = {400: "the body is not valid multipart/form-data", 401: "no API key, or an unknown one (with --keys)", 403: "a revoked API key",
               408: "the upload stalled", 413: "the upload or the batch is too large",
               422: "the request is not as this schema says, or an upload is not a readable image", 429: "over the key's rate limit (--rate)",
               503: "the server holds as many images as it may; retry shortly"}
    return {code: {"model": Error, "description": reasons[code]} for code in codes}
