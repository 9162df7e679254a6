"""A Storage SCU (`lungxray dicom send FILES_or_DIR --to AET@HOST:PORT`, and the node's sender) and
the address of a DICOM peer."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import pydicom
from pynetdicom import AE

from lungxray.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class Peer:
    """A DICOM application entity on the network: AE title, host and port."""

    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Peer":
        """AET@HOST:PORT, as `--send-to` and `--to` take it."""
        try:
            aet, address = text.split("@", 1)
            host, port = address.rsplit(":", 1)
            peer = cls(aet, host, int(port))
        except ValueError:
            raise ConfigError(f"{text!r} is not AET@HOST:PORT (for example ORTHANC@127.0.0.1:4242)") from None
        if not 0 < len(aet) <= 16 or not 0 < peer.port < 65536:
            raise ConfigError(f"{text!r}: the AE title takes 1 to 16 characters and the port 1 to 65535")
        return peer


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


SUCCESS = {0x0000, 0xB000, 0xB006, 0xB007}  # success, and success with a warning (coercion, elements discarded)


def store(paths: list[Path], to: Peer, aet: str = "LUNGXRAYSCU", tls=None) -> Iterator[tuple[Path, str]]:
    """C-STORE each file over one association (over TLS with `tls`, an ssl.SSLContext from
    `lungxray.dicom.tls.client_context`), yielding per file 'sent', or why not, as each is answered.
    DataError if the association is refused."""
    datasets = []
    for path in paths:
        try:
            datasets.append((path, pydicom.dcmread(path)))
        except Exception as error:  # pydicom raises many types for a file that is not DICOM
            yield path, f"not a DICOM file ({type(error).__name__})"
    if not datasets:
        return
    ae = AE(ae_title=aet)
    for pair in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for _, d in datasets}):
        ae.add_requested_context(*pair)
    assoc = ae.associate(to.host, to.port, ae_title=to.aet, tls_args=(tls, to.host) if tls else None)
    if not assoc.is_established:
        raise DataError(f"{to.aet}@{to.host}:{to.port} refused or did not answer the association")
    try:
        for path, dataset in datasets:
            code = getattr(assoc.send_c_store(dataset), "Status", None)
            yield path, "sent" if code in SUCCESS else f"refused (status 0x{code:04X})" if code is not None \
                else "no answer"
    finally:
        assoc.release()


def send_files(paths: list[Path], to: Peer, aet: str = "LUNGXRAYSCU", tls=None) -> list[tuple[Path, str]]:
    """`store`'s answers for every file, in the order given."""
    answers = dict(store(paths, to, aet, tls))
    return [(path, answers[path]) for path in paths]
