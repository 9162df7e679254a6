"""COVID-19 Radiography Database (Chowdhury et al. 2020, Rahman et al. 2021; Kaggle):
`COVID-19_Radiography_Dataset/{COVID,Normal,Lung_Opacity,Viral Pneumonia}/images/*.png` (release 4
and later; earlier releases had the images directly in the class folders).

There is no per-image label file: the class is the folder (the `*.metadata.xlsx` files give each
image's source URL only).

Mapping: COVID -> covid, Normal -> normal, Viral Pneumonia -> pneumonia, Lung_Opacity -> pneumonia
(the release calls it "non-COVID lung infection"; the images are RSNA's Lung Opacity films).
Traps: Normal and Lung_Opacity are RSNA (that is, NIH) films, Viral Pneumonia and part of Normal are
Kermany's children; the COVID class gathers several public sets. Merged with RSNA, NIH or Kermany
the same films appear twice (`lungxray data merge` finds such copies).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from lungxray.data.importers.base import Entry, files_under

SOURCE = "covid19_radiography_db"
FOLDERS = {"COVID": "covid", "Normal": "normal", "Viral Pneumonia": "pneumonia", "Lung_Opacity": "pneumonia"}
SUFFIXES = (".png", ".jpg", ".jpeg")


def entries(root: Path, uncertain: str) -> Iterator[Entry]:
    for file in sorted(files_under(root)):
        parts = file.split("/")
        folders = [p for p in parts[-3:-1] if p in FOLDERS]
        if not folders or not file.lower().endswith(SUFFIXES) or "masks" in parts:
            continue
        yield Entry(file=file, label=FOLDERS[folders[-1]], view="", native={"folder": folders[-1]})
