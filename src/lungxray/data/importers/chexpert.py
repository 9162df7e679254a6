"""CheXpert (Irvin et al. 2019, Stanford): `train.csv` and `valid.csv` beside `train/` and `valid/`,
inside `CheXpert-v1.0/` or `CheXpert-v1.0-small/`.

Label file columns, as published: Path (starting with the release folder, e.g.
`CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`), Sex, Age, Frontal/Lateral,
AP/PA, then 14 observations (No Finding, ..., Pneumonia, ..., Support Devices) valued 1.0
(positive), 0.0 (negative), -1.0 (uncertain) or blank (not mentioned).

Mapping (`label_of`, shared with MIMIC-CXR, which uses the same labeller): Pneumonia 1 -> pneumonia;
otherwise No Finding 1 -> normal; otherwise dropped (another finding). An uncertain Pneumonia (-1)
follows `--uncertain`: drop the image, read it as negative, or as positive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from lungxray.data.importers.base import Entry, find_file, read_rows

SOURCE = "chexpert"
OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices")


def label_of(row: dict[str, str], uncertain: str) -> tuple[str | None, str | None]:
    """(class, reason dropped) from CheXpert-labeller values (1.0, 0.0, -1.0 or blank)."""
    pneumonia = row.get("Pneumonia", "").strip()
    if pneumonia in ("-1.0", "-1"):
        if uncertain == "drop":
            return None, "uncertain pneumonia (--uncertain drop)"
        pneumonia = "1.0" if uncertain == "positive" else "0.0"
    if pneumonia in ("1.0", "1"):
        return "pneumonia", None
    if row.get("No Finding", "").strip() in ("1.0", "1"):
        return "normal", None
    return None, "other findings without pneumonia"


def _release_folder(root: Path) -> Path:
    """ROOT itself or the release folder inside it, whichever holds train.csv."""
    for folder in (root / "CheXpert-v1.0-small", root / "CheXpert-v1.0"):
        if (folder / "train.csv").is_file() or (folder / "train.csv.gz").is_file():
            return folder
    return root


def entries(root: Path, uncertain: str) -> Iterator[Entry]:
    folder = _release_folder(root)
    relative = "" if folder == root else folder.name + "/"
    names = ["train.csv"] + (["valid.csv"] if (folder / "valid.csv").exists() else [])
    for name in names:
        path = find_file(folder, name)
        for row in read_rows(path, ("Path", "Frontal/Lateral", "AP/PA", "Pneumonia", "No Finding")):
            label, dropped = label_of(row, uncertain)
            parts = row["Path"].split("/")  # release/train/patientNNNNN/studyN/viewN_frontal.jpg
            lateral = row["Frontal/Lateral"] == "Lateral"
            yield Entry(file=relative + "/".join(parts[1:]), label=label, dropped=dropped, patient_id=parts[2],
                        study_id=f"{parts[2]}/{parts[3]}", age=row.get("Age", ""), sex=row.get("Sex", ""),
                        view="LL" if lateral else row["AP/PA"], site="Stanford Hospital",
                        native={o.lower().replace(" ", "_"): row.get(o, "") for o in OBSERVATIONS})
