"""The COVID-19 image data collection (Cohen et al. 2020, github ieee8023/covid-chestxray-dataset):
`metadata.csv` beside `images/`.

Label file columns used, as published: patientid, offset, sex (M/F), age (years), finding (a path of
labels such as `Pneumonia/Viral/COVID-19`, `Pneumonia/Bacterial/Streptococcus`, `No Finding`),
view (PA, AP, `AP Supine`, `AP semi erect`, L, Axial, Coronal), modality (X-ray, CT), location
(the hospital or city), folder, filename.

Mapping: a finding naming COVID-19 -> covid; any other finding under Pneumonia -> pneumonia;
`No Finding` -> normal; other findings (tuberculosis, ...) and CT dropped. AP Supine and AP semi
erect count as AP (native_view keeps the original). Images come from papers and websites of many
hospitals: `site` is the location column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from lungxray.data.importers.base import Entry, find_file, read_rows

SOURCE = "ieee8023_covid-chestxray"


def finding_class(finding: str) -> tuple[str | None, str | None]:
    parts = [p.strip() for p in finding.split("/")]
    if "COVID-19" in parts:
        return "covid", None
    if parts[0] == "Pneumonia":
        return "pneumonia", None
    if parts == ["No Finding"]:
        return "normal", None
    return None, "other findings without pneumonia"


def entries(root: Path, uncertain: str) -> Iterator[Entry]:
    path = find_file(root, "metadata.csv")
    for row in read_rows(path, ("patientid", "finding", "view", "modality", "folder", "filename")):
        label, dropped = finding_class(row["finding"])
        if row["modality"] != "X-ray":
            label, dropped = None, f"modality {row['modality']}, not a radiograph"
        view = row["view"].strip()
        yield Entry(file=f"{row['folder']}/{row['filename']}", label=label, dropped=dropped,
                    patient_id=row["patientid"], study_id=f"{row['patientid']}/{row.get('offset', '')}",
                    age=row.get("age", ""), sex=row.get("sex", ""), view="AP" if view.startswith("AP") else view,
                    site=row.get("location", ""), native={"finding": row["finding"], "view": view})
