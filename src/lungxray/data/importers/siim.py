"""SIIM-FISABIO-RSNA COVID-19 Detection (Kaggle 2021; films of BIMCV-COVID19 (Valencia) and
MIDRC-RICORD): `train_study_level.csv`, `train_image_level.csv` and
`train/<StudyInstanceUID>/<SeriesInstanceUID>/<image id>.dcm`.

Label files, as published: `id,Negative for Pneumonia,Typical Appearance,Indeterminate Appearance,
Atypical Appearance` (id `<study>_study`, one of the four columns 1) and `id,boxes,label,
StudyInstanceUID` (id `<image>_image`). Age, sex and view from the DICOM headers.

Mapping, per study: Typical Appearance -> covid; Negative for Pneumonia -> normal (negative for
pneumonia, not necessarily free of other findings); Indeterminate and Atypical Appearance dropped
(the readers could not say COVID-19, nor name another pneumonia).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from lungxray.data.importers.base import Entry, dicom_header, files_under, find_file, read_rows

SOURCE = "siim_covid19"
STUDY_CLASSES = {"Typical Appearance": ("covid", None), "Negative for Pneumonia": ("normal", None),
                 "Indeterminate Appearance": (None, "indeterminate appearance"),
                 "Atypical Appearance": (None, "atypical appearance (neither COVID-19 nor named pneumonia)")}


def entries(root: Path, uncertain: str) -> Iterator[Entry]:
    studies_path, images_path = find_file(root, "train_study_level.csv"), find_file(root, "train_image_level.csv")
    study_class: dict[str, str] = {}
    for row in read_rows(studies_path, ("id", *STUDY_CLASSES)):
        marked = [name for name in STUDY_CLASSES if row[name].strip() in ("1", "1.0")]
        study_class[row["id"].removesuffix("_study")] = marked[0] if len(marked) == 1 else ""
    where = {name.rsplit("/", 1)[-1].removesuffix(".dcm"): name for name in files_under(root) if name.endswith(".dcm")}
    for row in read_rows(images_path, ("id", "StudyInstanceUID")):
        image, study = row["id"].removesuffix("_image"), row["StudyInstanceUID"]
        native = study_class.get(study, "")
        label, dropped = STUDY_CLASSES.get(native, (None, "study without one study-level label"))
        file = where.get(image, f"train/{study}/{image}.dcm")
        facts, unreadable = dicom_header(root / file)
        if unreadable:
            label, dropped = None, unreadable
        yield Entry(file=file, label=label, dropped=dropped, study_id=study, patient_id=study,
                    site="BIMCV / MIDRC-RICORD", native={"study_label": native, "boxes": row.get("label", "")}, **facts)
