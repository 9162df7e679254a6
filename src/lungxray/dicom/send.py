"""A Storage SCU: `lungxray dicom send FILES_or_DIR --to AET@HOST:PORT`, for users and tests."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pynetdicom import AE

from lungxray.dicom.node import Peer
from lungxray.errors import DataError


def dicom_files(paths: list[str | Path]) -> list[Path]:
    """The files given, and the files under folders given, sorted."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"{path} does not exist")
    return found


def send_files(paths: list[Path], to: Peer, aet: str = "LUNGXRAYSCU", tls=None) -> list[tuple[Path, str]]:
    """C-STORE each file over one association (over TLS with `tls`, an ssl.SSLContext from
    `lungxray.dicom.tls.client_context`); per file 'sent', or why not."""
    datasets, results = [], {}
    for path in paths:
        try:
            datasets.append((path, pydicom.dcmread(path)))
        except Exception as error:  # pydicom raises many types for a file that is not DICOM
            results[path] = f"not a DICOM file ({type(error).__name__})"
    ae = AE(ae_title=aet)
    for pair in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for _, d in datasets}):
        ae.add_requested_context(*pair)
    if datasets:
        assoc = ae.associate(to.host, to.port, ae_title=to.aet, tls_args=(tls, to.host) if tls else None)
        if not assoc.is_established:
            raise DataError(f"{to.aet}@{to.host}:{to.port} refused or did not answer the association")
        try:
            for path, dataset in datasets:
                status = assoc.send_c_store(dataset)
                code = getattr(status, "Status", None)
                results[path] = "sent" if code == 0x0000 else f"refused (status 0x{code:04X})" if code is not None \
                    else "no answer"
        finally:
            assoc.release()
    return [(path, results[path]) for path in paths]
