"""What every importer shares: the entry a collection's label files describe, the manifest it becomes,
and the summary of what was kept, dropped and missing.

An importer reads only a collection's own label files (and, where a collection keeps labels or views
in DICOM headers, those headers): never pixels. Each yields one `Entry` per image, with the class the
collection's documented mapping gives it, or the reason it is left out.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import os
from pathlib import Path
from typing import Iterable, Iterator

from lungxray.errors import DataError
from lungxray.io import atomic_path, write_json

CLASSES = ("covid", "normal", "pneumonia")
UNCERTAIN_POLICIES = ("drop", "negative", "positive")
FRONTAL_VIEWS = ("PA", "AP")
# Columns of an imported manifest, in order; a collection's native labels follow as native_* columns.
COLUMNS = ("file", "label", "source", "site", "patient_id", "study_id", "age", "age_group", "sex", "view")


@dataclasses.dataclass
class Entry:
    """One image as its collection describes it. `file` is relative to the collection's root; `label`
    is None where `dropped` says why the image is left out."""

    file: str
    label: str | None = None
    dropped: str | None = None
    patient_id: str = ""
    study_id: str = ""
    age: str = ""
    sex: str = ""
    view: str = ""
    site: str = ""
    age_group: str = ""  # where a collection states the group but not the age (Kermany: children)
    native: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ImportSummary:
    kind: str
    manifest: Path
    kept: dict[str, int]  # per class
    dropped: dict[str, int]  # per reason
    missing: list[str]  # files the label files name and the root lacks

    def lines(self) -> list[str]:
        out = [f"{self.kind}: {sum(self.kept.values())} images kept (" +
               ", ".join(f"{c} {n}" for c, n in self.kept.items()) + ")"]
        out += [f"  dropped {n}: {reason}" for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1])]
        if self.missing:
            shown = ", ".join(self.missing[:3]) + (" ..." if len(self.missing) > 3 else "")
            out.append(f"  missing {len(self.missing)} file(s) named by the label files: {shown}")
        return out


def age_group(age: str) -> str:
    """pediatric (< 18 years), adult or unknown, as in ../shared/cxr's manifest."""
    try:
        years = float(age)
    except ValueError:
        return "unknown"
    return "unknown" if years < 0 or years > 120 else "pediatric" if years < 18 else "adult"


def check_uncertain(policy: str) -> str:
    if policy not in UNCERTAIN_POLICIES:
        raise DataError(f"--uncertain {policy!r} is not one of {', '.join(UNCERTAIN_POLICIES)}")
    return policy


def find_file(root: Path, *candidates: str) -> Path:
    """The first of `candidates` (names relative to `root`, plain or gzipped) that exists."""
    for name in candidates:
        for path in (root / name, root / f"{name}.gz"):
            if path.is_file():
                return path
    raise DataError(f"{root} lacks the label file {candidates[0]}: give the folder the collection unpacks to")


def read_rows(path: Path, required: Iterable[str] = (), delimiter: str = ",") -> Iterator[dict[str, str]]:
    """Rows of a CSV (or, with `delimiter="\\t"`, TSV) label file, plain or gzipped, as dictionaries.
    A file that is not CSV, or whose header lacks a `required` column, is named."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path} lacks the column(s) {missing}: is it the collection's own label file?")
            yield from reader
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path} is not a readable CSV label file ({error})") from None


def dicom_facts(path: Path) -> dict[str, str] | None:
    """Age (years), sex and view from a DICOM file's header, read without its pixels; None where the
    header cannot be read."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True,
                                  specific_tags=["PatientAge", "PatientSex", "ViewPosition"])
    except Exception:  # pydicom raises many types for a damaged header
        return None
    return {"age": dicom_age_years(str(dataset.get("PatientAge", ""))), "sex": str(dataset.get("PatientSex", "")),
            "view": str(dataset.get("ViewPosition", ""))}


def dicom_header(path: Path) -> tuple[dict[str, str], str | None]:
    """A film's header facts and None, or no facts and the reason it is dropped. A missing file gives
    neither: `write_import` reports it as missing."""
    if not path.is_file():
        return {}, None
    facts = dicom_facts(path)
    return ({}, "DICOM header unreadable") if facts is None else (facts, None)


def dicom_age_years(age: str) -> str:
    """Whole years from a DICOM age string (065Y, 006M, 010D; RSNA writes plain 43), '' if none."""
    age = age.strip()
    number, unit = (age[:-1], age[-1]) if age[-1:] in ("Y", "M", "W", "D") else (age, "Y")
    if not number.isdigit():
        return ""
    return str(int(number)) if unit == "Y" else "0"


def files_under(root: Path) -> set[str]:
    """Every file under `root`, as a path relative to it with '/' separators (one walk, for 200,000 rows)."""
    found = set()
    prefix = len(str(root)) + 1
    for directory, _, names in os.walk(root):
        base = directory[prefix:].replace(os.sep, "/")
        found.update(f"{base}/{n}" if base else n for n in names)
    return found


def write_import(kind: str, entries: Iterable[Entry], root: Path, out: Path, source: str,
                 views: tuple[str, ...] | None) -> ImportSummary:
    """The manifest of the kept entries (files relative to the manifest's folder), written atomically,
    and its summary (also saved beside it as `<manifest>.summary.json`)."""
    root, out = root.resolve(), out.resolve()
    present = files_under(root)
    prefix = Path(os.path.relpath(root, out.parent))
    kept: collections.Counter = collections.Counter()
    dropped: collections.Counter = collections.Counter()
    missing: list[str] = []
    rows, native_columns = [], {}
    for entry in entries:
        if entry.dropped is None and entry.file not in present:
            missing.append(entry.file)
            continue
        # A collection that records no view (the Radiography Database) is kept: the filter cannot apply.
        if entry.dropped is None and views is not None and entry.view and entry.view not in views:
            entry.dropped = f"view {entry.view or 'unknown'} not among --views {','.join(views)}"
        if entry.dropped is not None:
            dropped[entry.dropped] += 1
            continue
        kept[entry.label] += 1
        native_columns.update(dict.fromkeys(entry.native))
        rows.append(entry)
    if not rows:
        raise DataError(f"{root}: no image of {kind} was kept ({sum(dropped.values())} dropped, {len(missing)} "
                        "missing); is ROOT the folder the collection unpacks to?")
    columns = [*COLUMNS, *(f"native_{c}" for c in native_columns)]
    with atomic_path(out) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for e in rows:
            writer.writerow([(prefix / e.file).as_posix(), e.label, source, e.site, e.patient_id, e.study_id, e.age,
                             e.age_group or age_group(e.age), e.sex, e.view, *(e.native.get(c, "") for c in native_columns)])
    summary = ImportSummary(kind, out, {c: kept[c] for c in CLASSES}, dict(dropped), missing)
    write_json(out.with_name(out.name + ".summary.json"), {**dataclasses.asdict(summary), "manifest": str(out)})
    return summary
