"""COVIDx CXR (Wang et al. 2020, COVID-Net; Kaggle "COVIDx CXR-2/3/4"): `train.txt`, `val.txt`,
`test.txt` beside `train/`, `val/`, `test/`.

Label files, as published: space-separated lines `patient_id filename class data_source`, class
`positive`/`negative` (CXR-2 and later) or `COVID-19`/`normal`/`pneumonia` (COVIDx v5 to v9).

Mapping: positive or COVID-19 -> covid; normal -> normal; pneumonia -> pneumonia; negative dropped
(it is either normal or another pneumonia, which the label cannot tell). COVIDx is itself a merge
(ieee8023, RSNA, Actualmed, Figure1, SIRM, RICORD, BIMCV, Stony Brook...): `site` is its data_source,
and merging it with any of those collections duplicates films (`lungxray data merge` finds them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from lungxray.data.importers.base import Entry
from lungxray.errors import DataError

SOURCE = "covidx"
CLASSES = {"positive": ("covid", None), "COVID-19": ("covid", None), "normal": ("normal", None),
           "pneumonia": ("pneumonia", None), "negative": (None, "negative (normal or another pneumonia: not told)")}


def entries(root: Path, uncertain: str) -> Iterator[Entry]:
    lists = [root / f"{split}.txt" for split in ("train", "val", "test") if (root / f"{split}.txt").is_file()]
    if not lists:
        raise DataError(f"{root} lacks the label file train.txt: give the folder the collection unpacks to")
    for path in lists:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 4:
                raise DataError(f"{path}, line {number}: expected 'patient_id filename class data_source'")
            patient, name, native, origin = fields[0], fields[1], fields[2], fields[-1]
            label, dropped = CLASSES.get(native, (None, f"unknown class {native!r}"))
            yield Entry(file=f"{path.stem}/{name}", label=label, dropped=dropped, patient_id=patient,
                        study_id=patient, site=origin, native={"class": native, "split": path.stem})
