"""What the DICOM node sends, as a PACS and a viewer see it: TID 1500 reports and heat-map captures
that dciodvfy and PixelMed's DicomSRValidator pass and highdicom reads back; patient names in the
film's own character set, byte for byte; a report the PACS refuses set aside while the others go;
the caller's transfer-syntax order; the called AE title enforced; a corrected resend reported again
under a documented rule; one report series per node run in each study; logs without pydicom's VOI LUT
warning or tracebacks for a film at fault; old sent/ markers pruned."""

import json
import logging
import os
import shutil
import subprocess
import time
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless,
                         generate_uid)
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from lungxray.data.images import dicom_image, read_dicom
from lungxray.dicom.heatmap import heatmap_capture
from lungxray.dicom.send import send_files
from lungxray.dicom.sr import ReportWriter, report_values, result_report
from lungxray.dicom.spool import Spool
from lungxray.infer.answer import NOT_ANALYSED, WITHHELD, Answer
from lungxray.infer.identity import ModelIdentity
from tests.test_dicom import make_dicom
from tests.test_dicom_node import Pacs, chest_film, node_and_pacs, predictor  # noqa: F401 (fixtures)

DCIODVFY, JAVA = shutil.which("dciodvfy"), shutil.which("java")
PIXELMED = "/usr/share/java/pixelmed.jar"
NAMES = {"ISO_IR 100": "MÜLLER^JÜRGEN", "ISO_IR 192": "Γεωργίου^Αλέξανδρος"}
MODEL = ModelIdentity("run", "lungxray 0.1.0, trained 2026-12-06", "ab" * 32)
PROBABILITIES = {"covid": 0.05, "normal": 0.15, "pneumonia": 0.8}
ANSWERS = {
    "a class": Answer("film", None, "x", "pneumonia", None, PROBABILITIES, ("pneumonia", "normal"), 0.9, 0.12, False, 0.5),
    "withheld": Answer("film", None, "x", WITHHELD, "unlike the training films", PROBABILITIES, ("pneumonia",), 0.9,
                       0.93, True, 0.5),
    "not analysed": Answer("film", None, "x", NOT_ANALYSED, "lateral view (DICOM ViewPosition LL)"),
}


def source_film(charset: str = "ISO_IR 192") -> Dataset:
    film = Dataset()
    film.update({"SpecificCharacterSet": charset, "PatientName": NAMES[charset], "PatientID": "P-7",
                 "PatientBirthDate": "19500101", "PatientSex": "F", "StudyDate": "20261206", "StudyTime": "101500",
                 "StudyID": "S1", "AccessionNumber": "A7", "ReferringPhysicianName": "", "StudyInstanceUID": generate_uid(),
                 "SeriesInstanceUID": generate_uid(), "SOPInstanceUID": generate_uid(),
                 "SOPClassUID": DigitalXRayImageStorageForPresentation, "Modality": "DX", "Laterality": ""})
    return film


def dciodvfy(path) -> str:
    if not DCIODVFY:
        pytest.fail("dicom3tools is not installed: make test installs Debian's dicom3tools package")
    return subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60).stderr


