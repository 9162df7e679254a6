"""PadChest (Bustos et al. 2020, Hospital San Juan de Alicante; BIMCV): images in numbered folders
`<ImageDir>/<ImageID>` and `PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv` beside them.

Label file columns used, as published: ImageID, ImageDir, StudyDate_DICOM (YYYYMMDD), StudyID,
PatientID, PatientBirth (year), PatientSex_DICOM, Projection (PA, L, AP_horizontal, AP, COSTAL,
EXCLUDE, UNK), MethodLabel (Physician: read by a radiologist; RNN_model: by a network trained on those
reads), Labels (a Python list literal such as `['normal']` or `['pneumonia', 'pleural effusion']`).

Mapping: a list holding 'pneumonia' -> pneumonia; exactly `['normal']` -> normal; lists holding
'exclude' or 'suboptimal study' and every other finding dropped. AP_horizontal counts as AP. The
labels come from Spanish reports (a quarter by radiologists, the rest by the RNN): `native_method`
keeps which. Age is the study year minus the birth year.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

from lungxray.data.importers.base import Entry, find_file, read_rows

SOURCE = "padchest"
LABEL_FILE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
VIEWS = {"PA": "PA", "AP": "AP", "AP_horizontal": "AP", "L": "LL"}


def labels_class(text: str) -> tuple[str | None, str | None]:
    try:
        labels = {str(label).strip() for label in ast.literal_eval(text or "[]")}
    except (ValueError, SyntaxError):
        return None, "labels unreadable"
    if labels & {"exclude", "suboptimal study"}:
        return None, "excluded or suboptimal study"
    if "pneumonia" in labels:
        return "pneumonia", None
    if labels == {"normal"}:
        return "normal", None
    return None, "other findings without pneumonia"


def age_of(study_date: str, birth_year: str) -> str:
    try:
        return str(int(study_date[:4]) - int(float(birth_year)))
    except ValueError:
        return ""


def entries(root: Path, uncertain: str) -> Iterator[Entry]:
    path = find_file(root, LABEL_FILE)
    for row in read_rows(path, ("ImageID", "ImageDir", "PatientID", "Projection", "Labels")):
        label, dropped = labels_class(row["Labels"])
        yield Entry(file=f"{row['ImageDir']}/{row['ImageID']}", label=label, dropped=dropped,
                    patient_id=row["PatientID"], study_id=row.get("StudyID", ""),
                    age=age_of(row.get("StudyDate_DICOM", ""), row.get("PatientBirth", "")),
                    sex=row.get("PatientSex_DICOM", ""), view=VIEWS.get(row["Projection"], row["Projection"]),
                    site="Hospital San Juan de Alicante",
                    native={"labels": row["Labels"], "method": row.get("MethodLabel", ""),
                            "projection": row["Projection"]})
