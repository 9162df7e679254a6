"""Records: every data layout becomes a list of `Record`s; nothing downstream knows the layout.

Three layouts are accepted:
- the reference layout, `DIR/{train,val,test}/{class}/*`;
- a folder of class folders, `DIR/{class}/*` (a stratified, seeded split is made);
- a manifest CSV with `file,label[,split]` columns, paths relative to the CSV; other columns
  (source, patient, age group...) are kept in `Record.extra`.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
from pathlib import Path

import numpy as np

from lungxray.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}


@dataclasses.dataclass(frozen=True)
class Record:
    path: Path  # absolute path of the image file
    label: str
    split: str | None = None
    file: str = ""  # the path as the data gave it (relative to the data root or CSV)
    extra: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)


@dataclasses.dataclass
class Dataset:
    """Records with their class names (sorted, as Keras' flow_from_directory did), where they were
    read from (`origin`: a folder or CSV path; a record's `extra["source"]` is the hospital) and in
    which layout."""

    records: list[Record]
    classes: list[str]
    origin: str
    layout: str

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

    def labels(self, records: list[Record] | None = None) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[r.label] for r in (self.records if records is None else records)], dtype=np.int64)

    def counts(self) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = {}
        for record in self.records:
            row = table.setdefault(record.split or "all", {c: 0 for c in self.classes})
            row[record.label] += 1
        return table


def load_dataset(location: str | Path, classes: list[str] | None = None) -> Dataset:
    """Read any supported layout. `classes` (e.g. a trained model's) fixes the class list."""
    path = Path(location)
    if not path.exists():
        raise DataError(f"data path {path} does not exist; give a folder of images or a manifest CSV")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"data file {path} is not a .csv manifest; give a folder or a CSV")
        records, layout = _records_from_csv(path), "csv"
    elif all((path / s).is_dir() for s in SPLITS):
        records, layout = _records_from_split_folders(path), "splits"
    else:
        records, layout = _records_from_class_folders(path, split=None), "classes"
    if not records:
        raise DataError(f"no images found under {path}")
    found = sorted({r.label for r in records})
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{path}: labels {unknown} are not among the classes {classes}")
    return Dataset(records=records, classes=list(classes), origin=str(path), layout=layout)


def _image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, absolute, sorted (os.walk: ten times faster than rglob + resolve)."""
    found = []
    for directory, _, names in os.walk(folder.resolve()):
        found += [Path(directory, n) for n in names
                  if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES]
    return sorted(found)


def _records_from_class_folders(root: Path, split: str | None, data_root: Path | None = None) -> list[Record]:
    data_root = data_root or root
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root} has no class folders; expected {root}/<class>/<image files>")
    records = []
    for class_dir in class_dirs:
        files = _image_files(class_dir)
        if not files:
            raise DataError(f"class folder {class_dir} holds no images; remove it or add images")
        root_prefix = len(str(data_root.resolve())) + 1
        records += [Record(path=f, label=class_dir.name, split=split, file=str(f)[root_prefix:].replace(os.sep, "/"))
                    for f in files]
    return records


def _records_from_split_folders(root: Path) -> list[Record]:
    records = []
    per_split = {s: _records_from_class_folders(root / s, split=s, data_root=root) for s in SPLITS}
    train_classes = {r.label for r in per_split["train"]}
    for split, rows in per_split.items():
        extra = sorted({r.label for r in rows} - train_classes)
        if extra:
            raise DataError(f"{root / split} has classes {extra} that {root / 'train'} lacks")
        records += rows
    return records


def _records_from_csv(csv_path: Path) -> list[Record]:
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in ("file", "label") if c not in columns]
        if missing:
            raise DataError(f"{csv_path} lacks the column(s) {missing}; it needs file,label[,split]")
        rows = list(reader)
    records = []
    for line, row in enumerate(rows, start=2):
        file, label = (row.get("file") or "").strip(), (row.get("label") or "").strip()
        split = (row.get("split") or "").strip() or None
        if not file or not label:
            raise DataError(f"{csv_path}, line {line}: empty file or label")
        if split is not None and split not in SPLITS:
            raise DataError(f"{csv_path}, line {line}: split '{split}' is not one of {SPLITS}")
        extra = {k: v for k, v in row.items() if k not in ("file", "label", "split") and k is not None}
        records.append(Record(path=(csv_path.parent / file).resolve(), label=label, split=split,
                              file=file, extra=extra))
    return records


def check_ratios(ratios) -> tuple[float, float, float]:
    ratios = tuple(float(r) for r in ratios)
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ConfigError(f"split ratios {ratios} must be three non-negative numbers summing to 1, e.g. 0.7,0.2,0.1")
    return ratios


def assign_splits(dataset: Dataset, ratios=(0.7, 0.2, 0.1), seed: int = 21) -> Dataset:
    """Give records without a split a stratified, seeded train/val/test split."""
    if all(r.split for r in dataset.records):
        return dataset
    ratios = check_ratios(ratios)
    from sklearn.model_selection import train_test_split

    records = [r for r in dataset.records]
    labels = [r.label for r in records]
    train_share, val_share, test_share = ratios
    indices = np.arange(len(records))
    rest_share = val_share + test_share
    if rest_share == 0:
        assignment = {i: "train" for i in indices}
    else:
        train_idx, rest_idx = train_test_split(indices, test_size=rest_share, stratify=labels, random_state=seed)
        rest_labels = [labels[i] for i in rest_idx]
        if test_share == 0:
            val_idx, test_idx = rest_idx, np.array([], dtype=int)
        else:
            val_idx, test_idx = train_test_split(rest_idx, test_size=test_share / rest_share,
                                                 stratify=rest_labels, random_state=seed)
        assignment = {**{i: "train" for i in train_idx}, **{i: "val" for i in val_idx},
                      **{i: "test" for i in test_idx}}
    records = [dataclasses.replace(r, split=assignment[i]) for i, r in enumerate(records)]
    return dataclasses.replace(dataset, records=records)


def hold_out_source(dataset: Dataset, source: str | None) -> tuple[Dataset, Dataset | None]:
    """Leave-one-source-out: every image of `source` leaves the data and becomes an external test set."""
    if not source:
        return dataset, None
    if not any("source" in r.extra for r in dataset.records):
        raise DataError("holdout_source needs a manifest CSV with a 'source' column")
    sources = sorted({r.extra.get("source", "") for r in dataset.records})
    if source not in sources:
        raise DataError(f"source '{source}' is not in the data; its sources are {sources}")
    kept = [r for r in dataset.records if r.extra.get("source") != source]
    held = [dataclasses.replace(r, split="test") for r in dataset.records if r.extra.get("source") == source]
    return (dataclasses.replace(dataset, records=kept),
            dataclasses.replace(dataset, records=held, origin=f"{dataset.origin} (source={source})"))


def balancing_weights(records: list[Record], columns: tuple[str, ...], floor: int) -> np.ndarray:
    """A weight per record such that every cell (records sharing the label and the values of
    `columns`) weighs the same in total, cells under `floor` images as if they had `floor` (one
    image must not weigh as much as a hospital); mean 1."""
    missing = [c for c in columns if not any(c in r.extra for r in records)]
    if missing:
        raise DataError(f"balancing by {missing} needs a manifest CSV with the column(s) {missing}")
    keys = [(r.label, *(r.extra.get(c, "") for c in columns)) for r in records]
    counts = collections.Counter(keys)
    weights = np.array([1.0 / max(counts[k], floor) for k in keys])
    return weights * len(weights) / weights.sum()


def extra_columns(records: list[Record]) -> list[str]:
    """The manifest columns beyond file, label and split that any of `records` carries, sorted."""
    return sorted({k for r in records for k in r.extra})


def write_manifest(dataset: Dataset, path: Path) -> None:
    """A manifest CSV (`file,label,split,...`, absolute paths) that `load_dataset` reads back."""
    from lungxray.io import atomic_path

    columns = extra_columns(dataset.records)
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "split", *columns])
        for r in dataset.records:
            writer.writerow([str(r.path), r.label, r.split or "", *[r.extra.get(k, "") for k in columns]])