def pixelmed(paths: list) -> list[str]:
    """PixelMed's DicomSRValidator's output for each file, its JVMs started side by side (each takes
    one file, and its start is most of its time)."""
    if not (JAVA and os.path.exists(PIXELMED)):
        pytest.fail("PixelMed is not installed: make test installs Debian's libpixelmed-java package")
    limits = [f"-Djdk.xml.{name}=0" for name in ("xpathExprOpLimit", "xpathExprGrpLimit", "xpathTotalOpLimit")]
    runs = [subprocess.Popen([JAVA, *limits, "-cp", PIXELMED, "com.pixelmed.validate.DicomSRValidator", str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for path in paths]
    return [run.communicate(timeout=180)[0] for run in runs]


def test_every_report_passes_dciodvfy_and_pixelmed_and_reads_back_through_highdicom(tmp_path):
    """Each kind of report, the second of its shape: the one the writer makes without highdicom."""
    paths = {}
    for kind, answer in ANSWERS.items():
        write = ReportWriter(MODEL, "run")
        write(source_film("ISO_IR 100"), answer)
        film, paths[kind] = source_film(), tmp_path / f"{kind}.dcm"
        paths[kind].write_bytes(write(film, answer))
        checked = dciodvfy(paths[kind])
        assert "Error" not in checked and "Unrecognized" not in checked, (kind, checked)
        values = report_values(pydicom.dcmread(paths[kind]))
        assert values["source"] == film.SOPInstanceUID and values["decision"] == answer.decision
        assert values["probabilities"] == (answer.shown_probabilities or {})
        assert values["set"] == list(answer.shown_set or ())
        assert (values["ood"], values["ood_score"]) == (answer.ood, answer.ood_score)
        assert values["reason"] == answer.reason
        assert values["algorithm"]["name"] == MODEL.name and values["algorithm"]["version"] == MODEL.version
        assert any("not a medical device" in parameter for parameter in values["algorithm"]["parameters"])
    for kind, validated in zip(paths, pixelmed(list(paths.values()))):
        assert "Found Root Template TID_1500" in validated and "Error" not in validated, (kind, validated)


def test_the_model_is_the_contributing_equipment_and_its_device_uid_follows_the_model():
    film = source_film()
    other = ModelIdentity(MODEL.name, MODEL.version, "cd" * 32)
    first, again = (result_report(film, ANSWERS["a class"], model, generate_uid()) for model in (MODEL, other))
    ours = [item for item in first.ContributingEquipmentSequence if item.Manufacturer == "lungxray"]
    (equipment,) = ours
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
    assert equipment.ManufacturerModelName == MODEL.name and equipment.SoftwareVersions == MODEL.version
    assert again.ContributingEquipmentSequence[-1].DeviceUID != equipment.DeviceUID


def test_the_heatmap_capture_passes_dciodvfy(tmp_path):
    image = np.tile(np.arange(224, dtype=np.uint8), (224, 1))[..., None].repeat(3, axis=-1)
    capture = heatmap_capture(source_film(), image, np.random.default_rng(0).random((7, 7)), "pneumonia", 0.8, MODEL,
                              generate_uid())
    capture.save_as(tmp_path / "capture.dcm", enforce_file_format=True)
    checked = dciodvfy(tmp_path / "capture.dcm")
    assert "Error" not in checked and "Unrecognized" not in checked and "Laterality" not in checked, checked
    assert capture.PatientName == NAMES["ISO_IR 192"] and capture.SpecificCharacterSet == "ISO_IR 192"


@pytest.mark.parametrize("charset", NAMES)
def test_patient_names_keep_their_character_set_byte_for_byte(node_and_pacs, tmp_path, charset):
    make, pacs, node_peer = node_and_pacs
    make()
    film = chest_film(tmp_path / "film.dcm", np.full((64, 64), 90, np.uint8), SpecificCharacterSet=charset,
                      PatientName=NAMES[charset])
    send_files([film], node_peer)
    (report,) = pacs.wait_for(1)
    received, sent = report.get_item("PatientName").value, pydicom.dcmread(film).get_item("PatientName").value
    assert isinstance(received, bytes) and received == sent  # the bytes, as the film had them
    assert report.SpecificCharacterSet == charset and report.PatientName == NAMES[charset]


class RefusingPacs(Pacs):
    """A PACS that answers 0xC000 (cannot understand) to the reports of one study."""

    def __init__(self, port: int, refused_study: str):
        super().__init__(port)
        self.refused_study, self.refusals = refused_study, 0

    def start(self):
        from pynetdicom import evt
        from pynetdicom.sop_class import ComprehensiveSRStorage

        ae = AE(ae_title="PACS")
        ae.add_supported_context(ComprehensiveSRStorage)

        def store(event):
            if event.dataset.StudyInstanceUID == self.refused_study:
                self.refusals += 1
                return 0xC000
            self.received.append(event.dataset)
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
        return self


def test_a_report_the_pacs_refuses_is_set_aside_and_the_others_go_on(node_and_pacs, tmp_path, caplog):
    make, pacs, node_peer = node_and_pacs
    pacs.stop()
    refused_study = generate_uid()
    refusing = RefusingPacs(pacs.port, refused_study).start()
    try:
        node = make()
        films = [chest_film(tmp_path / "refused.dcm", np.full((64, 64), 10, np.uint8), study=refused_study)]
        films += [chest_film(tmp_path / f"f{i}.dcm", np.full((64, 64), 20 + i, np.uint8)) for i in range(5)]
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="lungxray.dicom.node"):
            send_files(films, node_peer)
            assert len(refusing.wait_for(5, timeout=30)) == 5
        assert time.monotonic() - started < 20 and refusing.refusals == 1  # refused once, never retried
        refused_uid = str(pydicom.dcmread(films[0]).SOPInstanceUID)
        deadline = time.monotonic() + 10
        while node.spool.undelivered() and time.monotonic() < deadline:  # the PACS holds the last report a moment
            time.sleep(0.05)                                               # before the node hears it was stored
        assert (tmp_path / "spool" / "refused" / f"{refused_uid}.dcm").is_file() and not node.spool.undelivered()
        assert any("refused the report" in r.getMessage() and "0xC000" in r.getMessage() for r in caplog.records)
        events = [json.loads(line) for line in (tmp_path / "spool" / "audit.jsonl").read_text().splitlines()]
        assert [e["status"] for e in events if e["event"] == "refused by the PACS"] == ["refused (status 0xC000)"]
    finally:
        refusing.stop()
        pacs.start()  # for the fixture's own stop


@pytest.mark.parametrize("proposed", [[ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                                      [JPEGLSLossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                                      [ImplicitVRLittleEndian, ExplicitVRLittleEndian]])
def test_the_transfer_syntax_is_the_callers_first_choice(node_and_pacs, proposed):
    make, _, node_peer = node_and_pacs
    make()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, proposed)
    assoc = ae.associate(node_peer.host, node_peer.port, ae_title=node_peer.aet)
    try:
        assert assoc.is_established
        (context,) = assoc.accepted_contexts
        assert context.transfer_syntax == [proposed[0]]
    finally:
        assoc.release()


def test_a_caller_addressing_another_ae_title_is_refused(node_and_pacs, tmp_path):
    make, pacs, node_peer = node_and_pacs
    make()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = ae.associate(node_peer.host, node_peer.port, ae_title="NOTLUNGXRAY")
    assert not assoc.is_established and assoc.is_rejected
    assert not list((tmp_path / "spool" / "incoming").iterdir()) and not pacs.received


def test_a_resend_is_kept_once_and_a_corrected_resend_is_reported_again(node_and_pacs, tmp_path, caplog):
    make, pacs, node_peer = node_and_pacs
    node = make()
    film = chest_film(tmp_path / "film.dcm", np.full((64, 64), 90, np.uint8))
    send_files([film], node_peer)
    (first,) = pacs.wait_for(1)
    assert send_files([film], node_peer) == [(film, "sent")]  # unchanged: a duplicate, acknowledged
    time.sleep(1.0)
    assert len(pacs.received) == 1
    corrected = pydicom.dcmread(film)
    corrected.PatientID = "P-0043"
    corrected.save_as(tmp_path / "corrected.dcm", enforce_file_format=True)
    with caplog.at_level(logging.WARNING, logger="lungxray.dicom.node"):
        send_files([tmp_path / "corrected.dcm"], node_peer)
        second = pacs.wait_for(2)[1]
    assert second.PatientID == "P-0043" and second.SOPInstanceUID != first.SOPInstanceUID
    assert report_values(second)["source"] == report_values(first)["source"] == corrected.SOPInstanceUID
    assert any("changed identifying attributes" in r.getMessage() for r in caplog.records)
    assert send_files([tmp_path / "corrected.dcm"], node_peer) == [(tmp_path / "corrected.dcm", "sent")]
    time.sleep(1.0)
    assert len(pacs.received) == 2 and not node.spool.waiting()  # the correction, too, is kept once


def test_the_reports_of_one_run_share_a_series_in_each_study(node_and_pacs, tmp_path):
    make, pacs, node_peer = node_and_pacs
    make()
    study = generate_uid()
    films = [chest_film(tmp_path / f"f{i}.dcm", np.full((64, 64), 60 + i, np.uint8), study=study) for i in range(3)]
    films.append(chest_film(tmp_path / "other.dcm", np.full((64, 64), 70, np.uint8)))
    send_files(films, node_peer)
    reports = pacs.wait_for(4)
    in_study = [r for r in reports if r.StudyInstanceUID == study]
    assert len(in_study) == 3 and len({r.SeriesInstanceUID for r in in_study}) == 1
    assert len({r.InstanceNumber for r in in_study}) == 3
    assert len({r.SeriesInstanceUID for r in reports}) == 2 and {r.SeriesNumber for r in reports} == {9901}


def test_a_dx_film_with_a_voi_lut_decodes_without_pydicoms_float_warning(tmp_path):
    pixels = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (64, 1))
    path = make_dicom(tmp_path / "dx.dcm", pixels, bits=16, rescale=(1, 0))  # rescaled: float64 values
    dataset = pydicom.dcmread(path)
    lut = Dataset()
    lut.LUTDescriptor, lut.LUTData = [4096, 0, 8], (np.arange(4096) // 16).astype(np.uint16).tobytes()
    dataset.VOILUTSequence = [lut]
    dataset.save_as(path, enforce_file_format=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = np.asarray(dicom_image(read_dicom(path.read_bytes(), "instance x"), "instance x"))
    assert image[:, :, 0][0, -1] > image[:, :, 0][0, 0]  # the LUT's ramp, dark left


def test_a_film_at_fault_is_one_log_line_naming_its_instance(node_and_pacs, tmp_path, caplog):
    make, _, _ = node_and_pacs
    node = make(start=False)
    uid = generate_uid()
    assert node.spool.accept(uid, b"DICM but not really" * 10) is None
    with caplog.at_level(logging.WARNING, logger="lungxray.dicom.node"):
        node.report([uid])
    (record,) = [r for r in caplog.records if "no report could be made" in r.getMessage()]
    assert record.exc_info is None and "no study to report in" in record.getMessage()
    assert uid not in record.getMessage() and (tmp_path / "spool" / "failed" / f"{uid}.dcm").is_file()


def test_old_sent_markers_are_pruned(tmp_path):
    spool = Spool(tmp_path, 1 << 20)
    old, recent = generate_uid(), generate_uid()
    for uid in (old, recent):
        spool.remember(uid, "0" * 16)
        spool.sent(uid).touch()
    long_ago = time.time() - 40 * 86400
    os.utime(spool.sent(old), (long_ago, long_ago))
    assert spool.prune_sent(30) == 1
    assert not spool.sent(old).exists() and spool.sent(recent).exists()
    assert spool.key_for(old, "0" * 16) == (old, "new") and spool.key_for(recent, "0" * 16) == (recent, "duplicate")
