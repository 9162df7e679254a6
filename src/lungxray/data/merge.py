"""Several imported manifests made one, split so that nothing of one patient or one film is in two
splits, with the table a reviewer reads first: which classes come from which sources.

The group of an image is its source and patient (a patient never crosses splits); near-duplicate
films join groups across collections (RSNA, the Radiography Database and NIH re-distribute the
same films: a film in train and its copy in test would be a leak). Then `leakage_free_split`.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
from pathlib import Path

from lungxray.data.records import Dataset, Record, load_dataset, write_manifest
from lungxray.data.split import leakage_free_split
from lungxray.errors import ConfigError, DataError
from lungxray.io import atomic_path

GROUP_COLUMN = "patient_group"


@dataclasses.dataclass
class MergeResult:
    dataset: Dataset
    table: dict[str, dict[str, int]]  # source -> class -> images
    shared_films: int  # near-duplicate groups holding films of two or more sources
    warnings: list[str]


def merge_manifests(paths: list[str | Path], ratios=(0.7, 0.2, 0.1), seed: int = 21) -> MergeResult:
    records: list[Record] = []
    for path in paths:
        part = load_dataset(path)
        if part.layout != "csv" or not all(r.extra.get("source") for r in part.records):
            raise DataError(f"{path}: every row needs a source; give manifests written by `lungxray data import`")
        records += part.records
    records = [dataclasses.replace(r, extra={**r.extra, GROUP_COLUMN: f"{r.extra['source']}:"
                                                                   f"{r.extra.get('patient_id') or f'image-{i}'}"})
               for i, r in enumerate(records)]
    classes = sorted({r.label for r in records})
    merged = Dataset(records, classes, origin=" + ".join(map(str, paths)), layout="csv")
    merged = leakage_free_split(merged, ratios, seed, group_by=GROUP_COLUMN)
    table: dict[str, dict[str, int]] = {}
    for record in merged.records:
        row = table.setdefault(record.extra["source"], dict.fromkeys(classes, 0))
        row[record.label] += 1
    sources_of_group = collections.defaultdict(set)
    for record in merged.records:
        sources_of_group[record.extra["group"]].add(record.extra["source"])
    shared = sum(len(s) > 1 for s in sources_of_group.values())
    return MergeResult(merged, table, shared, shortcut_warnings(merged))


def shortcut_warnings(dataset: Dataset) -> list[str]:
    """A class all of whose images come from one source, or (where ages are known) one age group: a
    model can learn the hospital or the age instead of the disease."""
    warnings = []
    for label in dataset.classes:
        members = [r for r in dataset.records if r.label == label]
        sources = {r.extra.get("source") for r in members}
        if len(sources) == 1:
            warnings.append(f"every {label} image comes from one source ({sources.pop()}): a model can learn the "
                            "source instead of the disease; test with --holdout-source")
        ages = {r.extra.get("age_group") for r in members} - {"", "unknown", None}
        if len(ages) == 1:
            warnings.append(f"every {label} image of known age is {ages.pop()}: a model can learn the age "
                            "instead of the disease")
    return warnings


def check_manifest_name(out: Path) -> None:
    """Before any work: the merged manifest is a .csv file."""
    if out.suffix.lower() != ".csv":
        raise ConfigError(f"--out {out}: give a .csv file name for the merged manifest")


def write_merge(result: MergeResult, out: Path) -> Path:
    """The manifest at `out` (a .csv) and the class x source table beside it (`<out>.sources.csv`)."""
    check_manifest_name(out)
    write_manifest(result.dataset, out)
    table_path = out.with_name(out.name + ".sources.csv")
    with atomic_path(table_path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", *result.dataset.classes])
        writer.writerows([source, *row.values()] for source, row in sorted(result.table.items()))
    return table_path
