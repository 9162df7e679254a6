"""VinDr-CXR (Nguyen et al. 2022, Hospital 108 and Hanoi Medical University Hospital; PhysioNet
release 1.0.0, or Kaggle's "VinBigData Chest X-ray Abnormalities Detection"): DICOM films
`train/<image_id>.dicom` (PhysioNet) or `train/<image_id>.dicom` (Kaggle), with

- PhysioNet: `annotations/image_labels_train.csv`: `image_id,rad_id,` then one 0/1 column per label,
  global labels among them (`Pneumonia`, `Tuberculosis`, `Lung tumor`, `COPD`, `Other diseases`,
  `No finding`); three radiologists per training image, one consensus row per test image
  (`image_labels_test.csv`, no rad_id);
- Kaggle: `train.csv`: `image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max`, local findings
  only (no pneumonia label), one row per radiologist and finding.

Mapping: the majority of an image's radiologists decides. PhysioNet: Pneumonia -> pneumonia;
otherwise `No finding` -> normal; otherwise dropped. Kaggle: `No finding` -> normal, anything else
dropped (the competition's labels cannot say pneumonia). Age and sex from the DICOM headers.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Iterator

from lungxray.data.importers.base import Entry, dicom_header, find_file, read_rows

SOURCE = "vindr_cxr"
SITE = "Hospital 108 / Hanoi Medical University Hospital"


def _votes(root: Path) -> tuple[dict[str, collections.Counter], dict[str, int], str]:
    """Per image: how many radiologists marked each label; how many read it; which format."""
    votes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    readers: dict[str, set] = collections.defaultdict(set)
    physionet = [root / "annotations" / n for n in ("image_labels_train.csv", "image_labels_test.csv")]
    if physionet[0].is_file():
        for path in (p for p in physionet if p.is_file()):
            for row in read_rows(path, ("image_id", "Pneumonia", "No finding")):
                split = "test" if path.name.endswith("test.csv") else "train"
                key = f"{split}/{row['image_id']}"
                readers[key].add(row.get("rad_id", "consensus"))
                votes[key].update(label for label, value in row.items() if label not in ("image_id", "rad_id")
                                  and value.strip() in ("1", "1.0"))
        return votes, {k: len(v) for k, v in readers.items()}, "physionet"
    path = find_file(root, "train.csv")
    seen: dict[str, set] = collections.defaultdict(set)
    for row in read_rows(path, ("image_id", "class_name", "rad_id")):
        key = f"train/{row['image_id']}"
        readers[key].add(row["rad_id"])
        if row["class_name"] not in seen[(key, row["rad_id"])]:  # one vote per radiologist per label
            seen[(key, row["rad_id"])].add(row["class_name"])
            votes[key][row["class_name"]] += 1
    return votes, {k: len(v) for k, v in readers.items()}, "kaggle"


def entries(root: Path, uncertain: str) -> Iterator[Entry]:
    votes, readers, release = _votes(root)
    for key, counted in sorted(votes.items()):
        majority = readers[key] / 2
        if release == "physionet" and counted["Pneumonia"] > majority:
            label, dropped = "pneumonia", None
        elif counted["No finding"] > majority:
            label, dropped = "normal", None
        else:
            label, dropped = None, "other findings without pneumonia" if release == "physionet" else \
                "a finding (Kaggle's labels cannot say pneumonia)"
        file = f"{key}.dicom"
        facts, unreadable = dicom_header(root / file)
        if unreadable:
            label, dropped = None, unreadable
        yield Entry(file=file, label=label, dropped=dropped, patient_id=key.split("/")[1], study_id=key.split("/")[1],
                    site=SITE, native={"labels": "|".join(sorted(counted)), "readers": str(readers[key])},
                    **{**facts, "view": facts.get("view") or "PA"})
