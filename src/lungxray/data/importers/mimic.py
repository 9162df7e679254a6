"""MIMIC-CXR-JPG 2.0/2.1 (Johnson et al. 2019, Beth Israel Deaconess Medical Center; PhysioNet,
credentialed access): `mimic-cxr-2.0.0-chexpert.csv.gz`, `mimic-cxr-2.0.0-metadata.csv.gz` and
`files/p1X/p<subject_id>/s<study_id>/<dicom_id>.jpg`.

Label files, as published: the CheXpert labeller's output per study (`subject_id,study_id,` then the
14 CheXpert observations valued 1.0, 0.0, -1.0 or blank) and per image
`dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,...`.

Mapping: CheXpert's rule (`chexpert.label_of`, with `--uncertain`) applied to each image of a study.
Age and sex are not in these files (they are in MIMIC-IV's patients table): age_group unknown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from lungxray.data.importers.base import Entry, find_file, read_rows
from lungxray.data.importers.chexpert import OBSERVATIONS, label_of

SOURCE = "mimic_cxr"


def entries(root: Path, uncertain: str) -> Iterator[Entry]:
    labels_path = find_file(root, "mimic-cxr-2.0.0-chexpert.csv")
    meta_path = find_file(root, "mimic-cxr-2.0.0-metadata.csv")
    studies: dict[tuple[str, str], dict[str, str]] = {}
    for row in read_rows(labels_path, ("subject_id", "study_id", "Pneumonia", "No Finding")):
        studies[(row["subject_id"], row["study_id"])] = row
    for row in read_rows(meta_path, ("dicom_id", "subject_id", "study_id", "ViewPosition")):
        subject, study = row["subject_id"], row["study_id"]
        labels = studies.get((subject, study))
        label, dropped = label_of(labels, uncertain) if labels else (None, "study without labels")
        yield Entry(file=f"files/p{subject[:2]}/p{subject}/s{study}/{row['dicom_id']}.jpg", label=label,
                    dropped=dropped, patient_id=subject, study_id=study, view=row["ViewPosition"],
                    site="Beth Israel Deaconess Medical Center",
                    native={o.lower().replace(" ", "_"): (labels or {}).get(o, "") for o in OBSERVATIONS})
