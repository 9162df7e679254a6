"""DICOMweb, for archives that do not push over DIMSE, through `dicomweb-client`: reports stored by
STOW-RS (`dicom listen --send-to https://pacs.example.org/dicom-web`), and a pull mode (`dicom watch
--qido URL`) that asks QIDO-RS for the CR and DX instances studied since a date, retrieves each new one
by WADO-RS and gives it to the node as if a PACS had sent it.

    node = DicomNode(predictor, send_to=WebPeer("http://127.0.0.1:8042/dicom-web"), spool=Path("spool"))
    node.start(listen=False)
    Watcher(node, "http://127.0.0.1:8042/dicom-web").run(stop_event)
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import logging
import threading
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from lungxray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MODALITIES = ("CR", "DX")  # what the watcher asks for: the radiographs the node answers
PAGE = 200  # instances a QIDO-RS request asks for at once
# The DICOM JSON tags of a QIDO-RS result that name an instance.
STUDY, SERIES, INSTANCE = "0020000D", "0020000E", "00080018"


@dataclasses.dataclass(frozen=True)
class WebPeer:
    """A DICOMweb service: its base URL (the STOW-RS, QIDO-RS and WADO-RS root)."""

    url: str

    @classmethod
    def parse(cls, text: str) -> "WebPeer":
        if not text.startswith(("http://", "https://")):
            raise ConfigError(f"{text!r} is not a DICOMweb URL (http:// or https://, e.g. http://127.0.0.1:8042/dicom-web)")
        return cls(text.rstrip("/"))

    def __str__(self) -> str:
        return self.url


def client(url: str, timeout: float = 30.0) -> DICOMwebClient:
    return DICOMwebClient(url.rstrip("/"), timeout=timeout)


class StowConnection:
    """The node's sender to a DICOMweb service: each report stored by STOW-RS (the same interface as
    `lungxray.dicom.send.Connection`)."""

    def __init__(self, to: WebPeer):
        self.to, self.client = to, client(to.url)

    def store(self, dataset: pydicom.Dataset | Path) -> str:
        """'sent', or why not: "refused (...)" for a refusal that sending again would not change,
        "no answer (...)" for one it might. DataError when the service cannot be reached."""
        if isinstance(dataset, Path):
            dataset = pydicom.dcmread(dataset)
        try:
            response = self.client.store_instances([dataset])
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else 0
            return f"no answer (HTTP {status})" if status >= 500 or status in (408, 429) else f"refused (HTTP {status})"
        except requests.RequestException as error:
            raise DataError(f"{self.to} did not answer ({type(error).__name__})") from None
        for failed in response.get("FailedSOPSequence", []):
            return f"refused (status 0x{int(failed.get('FailureReason', 0)):04X})"
        return "sent"

    def close(self) -> None:
        """Nothing to release: each store is one HTTP request on the client's session."""


class Watcher:
    """Pull mode: every `interval` seconds, asks QIDO-RS at `url` for the CR and DX instances whose
    study date is on or after the watch's first day (kept in the spool, so a restarted watcher goes on
    where it was), retrieves by WADO-RS each one the spool has not seen, and hands it to `node`. The
    spool remembers every instance it received: none is reported twice, across restarts too."""

    def __init__(self, node, url: str, interval: float = 10.0, since: str | None = None):
        self.node, self.url, self.interval = node, url.rstrip("/"), interval
        self.client = client(self.url)
        self.since = self._first_day(since)

    def _first_day(self, since: str | None) -> str:
        state = self.node.spool.folder / "watch.json"
        if state.exists():
            return json.loads(state.read_text())["since"]
        since = since or datetime.date.today().strftime("%Y%m%d")
        state.write_text(json.dumps({"since": since, "qido": self.url}))
        return since

    def new_instances(self) -> list[tuple[str, str, str]]:
        """(study, series, instance) UIDs of the radiographs QIDO-RS lists that the spool has not seen."""
        found = []
        for modality in MODALITIES:
            offset = 0
            while True:
                page = self.client.search_for_instances(
                    search_filters={"Modality": modality, "StudyDate": f"{self.since}-"}, limit=PAGE, offset=offset)
                found += [tuple(result[tag]["Value"][0] for tag in (STUDY, SERIES, INSTANCE)) for result in page]
                if len(page) < PAGE:
                    break
                offset += PAGE
        return [uids for uids in dict.fromkeys(found) if not self.node.spool.seen(uids[2])]

    def poll(self) -> int:
        """One round: how many new instances were handed to the node."""
        received = 0
        for study, series, instance in self.new_instances():
            dataset = self.client.retrieve_instance(study, series, instance)
            buffer = io.BytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
            if self.node.receive(instance, buffer.getvalue(), dataset, origin=f"WADO-RS {self.url}") == 0x0000:
                received += 1
        return received

    def run(self, stop: threading.Event) -> None:
        """Poll until `stop` is set; a round that fails is logged and tried again next time."""
        while not stop.is_set():
            try:
                received = self.poll()
                if received:
                    log.info("%d new instance(s) from %s", received, self.url)
            except (requests.RequestException, DataError) as error:
                log.warning("asking %s for new instances failed (%s); next try in %.0f s", self.url,
                            type(error).__name__, self.interval)
            stop.wait(self.interval)
