"""Reading what monitoring compares: monitoring records (a records file, its rotated siblings, or a
folder `predict --out` wrote), a run's reference, and radiologists' reads.

    records = stream_records(["records.jsonl", "scored/"])   # oldest first, read as needed
    reference = read_reference("runs/mine")
    labels = read_labels("reads.csv")   # label, and sha256 or sop_instance_uid
"""

from __future__ import annotations

import csv
import heapq
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from lungxray.errors import ConfigError, DataError
from lungxray.infer.lite_predictor import is_export
from lungxray.infer.monitoring_record import hashed_uid
from lungxray.rundir import RunDir


def record_files(item: str | Path) -> list[Path]:
    """The records files `item` names: a file and its rotated siblings (FILE.1, FILE.2 ...), or a
    folder's records.jsonl* and records/part-*.jsonl."""
    path = Path(item)
    if path.is_dir():
        found = sorted(path.glob("records.jsonl*")) + sorted((path / "records").glob("part-*.jsonl"))
        if not found:
            raise DataError(f"{path} holds no monitoring records (records.jsonl, or records/part-*.jsonl from "
                            "predict --out)")
        return found
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    return [path, *sorted(path.parent.glob(f"{path.name}.[0-9]*"))]


def jsonl_lines(path: Path) -> Iterator[dict]:
    """A records file's records, one at a time."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                if handle.read(1):  # only a last line cut short by a crash is forgiven
                    raise DataError(f"{path}, line {number}: not a JSON record") from None


def read_jsonl(path: Path) -> list[dict]:
    return list(jsonl_lines(path))


def stream_records(items: list[str | Path]) -> Iterator[dict]:
    """Every record the items name, oldest first, read as they are needed (a million records need not
    fit in memory): each file is written in time order, so their merge is. A file named twice is read once."""
    files = list(dict.fromkeys(f.resolve() for item in items for f in record_files(item)))
    return heapq.merge(*(jsonl_lines(path) for path in files), key=lambda record: record.get("time", ""))


def read_reference(run: str | Path) -> list[dict]:
    """The run's reference: its validation split's records."""
    path = RunDir.open(run).path(RunDir.REFERENCE)
    if not path.is_file():
        raise DataError(f"{run} has no monitoring reference ({RunDir.REFERENCE}): it was trained before runs "
                        "saved one; train it again")
    return read_jsonl(path)


def reference_of(model: str | Path) -> Path:
    """The monitoring reference of the run `model` is, or was exported from (RUN/export/model.*), for
    a service's `--monitor-window`."""
    run = Path(model) if not is_export(model) else Path(model).resolve().parent.parent
    reference = run / RunDir.REFERENCE
    if not reference.is_file():
        raise ConfigError(f"--monitor-window compares answers with the run's monitoring reference, and there is no "
                          f"{reference}: serve a run folder trained by this version (or its export, in RUN/export/)")
    return reference


def read_labels(path: str | Path) -> dict[str, str]:
    """Radiologists' reads: a CSV with `label` and `sha256` or `sop_instance_uid` (the UID as DICOM
    has it; it is hashed here as records hash it). Key -> label."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "label" not in columns or not {"sha256", "sop_instance_uid"} & set(columns):
            raise DataError(f"{path} needs a 'label' column and a 'sha256' or 'sop_instance_uid' column "
                            f"(columns: {columns})")
        labels = {}
        for row in reader:
            if row.get("sha256"):
                labels[row["sha256"].strip().lower()] = row["label"].strip()
            if row.get("sop_instance_uid"):
                labels[hashed_uid(row["sop_instance_uid"].strip())] = row["label"].strip()
    return labels


def classes_of(records: list[dict]) -> list[str]:
    """The class names the records' probabilities name, in their order."""
    for record in records:
        names = [key[2:] for key in record if key.startswith("p_")]
        if names:
            return names
    raise DataError("no record holds probabilities: nothing was analysed")


def probabilities(records: list[dict], classes: list[str]) -> np.ndarray:
    """An (n, classes) array; NaN rows for films not analysed."""
    values = [[record.get(f"p_{c}") for c in classes] for record in records]
    return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float).reshape(
        len(records), len(classes))
