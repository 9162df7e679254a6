"""Kermany et al. 2018 (Guangzhou Women and Children's Medical Center; Mendeley "ChestXRay2017", also
on Kaggle as "Chest X-Ray Images (Pneumonia)"): `chest_xray/{train,test[,val]}/{NORMAL,PNEUMONIA}/*.jpeg`.

There is no label file: the class is the folder, the pathogen and patient are in the file name
(`person1_bacteria_1.jpeg`, `person1_virus_6.jpeg`; normals `IM-0115-0001.jpeg`,
`NORMAL2-IM-1427-0001.jpeg`). Every patient is a child aged one to five: age_group pediatric.

Mapping: NORMAL -> normal, PNEUMONIA -> pneumonia (bacterial and viral alike; `native_pathogen` keeps
which). Kaggle's copy nests the set twice and adds `__MACOSX` resource forks: both are handled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from lungxray.data.importers.base import Entry, files_under

SOURCE = "kermany_pediatric"
FOLDERS = {"NORMAL": "normal", "PNEUMONIA": "pneumonia"}
SUFFIXES = (".jpeg", ".jpg", ".png")


def patient_of(name: str) -> tuple[str, str]:
    """(patient, pathogen) from a file name."""
    person = re.match(r"(person\d+)_(bacteria|virus)", name)
    if person:
        return person.group(1), person.group(2)
    return re.sub(r"-\d+$", "", name.rsplit(".", 1)[0]), ""


def entries(root: Path, uncertain: str) -> Iterator[Entry]:
    seen: set[tuple[str, str]] = set()
    for file in sorted(files_under(root)):
        parts = file.split("/")
        if "__MACOSX" in parts or len(parts) < 3 or parts[-2] not in FOLDERS or not file.lower().endswith(SUFFIXES):
            continue
        split, name = parts[-3], parts[-1]
        if (split, name) in seen:  # the second copy of Kaggle's doubly nested folder
            continue
        seen.add((split, name))
        patient, pathogen = patient_of(name)
        yield Entry(file=file, label=FOLDERS[parts[-2]], patient_id=patient, study_id=patient, view="AP",
                    age_group="pediatric", site="Guangzhou Women and Children's Medical Center",
                    native={"folder": parts[-2], "split": split, "pathogen": pathogen})
