"""The DICOM node beside a real PACS: Orthanc (Debian's package; `make test` installs it) on loopback
with a configuration written here, and DCMTK as a second, independent implementation. A CR made from a
../shared/cxr film is uploaded to Orthanc over its REST API, Orthanc sends it to lungxray, and the
report must be stored in Orthanc in the film's study."""

import io
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ComputedRadiographyImageStorage

from lungxray.dicom.node import DicomNode
from lungxray.dicom.send import Peer, send_files
from lungxray.dicom.web import WebPeer, Watcher
from lungxray.infer.lite_predictor import LitePredictor
from tests.conftest import CXR, require_shared
from lungxray.dicom.sr import report_values
from tests.test_dicom_node import CHILD, chest_film, listen
from tests.test_distribute import free_ports

ORTHANC, STORESCU, DSRDUMP = shutil.which("Orthanc"), shutil.which("storescu"), shutil.which("dsrdump")
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class Orthanc:
    """An Orthanc of the test's own: its own folder, ports and configuration; lungxray is a modality."""

    def __init__(self, folder, node_port: int, environment: dict | None = None, dicomweb: bool = False):
        if not ORTHANC:
            pytest.fail("Orthanc is not installed: make test installs Debian's orthanc package")
        if dicomweb and not os.path.exists(DICOMWEB_PLUGIN):
            pytest.fail("Orthanc's DICOMweb plugin is not installed: make test installs Debian's orthanc-dicomweb")
        self.http_port, self.dicom_port = free_ports(2)
        self.folder, self.environment, self.process = folder, environment, None
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "orthanc.json").write_text(json.dumps({
            "Name": "lungxray-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [], "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
            "DicomModalities": {"lungxray": ["LUNGXRAY", "127.0.0.1", node_port]}}))
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"

    def start(self) -> "Orthanc":
        self.process = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env={**os.environ, **(self.environment or {})})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        pytest.fail("Orthanc did not start within 30 s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def upload(self, path) -> str:
        return httpx.post(f"{self.url}/instances", content=path.read_bytes(), timeout=30).json()["ID"]

    def send_to_lungxray(self, instance: str) -> None:
        answer = httpx.post(f"{self.url}/modalities/lungxray/store", json={"Resources": [instance]}, timeout=60)
        assert answer.status_code == 200, answer.text

    def reports(self, count: int, timeout: float = 60.0) -> list[pydicom.Dataset]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = httpx.post(f"{self.url}/tools/find", json={"Level": "Instance", "Query": {"Modality": "SR"}},
                               timeout=10).json()
            if len(found) >= count:
                break
            time.sleep(0.2)
        return [pydicom.dcmread(io.BytesIO(httpx.get(f"{self.url}/instances/{i}/file").content))
                for i in found]


def cr_film(path, pixels: np.ndarray, **header):
    """A Computed Radiography film of the chest (CR Image Storage), from 8-bit pixels."""
    chest_film(path, pixels, Modality="CR", **header)
    dataset = pydicom.dcmread(path)
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def pacs(export, tmp_path):
    node_port = free_ports(1)[0]
    orthanc = Orthanc(tmp_path / "orthanc", node_port).start()
    # The tiny test run's gate flags real films: with their class shown, their reports carry the probabilities.
    node = listen(export, tmp_path / "spool", node_port, orthanc.dicom_port, send_to_aet="ORTHANC", refuse_ood=False)
    yield orthanc, node_port
    node.terminate()
    node.wait(timeout=30)
    if orthanc.process.poll() is None:
        orthanc.stop()


def test_orthanc_sends_a_film_and_stores_the_report_in_its_study(pacs, export, tmp_path):
    orthanc, _ = pacs
    require_shared()
    film_path = next((CXR / "test" / "covid").iterdir())
    film = cr_film(tmp_path / "film.dcm", np.asarray(Image.open(film_path).convert("L")))
    orthanc.send_to_lungxray(orthanc.upload(film))
    (report,) = orthanc.reports(1)
    source = pydicom.dcmread(film)
    assert report.StudyInstanceUID == source.StudyInstanceUID and report.SeriesInstanceUID != source.SeriesInstanceUID
    values = report_values(report)
    assert values["source"] == source.SOPInstanceUID
    predictor = LitePredictor.load(export)
    expected = predictor.predict_files([film]).probabilities[0]
    np.testing.assert_allclose([values["probabilities"][c] for c in predictor.classes], expected, atol=1e-6)
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == source.SeriesInstanceUID


def test_an_mr_gets_not_analysed_and_results_wait_for_a_stopped_orthanc(pacs, tmp_path):
    orthanc, node_port = pacs
    mr = cr_film(tmp_path / "mr.dcm", np.full((64, 64), 80, np.uint8))
    dataset = pydicom.dcmread(mr)
    dataset.Modality = "MR"
    dataset.save_as(mr, enforce_file_format=True)
    films = [cr_film(tmp_path / f"f{i}.dcm", np.full((64, 64), 30 * i, np.uint8)) for i in range(3)]
    instances = [orthanc.upload(f) for f in [mr, *films]]
    orthanc.stop()  # the PACS goes away while results are made
    sent = subprocess.run([sys.executable, "-c", CHILD, "dicom", "send", *map(str, [mr, *films]), "--to",
                           f"LUNGXRAY@127.0.0.1:{node_port}"], capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    time.sleep(2.0)
    orthanc.start()
    reports = {report_values(r)["source"]: report_values(r) for r in orthanc.reports(4)}
    assert len(reports) == 4 and len(instances) == 4
    not_analysed = reports[str(dataset.SOPInstanceUID)]
    assert not_analysed["decision"] == "not analysed" and "MR" in not_analysed["reason"]


def test_an_unknown_calling_ae_is_refused(export, tmp_path):
    node_port, pacs_port = free_ports(2)
    node = listen(export, tmp_path / "spool", node_port, pacs_port, allow=["ORTHANC"])
    try:
        film = cr_film(tmp_path / "film.dcm", np.full((64, 64), 80, np.uint8))
        refused = subprocess.run([STORESCU, "-aet", "STRANGER", "-aec", "LUNGXRAY", "127.0.0.1", str(node_port),
                                  str(film)], capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "Association Rejected" in refused.stderr + refused.stdout
    finally:
        node.terminate()
        node.wait(timeout=30)


def test_dcmtk_sends_to_lungxray_and_reads_its_report(pacs, tmp_path):
    if not (STORESCU and DSRDUMP):
        pytest.fail("DCMTK is not installed: make test installs Debian's dcmtk package")
    orthanc, node_port = pacs
    film = cr_film(tmp_path / "film.dcm", np.full((64, 64), 120, np.uint8))
    stored = subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", "LUNGXRAY", "127.0.0.1", str(node_port), str(film)],
                            capture_output=True, text=True, timeout=60)
    assert stored.returncode == 0, stored.stderr
    (report,) = orthanc.reports(1)
    report.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    dumped = subprocess.run([DSRDUMP, str(tmp_path / "report.dcm")], capture_output=True, text=True, timeout=60)
    assert dumped.returncode == 0 and "E:" not in dumped.stderr, dumped.stderr
    assert "Imaging Measurement Report" in dumped.stdout and "lungxray classification" in dumped.stdout


def test_names_in_latin_1_and_utf_8_reach_orthancs_patient_record_intact(pacs, tmp_path):
    """The films go straight to lungxray, so Orthanc's patient records are made from the reports alone."""
    orthanc, node_port = pacs
    names = {"ISO_IR 100": "MÜLLER^JÜRGEN", "ISO_IR 192": "Γεωργίου^Αλέξανδρος"}
    films = [cr_film(tmp_path / f"film{i}.dcm", np.full((64, 64), 100 + i, np.uint8), SpecificCharacterSet=charset,
                     PatientName=name, PatientID=f"P-{i}") for i, (charset, name) in enumerate(names.items())]
    stored = subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", "LUNGXRAY", "127.0.0.1", str(node_port),
                             *map(str, films)], capture_output=True, text=True, timeout=60)
    assert stored.returncode == 0, stored.stderr
    reports = orthanc.reports(2)
    assert {(r.SpecificCharacterSet, str(r.PatientName)) for r in reports} == set(names.items())
    patients = httpx.get(f"{orthanc.url}/patients", params={"expand": ""}, timeout=10).json()
    assert {p["MainDicomTags"]["PatientName"] for p in patients} == set(names.values())


