"""RSNA Pneumonia Detection Challenge (Kaggle 2018; films from NIH ChestX-ray14, read again by
radiologists): `stage_2_train_labels.csv`, `stage_2_detailed_class_info.csv` and
`stage_2_train_images/<patientId>.dcm`.

Label files, as published: `patientId,x,y,width,height,Target` (one row per box; Target 1 for lung
opacity) and `patientId,class` with class 'Normal', 'No Lung Opacity / Not Normal' or 'Lung Opacity'.
Age, sex and view live only in the DICOM headers (PatientAge, PatientSex, ViewPosition), which are
read without the pixels.

Mapping: 'Lung Opacity' -> pneumonia (opacity suggesting pneumonia); 'Normal' -> normal;
'No Lung Opacity / Not Normal' dropped (another finding). The films are NIH's: merged with NIH
ChestX-ray14, the same film can sit in both (`lungxray data merge` finds such copies).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from lungxray.data.importers.base import Entry, dicom_header, find_file, read_rows

SOURCE = "rsna_pneumonia"
CLASSES = {"Lung Opacity": ("pneumonia", None), "Normal": ("normal", None),
           "No Lung Opacity / Not Normal": (None, "no lung opacity but not normal (another finding)")}
IMAGES = "stage_2_train_images"


def entries(root: Path, uncertain: str) -> Iterator[Entry]:
    classes_path = find_file(root, "stage_2_detailed_class_info.csv")
    labels_path = find_file(root, "stage_2_train_labels.csv")
    detailed: dict[str, str] = {}
    for row in read_rows(classes_path, ("patientId", "class")):
        detailed[row["patientId"]] = row["class"]
    targets: dict[str, str] = {}
    for row in read_rows(labels_path, ("patientId", "Target")):
        targets[row["patientId"]] = max(targets.get(row["patientId"], "0"), row["Target"])
    for patient, native in detailed.items():
        label, dropped = CLASSES.get(native, (None, f"unknown class {native!r}"))
        file = f"{IMAGES}/{patient}.dcm"
        facts, unreadable = dicom_header(root / file)
        if unreadable:
            label, dropped = None, unreadable
        yield Entry(file=file, label=label, dropped=dropped, patient_id=patient, study_id=patient,
                    site="NIH Clinical Center (via RSNA)", native={"class": native, "target": targets.get(patient, "")},
                    **facts)
