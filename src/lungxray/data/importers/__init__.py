"""Importers for the public chest X-ray collections: each reads a collection's own label files, in
their published format, and writes lungxray's manifest (`file,label,source,site,patient_id,study_id,
age,age_group,sex,view,native_*`), which `lungxray train`, `evaluate` and `data merge` take as is.

    summary = import_collection("nih", "/data/ChestX-ray14", "nih.csv")

One module per collection; each documents its mapping (docs/data.md has them in one table).
"""

from lungxray.data.importers.collection import COLLECTIONS, import_collection

__all__ = ["COLLECTIONS", "import_collection"]