@pytest.fixture
def dicomweb(export, tmp_path):
    """Orthanc with its DICOMweb plugin, and an in-process node (not listening) that sends to it by STOW-RS."""
    orthanc = Orthanc(tmp_path / "orthanc", free_ports(1)[0], dicomweb=True).start()
    predictor = LitePredictor.load(export)
    nodes = []

    def node(**options):
        made = DicomNode(predictor, WebPeer.parse(orthanc.dicomweb), tmp_path / "spool", refuse_ood=False,
                         retry_seconds=0.2, max_retry_seconds=0.5, **options)
        nodes.append(made)
        return made

    yield orthanc, node
    for made in nodes:
        made.stop()
    orthanc.stop()


def test_the_watcher_pulls_each_new_film_once_across_restarts(dicomweb, tmp_path):
    """Films pulled by QIDO-RS and WADO-RS, their reports stored back by STOW-RS."""
    orthanc, node = dicomweb
    films = [cr_film(tmp_path / f"f{i}.dcm", np.full((64, 64), 50 + 20 * i, np.uint8), StudyDate="20261206")
             for i in range(3)]
    old = cr_film(tmp_path / "old.dcm", np.full((64, 64), 40, np.uint8), StudyDate="20250101")  # before --since
    for film in [*films, old]:
        orthanc.upload(film)
    first = node()
    watcher = Watcher(first, orthanc.dicomweb, since="20261201")
    first.start(listen=False)
    assert watcher.poll() == 3
    assert len(orthanc.reports(3)) == 3
    assert watcher.poll() == 0  # nothing new: its reports are SRs, and the films are known
    first.stop()
    again = node()  # a restart, on the same spool: the watch goes on from its first day
    restarted = Watcher(again, orthanc.dicomweb)
    again.start(listen=False)
    assert restarted.since == "20261201" and restarted.poll() == 0
    orthanc.upload(cr_film(tmp_path / "new.dcm", np.full((64, 64), 150, np.uint8), StudyDate="20261207"))
    assert restarted.poll() == 1
    reports = orthanc.reports(4)
    time.sleep(1.0)
    sources = [report_values(r)["source"] for r in orthanc.reports(4)]
    assert len(reports) == 4 and len(sources) == len(set(sources)) == 4
    events = [json.loads(line)["event"] for line in (tmp_path / "spool" / "audit.jsonl").read_text().splitlines()]
    assert events.count("delivered") == 4 and "refused by the PACS" not in events


def test_dicom_watch_on_the_command_line(export, tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc", free_ports(1)[0], dicomweb=True).start()
    try:
        film = cr_film(tmp_path / "film.dcm", np.full((64, 64), 90, np.uint8), StudyDate="20261206")
        orthanc.upload(film)
        watch = subprocess.Popen([sys.executable, "-c", CHILD, "dicom", "watch", "--qido", orthanc.dicomweb, "--model",
                                  str(export), "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--spool",
                                  str(tmp_path / "spool"), "--since", "20261201", "--interval", "1"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert "watching" in watch.stdout.readline()
            (report,) = orthanc.reports(1)
            assert report_values(report)["source"] == pydicom.dcmread(film).SOPInstanceUID
        finally:
            watch.terminate()
            assert watch.wait(timeout=60) == 0, watch.stderr.read()[-2000:]
    finally:
        orthanc.stop()
