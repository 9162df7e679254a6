"""NIH ChestX-ray14 (Wang et al. 2017), as distributed by the NIH Clinical Center: `Data_Entry_2017_v2020.csv`
beside `images_001/images/*.png` ... `images_012/images/*.png` (or one `images/` folder).

Label file columns, as published: Image Index, Finding Labels (findings joined by '|', or 'No Finding'),
Follow-up #, Patient ID, Patient Age (years), Patient Gender (M/F), View Position (PA/AP), ...

Mapping: 'No Finding' -> normal; any label list holding 'Pneumonia' -> pneumonia; every other list
(another finding without pneumonia) is dropped. The labels were mined from reports by NLP (about 90%
accurate by the authors' estimate), so expect label noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from lungxray.data.importers.base import Entry, files_under, find_file, read_rows

LABEL_FILE = "Data_Entry_2017_v2020.csv"
OLD_LABEL_FILE = "Data_Entry_2017.csv"  # the 2017 release: the same columns
SOURCE = "nih_chestxray14"


def nih_class(findings: str) -> tuple[str | None, str | None]:
    """(class, reason dropped) of a 'Finding Labels' value."""
    labels = set(findings.split("|"))
    if labels == {"No Finding"}:
        return "normal", None
    if "Pneumonia" in labels:
        return "pneumonia", None
    return None, "other findings without pneumonia"


def entries(root: Path, uncertain: str) -> Iterator[Entry]:
    path = find_file(root, LABEL_FILE, OLD_LABEL_FILE)
    where = {name.rsplit("/", 1)[-1]: name for name in files_under(root) if name.endswith(".png")}
    for row in read_rows(path, ("Image Index", "Finding Labels", "Patient ID", "View Position")):
        label, dropped = nih_class(row["Finding Labels"])
        name = row["Image Index"]
        yield Entry(file=where.get(name, f"images/{name}"), label=label, dropped=dropped,
                    patient_id=row["Patient ID"], study_id=f"{row['Patient ID']}_{row.get('Follow-up #', '')}",
                    age=row.get("Patient Age", ""), sex=row.get("Patient Gender", ""), view=row["View Position"],
                    site="NIH Clinical Center", native={"finding_labels": row["Finding Labels"]})
