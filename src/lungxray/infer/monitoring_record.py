"""The monitoring record: what monitoring reads of each answer, one JSON line per film, written by
`serve --records`, `dicom listen|watch --records` and `predict --out`.

A record holds what drift and performance monitoring need and nothing that identifies a patient:
the time, the image's SHA-256, the model's identity, the decision, the calibrated probabilities
(kept when the class is withheld), the conformal set's size, the out-of-distribution score and flag,
a few statistics of the image the model saw, and, for DICOM films, coarse acquisition attributes
(modality, view, manufacturer and model, photometric interpretation, bits stored, pixel spacing,
age band, sex) and the SOP Instance UID hashed as the audit log hashes it (to join radiologists'
reads). Never a name, patient ID, birth date or file name (docs/monitoring.md lists every field).

    with RecordWriter("records.jsonl") as records:
        records.write(monitoring_record(answer, image, header))
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path

import numpy as np

from lungxray.data.images import is_dicom, read_bytes, read_dicom
from lungxray.infer.answer import NOT_ANALYSED, Answer, answers_for
from lungxray.io import atomic_path
from lungxray.model.conformal import DEFAULT_COVERAGE
from lungxray.parallel import bounded_map

log = logging.getLogger(__name__)

RECORD_VERSION = 1
RECORDS_FILE = "records.jsonl"  # what `predict --out DIR` writes in DIR
DEFAULT_MAX_MB, DEFAULT_KEEP = 100.0, 10  # a records file is rotated past this size; this many old ones kept
STRIDE = 4  # image statistics read every 4th pixel each way: ~3,000 of a 224 x 224 image
LEVELS = np.arange(256)  # the grey levels of a uint8 image
AGE_BANDS = ((18, "0-17"), (40, "18-39"), (60, "40-59"), (80, "60-79"), (float("inf"), "80+"))
AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}  # DICOM Age String units, in years


def hashed_uid(uid: str) -> str:
    """A UID as records and logs carry it (the DICOM node's audit log too): hashed, so that neither
    reveals a study."""
    return hashlib.sha256(uid.encode()).hexdigest()[:16]


def image_statistics(image: np.ndarray) -> dict[str, float]:
    """What a scanner, a protocol or post-processing changes in the picture the model saw (uint8):
    its grey level's mean, spread and percentiles, the share of nearly black and nearly white
    pixels, and how far from grey it is (a photograph, a coloured overlay). From every STRIDE-th
    pixel each way, through a histogram of the grey levels: a record must cost a service little."""
    pixels = image[::STRIDE, ::STRIDE]
    if pixels.ndim == 3:
        planes = [pixels[..., c].tobytes() for c in range(pixels.shape[-1])]  # compared as bytes: 3x faster
        if planes.count(planes[0]) == len(planes):
            pixels = pixels[..., 0]  # a grey film in colour channels, the usual case: 0 from grey, in half the time
    if pixels.ndim == 2:
        grey, colour = pixels.ravel(), 0.0
    else:
        channels = [pixels[..., c].astype(np.int16) for c in range(pixels.shape[-1])]
        # Channel by channel: numpy's reduction over a last axis of 3 is slow.
        grey = (sum(channels) // len(channels)).ravel()
        colour = float(sum(np.abs(channel.ravel() - grey).mean() for channel in channels) / len(channels))
    counts = np.bincount(grey, minlength=256)[:256] / grey.size
    mean = float(counts @ LEVELS)
    cumulative = np.cumsum(counts)
    p05, p50, p95 = np.searchsorted(cumulative, [0.05, 0.5, 0.95])
    return {"image_mean": round(mean, 3), "image_std": round(float(np.sqrt(counts @ (LEVELS - mean) ** 2)), 3),
            "image_p05": float(p05), "image_p50": float(p50), "image_p95": float(p95),
            "image_dark": round(float(cumulative[5]), 5), "image_bright": round(float(1 - cumulative[249]), 5),
            "image_colour": round(colour, 3)}


def age_band(age: str) -> str | None:
    """A DICOM Age String ("045Y", "006M") as a band of years, or None."""
    match = re.fullmatch(r"(\d{3})([DWMY])", str(age or "").strip())
    if not match:
        return None
    years = int(match.group(1)) * AGE_UNITS[match.group(2)]
    return next(band for limit, band in AGE_BANDS if years < limit)


def acquisition(header) -> dict:
    """Coarse acquisition attributes of a DICOM film's header, None where absent."""
    def text(keyword: str) -> str | None:
        value = header.get(keyword)
        return str(value).strip() or None if value is not None else None

    spacing = header.get("PixelSpacing") or header.get("ImagerPixelSpacing")
    bits = header.get("BitsStored")
    return {"modality": text("Modality"), "view_position": text("ViewPosition"), "manufacturer": text("Manufacturer"),
            "manufacturer_model": text("ManufacturerModelName"), "photometric": text("PhotometricInterpretation"),
            "bits_stored": int(bits) if bits is not None else None,
            "pixel_spacing_mm": round(float(spacing[0]), 4) if spacing else None,
            "age_band": age_band(header.get("PatientAge", "")), "sex": text("PatientSex"),
            "sop_instance_uid": hashed_uid(str(header.SOPInstanceUID)) if "SOPInstanceUID" in header else None}


def observation(data: bytes, image: np.ndarray, name: str) -> dict:
    """What a record says of a file beside its answer: the statistics of `image` (what the model saw
    of the file's bytes `data`) and, for DICOM, the header's acquisition attributes."""
    seen = image_statistics(image)
    if is_dicom(data):
        seen.update(acquisition(read_dicom(data, name)))
    return seen


def monitoring_record(answer: Answer, image: np.ndarray | None = None, header=None,
                      observed: dict | None = None) -> dict:
    """The record of `answer`; `image`: what the model saw (uint8), `header`: a DICOM film's data set;
    or, instead of both, what `observation` made of them."""
    record = {"version": RECORD_VERSION, "time": answer.time, "sha256": answer.sha256, "model": answer.model,
              "decision": answer.decision, "predicted": answer.predicted,
              **{f"p_{name}": round(float(p), 6) for name, p in (answer.probabilities or {}).items()},
              "set_size": len(answer.set) if answer.set is not None else None, "coverage": answer.coverage,
              "ood_score": None if answer.ood_score is None else round(float(answer.ood_score), 6),
              "ood": None if answer.ood is None else bool(answer.ood)}
    if image is not None:
        record.update(image_statistics(image))
    if header is not None:
        record.update(acquisition(header))
    return {**record, **(observed or {})}


def reference_records(predictor, files: list, coverage: float = DEFAULT_COVERAGE) -> list[dict]:
    """The records of `files` as a deployment would write them (no class withheld: the records keep
    the probabilities either way), each image decoded again for its statistics: a run's reference,
    made from its validation split, that monitoring compares a deployment with."""
    predictions = predictor.predict_files(list(files), desc=None)
    answers = answers_for(predictor, predictions, files, coverage=coverage)

    def one(pair: tuple[Answer, str]) -> dict:
        answer, file = pair
        if answer.decision == NOT_ANALYSED:  # unreadable: nothing more to see
            return monitoring_record(answer)
        data = read_bytes(file, file)
        return monitoring_record(answer, observed=observation(data, predictor.read(data, file), file))

    return list(bounded_map(one, list(zip(answers, map(str, files)))))


def record_line(record: dict) -> str:
    """A record as one line of a records file."""
    return json.dumps(record, separators=(",", ":")) + "\n"


def write_records(path: str | Path, records: list[dict]) -> Path:
    """`records` as one JSON-lines file, written whole or not at all."""
    with atomic_path(Path(path)) as temporary:
        temporary.write_text("".join(map(record_line, records)))
    return Path(path)


class RecordWriter:
    """Appends records to `path` as JSON lines (the file created private, 0600), moving it to
    `path.1` (and older ones along, `keep` in all) once it passes `max_mb`. Several processes may
    write one file (`serve --workers N`): each line is written under an flock of a lock file beside
    it (`.NAME.lock`, never rotated: a lock on the records file itself would move with it), and a
    writer whose file another has rotated reopens the new one. A record that cannot be written is
    logged and dropped: monitoring must not stop an answer."""

    def __init__(self, path: str | Path, max_mb: float = DEFAULT_MAX_MB, keep: int = DEFAULT_KEEP):
        self.path, self.max_bytes, self.keep = Path(path), int(max_mb * 2**20), keep
        self._lock = threading.Lock()
        self._lock_file = os.open(self.path.with_name(f".{self.path.name}.lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        self._descriptor = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write(self, record: dict) -> None:
        line = record_line(record).encode()
        with self._lock:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX)
                try:
                    self._follow_rotation()
                    os.write(self._descriptor, line)  # unbuffered: a line is in the file once written
                finally:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            except OSError as error:
                log.warning("a monitoring record could not be written to %s (%s)", self.path, error.strerror or error)

    def _follow_rotation(self) -> None:
        """Under the lock: reopen if another writer rotated the file; rotate if it is full."""
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = None
        opened = os.fstat(self._descriptor)
        if current != opened.st_ino:
            self._reopen()
            opened = os.fstat(self._descriptor)
        if opened.st_size >= self.max_bytes:
            for index in range(self.keep - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
            self._reopen()

    def _reopen(self) -> None:
        os.close(self._descriptor)
        self._descriptor = self._open()

    def close(self) -> None:
        with self._lock:
            if self._descriptor >= 0:
                os.close(self._descriptor)
                os.close(self._lock_file)
                self._descriptor = self._lock_file = -1  # a record written after this is logged and dropped

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
