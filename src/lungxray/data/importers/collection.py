"""Which collections lungxray imports, and the one entry point that imports any of them."""

from __future__ import annotations

import importlib
from pathlib import Path

from lungxray.data.importers.base import FRONTAL_VIEWS, ImportSummary, check_uncertain, write_import
from lungxray.errors import DataError

# The names users type, each the module that reads that collection.
COLLECTIONS = ("nih", "chexpert", "mimic", "padchest", "vindr", "rsna", "siim", "kermany", "radiography", "ieee8023",
               "covidx", "bimcv")


def import_collection(kind: str, root: str | Path, out: str | Path, uncertain: str = "drop",
                      views: tuple[str, ...] | None = FRONTAL_VIEWS, source: str | None = None) -> ImportSummary:
    """Read collection `kind` unpacked at `root` and write its manifest to `out` (a .csv).
    `views`: the views kept (None keeps all); `source`: the manifest's source name (default: the
    collection's)."""
    if kind not in COLLECTIONS:
        raise DataError(f"unknown collection {kind!r}; lungxray imports {', '.join(COLLECTIONS)}")
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: give the folder the {kind} collection unpacks to")
    if out.suffix.lower() != ".csv":
        raise DataError(f"--out {out}: give a .csv file name for the manifest")
    module = importlib.import_module(f"lungxray.data.importers.{kind}")
    entries = module.entries(root.resolve(), check_uncertain(uncertain))
    return write_import(kind, entries, root, out, source or module.SOURCE, views)
