"""The DICOM node on loopback, with pynetdicom peers: a film sent to it comes back to the "PACS" as a
Structured Report in the same study whose probabilities are `predict`'s; films it must not classify
get "not analysed"; unknown callers are refused; reports wait while the PACS is away and go when it
is back; a film left in the spool by a crash, or a node SIGKILLed mid-stream, ends with one report per
film."""

import copy
import csv
import io
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from lungxray.cli import main
from lungxray.dicom.heatmap import HeatmapMaker
from lungxray.dicom.node import DicomNode, Limits
from lungxray.dicom.sr import ReportWriter, encoded, report_values, result_report, run_series_uid
from lungxray.dicom.send import Peer, send_files
from lungxray.dicom.spool import Spool
from lungxray.dicom.tls import client_context, server_context
from lungxray.errors import ConfigError, DataError
from lungxray.infer.answer import NOT_ANALYSED, WITHHELD, Answer
from lungxray.infer.identity import ModelIdentity
from lungxray.infer.loader import load_predictor
from tests.conftest import CXR, require_shared
from tests.test_dicom import make_dicom
from tests.test_distribute import free_ports


def outcome(probabilities=None, ood_score=None, ood=None, not_analysed=None, refuse_ood=True) -> Answer:
    """An answer as the node makes it: withheld when the gate flags the film."""
    if not_analysed is not None:
        return Answer("film", None, "ab" * 6, NOT_ANALYSED, not_analysed)
    decision = WITHHELD if ood and refuse_ood else max(probabilities, key=probabilities.get)
    members = tuple(sorted((c for c in probabilities if probabilities[c] >= 0.2), key=probabilities.get, reverse=True))
    return Answer("film", None, "ab" * 6, decision, "gate" if decision == WITHHELD else None, probabilities=probabilities,
                  set=members, coverage=0.9, ood_score=ood_score, ood=ood, ood_threshold=0.5 if ood is not None else None)


class Pacs:
    """A Storage SCP standing in for the PACS: keeps the reports it receives."""

    def __init__(self, port: int, tls=None):
        self.port, self.tls, self.received, self.server = port, tls, [], None

    def start(self) -> "Pacs":
        ae = AE(ae_title="PACS")
        ae.add_supported_context(ComprehensiveSRStorage)
        ae.add_supported_context(SecondaryCaptureImageStorage)

        def store(event):
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            self.received.append(dataset)
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)],
                                     ssl_context=self.tls)
        return self

    def stop(self) -> None:
        self.server.shutdown()

    def wait_for(self, count: int, timeout: float = 60.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.received


def chest_film(path, pixels: np.ndarray, study: str | None = None, bits: int = 8, **header):
    """A DX film of the chest, PA, with a patient's identifiers (which must never reach a log)."""
    return make_dicom(path, pixels, bits=bits, header={
        "StudyInstanceUID": study or generate_uid(), "SeriesInstanceUID": generate_uid(), "PatientID": "P-0042",
        "PatientName": "Doe^Jane", "PatientBirthDate": "19700101", "BodyPartExamined": "CHEST", "ViewPosition": "PA",
        **header})


@pytest.fixture(scope="module")
def predictor(run):
    run_dir, _, cache = run
    return load_predictor(run_dir, cache, keras=True)  # the run's Keras model, whatever exports it has


@pytest.fixture
def node_and_pacs(predictor, tmp_path):
    node_port, pacs_port = free_ports(2)
    pacs = Pacs(pacs_port).start()
    made = []

    def make(start=True, predictor=predictor, **options):
        node = DicomNode(predictor, Peer("PACS", "127.0.0.1", pacs_port), tmp_path / "spool",
                         port=node_port, retry_seconds=0.2, max_retry_seconds=0.5, **options)
        if start:
            node.start()
        made.append(node)
        return node

    yield make, pacs, Peer("LUNGXRAY", "127.0.0.1", node_port)
    for node in made:
        node.stop()
    pacs.stop()


def real_film(tmp_path) -> tuple:
    require_shared()
    row = next(r for r in csv.DictReader(open(CXR / "manifest.csv")) if r["label"] == "pneumonia")
    pixels = np.asarray(Image.open(CXR / row["file"]).convert("L"))
    return chest_film(tmp_path / "film.dcm", pixels), pixels


def test_a_film_comes_back_as_a_report_in_its_study(node_and_pacs, predictor, tmp_path):
    make, pacs, node_peer = node_and_pacs
    make(refuse_ood=False)  # the tiny test run's gate flags real films: with its class shown, the report has it all
    film, _ = real_film(tmp_path)
    assert send_files([film], node_peer) == [(film, "sent")]
    (report,) = pacs.wait_for(1)
    source = pydicom.dcmread(film)
    assert report.StudyInstanceUID == source.StudyInstanceUID and report.SeriesInstanceUID != source.SeriesInstanceUID
    assert report.Modality == "SR" and report.PatientID == "P-0042"
    values = report_values(report)
    assert values["source"] == source.SOPInstanceUID
    expected = predictor.predict_files([film]).probabilities[0]
    got = np.array([values["probabilities"][c] for c in predictor.classes])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    algorithm = values["algorithm"]
    assert values["decision"] in predictor.classes and algorithm["name"] == predictor.identity.name
    assert f"model SHA-256 {predictor.identity.fingerprint}" in algorithm["parameters"]
    assert any("not a medical device" in parameter for parameter in algorithm["parameters"])
    audit = (tmp_path / "spool" / "audit.jsonl").read_text()
    assert [json.loads(line)["event"] for line in audit.splitlines()] == ["received", "reported", "delivered"]
    assert "P-0042" not in audit and "Doe" not in audit and source.SOPInstanceUID not in audit


def test_films_waiting_together_are_each_read_once_and_one_that_breaks_is_set_aside(node_and_pacs, predictor,
                                                                                      tmp_path):
    """The worker answers the films waiting side by side, each parsed once; each report holds what
    that film alone gets, and a film the predictor fails on (not merely an unreadable image) is set
    aside, the others reported."""
    make, pacs, _ = node_and_pacs
    films = [chest_film(tmp_path / f"f{i}.dcm", np.tile(np.arange(64, dtype=np.uint8) * (i + 1), (64, 1)))
             for i in range(5)]
    uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in films]
    reads = []

    class BreaksOnTheThird:  # the predictor, but it fails on the third film
        def __getattr__(self, name):
            return getattr(predictor, name)

        def read(self, source, name=None):
            reads.append(str(source.SOPInstanceUID))
            if str(source.SOPInstanceUID) == uids[2]:
                raise RuntimeError("the runtime failed")
            return predictor.read(source, name)

    node = make(start=False, predictor=BreaksOnTheThird(), refuse_ood=False)
    for uid, film in zip(uids, films):
        assert node.spool.accept(uid, film.read_bytes()) is None
    node.report(uids)
    assert sorted(reads) == sorted(uids)  # each film parsed and decoded once
    assert (tmp_path / "spool" / "failed" / f"{uids[2]}.dcm").is_file()
    reported = {uid: report_values(pydicom.dcmread(node.spool.outbox(uid))) for uid in uids if uid != uids[2]}
    assert set(reported) == set(uids) - {uids[2]} and not node.spool.waiting()
    for uid, film in zip(uids, films):
        if uid in reported:
            alone = predictor.predict_files([film]).probabilities[0]
            np.testing.assert_allclose([reported[uid]["probabilities"][c] for c in predictor.classes], alone,
                                       atol=1e-6)


def test_a_film_it_must_not_classify_gets_not_analysed(node_and_pacs, tmp_path):
    make, pacs, node_peer = node_and_pacs
    make()
    film = chest_film(tmp_path / "lateral.dcm", np.full((64, 64), 90, np.uint8), ViewPosition="LL")
    send_files([film], node_peer)
    values = report_values(pacs.wait_for(1)[0])
    assert values["decision"] == "not analysed" and "lateral" in values["reason"]
    assert not values["probabilities"] and not values["set"]


def test_a_film_it_must_not_classify_can_get_nothing(node_and_pacs, tmp_path):
    make, pacs, node_peer = node_and_pacs
    node = make(not_analysed="nothing")
    lateral = chest_film(tmp_path / "lateral.dcm", np.full((64, 64), 90, np.uint8), ViewPosition="LL")
    film = chest_film(tmp_path / "film.dcm", np.full((64, 64), 90, np.uint8))
    assert send_files([lateral, film], node_peer) == [(lateral, "sent"), (film, "sent")]
    (report,) = pacs.wait_for(1)
    time.sleep(0.5)
    assert len(pacs.received) == 1 and report_values(report)["source"] == pydicom.dcmread(film).SOPInstanceUID
    events = [json.loads(line) for line in (tmp_path / "spool" / "audit.jsonl").read_text().splitlines()]
    (nothing,) = [e for e in events if e["event"] == "not analysed, nothing sent"]
    assert "lateral" in nothing["reason"] and not node.spool.waiting() and not node.spool.undelivered()


def test_a_report_made_again_is_the_same_instance():
    source = pydicom.Dataset()
    source.update({"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(),
                   "SOPInstanceUID": generate_uid(), "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1"})
    answer = outcome({"covid": 0.2, "normal": 0.5, "pneumonia": 0.3})
    model, other = ModelIdentity("run", "1", "ab" * 32), ModelIdentity("run", "1", "cd" * 32)
    first, again = result_report(source, answer, model, "1.2.3"), result_report(source, answer, model, "1.2.3")
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert result_report(source, answer, other, "1.2.3").SOPInstanceUID != first.SOPInstanceUID  # another model
    source.PatientID = "corrected"
    assert result_report(source, answer, model, "1.2.3").SOPInstanceUID != first.SOPInstanceUID  # a corrected film


def elements(dataset: pydicom.Dataset, prefix: str = "") -> dict[str, object]:
    """Every element of a dataset, sequences flattened ("Sequence[0].Keyword"), file meta included."""
    flat = {}
    for element in [*dataset.get("file_meta", []), *dataset]:
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                flat.update(elements(item, f"{prefix}{element.keyword}[{index}]."))
        else:
            flat[prefix + element.keyword] = element.value
    return flat


def test_the_report_writer_gives_highdicoms_report_for_every_film():
    rng = np.random.default_rng(3)
    model = ModelIdentity("run", "1", "ab" * 32)
    outcomes = [outcome(dict(zip(("covid", "normal", "pneumonia"), rng.dirichlet([1, 1, 1]))), float(rng.random()),
                        bool(flagged)) for flagged in (0, 1, 0)]
    outcomes += [outcome({"covid": 0.2, "normal": 0.5, "pneumonia": 0.3}),  # no gate
                 outcome({"covid": 0.7, "normal": 0.2, "pneumonia": 0.1}),
                 outcome(not_analysed="a lateral view"), outcome(not_analysed="unreadable pixels")]
    write = ReportWriter(model, "run")
    names = [None, ("ISO_IR 100", "MÜLLER^JÜRGEN"), ("ISO_IR 192", "Γεωργίου^Αλέξανδρος")]
    for index, answer in enumerate(outcomes):
        source = pydicom.Dataset()
        source.update({"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(),
                       "SOPInstanceUID": generate_uid(), "PatientSex": "MF"[index % 2], "StudyDate": f"2026010{index + 1}",
                       "SOPClassUID": ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1")[index % 2]})
        if names[index % 3]:  # present in some films only: the writer must not keep another film's
            charset, name = names[index % 3]
            source.update({"SpecificCharacterSet": charset, "PatientName": name, "PatientID": f"P-{index}",
                           "AccessionNumber": "A1"})
        written = elements(pydicom.dcmread(io.BytesIO(write(source, answer))))
        series = run_series_uid("run", model, source, "reports")
        built = elements(pydicom.dcmread(io.BytesIO(encoded(result_report(source, answer, model, series, index + 1)))))
        created = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
                   "ContributingEquipmentSequence[0].ContributionDateTime"}
        assert written.keys() == built.keys()
        assert {k: v for k, v in written.items() if k not in created} == {k: v for k, v in built.items()
                                                                          if k not in created}, answer


def test_with_heatmaps_each_classified_film_also_gets_a_grad_cam_capture(node_and_pacs, predictor, tmp_path):
    make, pacs, node_peer = node_and_pacs
    predictor = copy.copy(predictor)
    predictor.ood = None  # the tiny test run's gate withholds real films, and a withheld film gets no heat map
    make(predictor=predictor, heatmap=HeatmapMaker(predictor))
    require_shared()
    rows = list(csv.DictReader(open(CXR / "manifest.csv")))
    films = [chest_film(tmp_path / f"{label}.dcm", np.asarray(Image.open(CXR / row["file"]).convert("L")))
             for label in predictor.classes for row in [next(r for r in rows if r["label"] == label)]]
    lateral = chest_film(tmp_path / "lateral.dcm", np.full((64, 64), 90, np.uint8), ViewPosition="LL")
    send_files([*films, lateral], node_peer)
    deadline = time.monotonic() + 60
    while sum(d.Modality == "SR" for d in pacs.received) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a capture goes before its report: none may still be coming
    decisions = {r.StudyInstanceUID: report_values(r)["decision"] for r in pacs.received if r.Modality == "SR"}
    captures = {c.StudyInstanceUID: c for c in pacs.received if c.SOPClassUID == SecondaryCaptureImageStorage}
    classified = {study for study, decision in decisions.items() if decision in predictor.classes}
    assert len(decisions) == 4 and classified and set(captures) == classified  # none for a lateral or withheld film
    for film in films:
        source = pydicom.dcmread(film)
        if source.StudyInstanceUID not in captures:
            continue
        capture = captures[source.StudyInstanceUID]
        assert capture.BurnedInAnnotation == "YES" and capture.PatientID == source.PatientID
        pixels = capture.pixel_array
        assert pixels.shape[0] > 512 and pixels.shape[1:] == (512, 3)
        assert (pixels[512:] > 200).any()  # the decision and the notice, burned in below the image
        shown = np.asarray(Image.fromarray(pixels[:512]).convert("L").resize((predictor.image_size,) * 2))
        seen = predictor.read(film).mean(axis=-1)
        assert np.corrcoef(shown.ravel(), seen.ravel())[0, 1] > 0.5  # the film the model saw, under the map
        assert pixels[:512].std(axis=-1).mean() > 5  # coloured by the heat map, not a grey film


def test_unknown_callers_are_refused(node_and_pacs, tmp_path):
    make, pacs, node_peer = node_and_pacs
    make(allow=["MODALITY1"])
    film = chest_film(tmp_path / "film.dcm", np.full((64, 64), 90, np.uint8))
    with pytest.raises(DataError, match="refused or did not answer"):
        send_files([film], node_peer, aet="STRANGER")
    assert send_files([film], node_peer, aet="MODALITY1") == [(film, "sent")]
    assert len(pacs.wait_for(1)) == 1


def delivered(node, seconds: float = 10) -> bool:
    """Whether the outbox empties: a report is marked sent just after the PACS acknowledges it."""
    deadline = time.monotonic() + seconds
    while node.spool.undelivered() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not node.spool.undelivered()


def test_reports_wait_while_the_pacs_is_away(node_and_pacs, tmp_path):
    make, pacs, node_peer = node_and_pacs
    pacs.stop()
    node = make()
    films = [chest_film(tmp_path / f"f{i}.dcm", np.full((64, 64), 40 * i, np.uint8)) for i in range(3)]
    send_files(films, node_peer)
    deadline = time.monotonic() + 60
    while len(node.spool.undelivered()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(node.spool.undelivered()) == 3 and not pacs.received
    pacs.start()
    assert len(pacs.wait_for(3)) == 3
    assert delivered(node)


def test_a_crash_loses_nothing_and_repeats_nothing(node_and_pacs, tmp_path):
    make, pacs, node_peer = node_and_pacs
    node = make(start=False)  # as a node killed after receiving: films in incoming/, nothing reported
    films = [chest_film(tmp_path / f"f{i}.dcm", np.full((64, 64), 50 + i, np.uint8)) for i in range(2)]
    for film in films:
        node.spool.accept(str(pydicom.dcmread(film).SOPInstanceUID), film.read_bytes())
    node.start()
    assert len(pacs.wait_for(2)) == 2
    node.stop()
    again = make()
    send_files(films, node_peer)  # the modality sends the same films again: answered once already
    time.sleep(1.0)
    again.stop()
    assert len(pacs.received) == 2


def test_instances_over_the_limits_are_refused_with_a_failure_status(node_and_pacs, tmp_path):
    make, pacs, node_peer = node_and_pacs
    make(limits=Limits(max_instance_mb=0.002))  # 2 KB: a 64 x 64 film is larger
    film = chest_film(tmp_path / "film.dcm", np.full((64, 64), 90, np.uint8))
    assert send_files([film], node_peer) == [(film, "refused (status 0xA700)")]
    spool = Spool(tmp_path / "small", max_bytes=6000)
    assert spool.accept("1.2.3", b"x" * 5000) is None
    assert spool.accept("1.2.4", b"x" * 5000) == "spool full (0 MB)"
    assert spool.accept("1.2.3", b"x" * 5000) is None and spool.waiting() == ["1.2.3"]  # sent again: kept once
    assert spool.accept("../../etc/passwd", b"x") == "SOP Instance UID '../../etc/passwd' is not a UID"
    spool.reported("1.2.3", b"r" * 100)
    assert spool.size() == 100 == Spool(tmp_path / "small", max_bytes=6000).size()  # kept, and counted again at start
    assert spool.accept("1.2.4", b"x" * 5000) is None  # room again once the film was reported
    spool.delivered("1.2.3")
    assert spool.size() == 5000
    time.sleep(0.5)
    assert not pacs.received


def certificate(folder, name: str):
    """A self-signed certificate for 127.0.0.1 and its key, made by openssl."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(cert), str(key)


def test_films_and_reports_are_on_the_disk_before_the_spool_answers(tmp_path, monkeypatch):
    """Each kept film and report is fsynced, then moved into place, then its folder fsynced."""
    import os

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    assert spool.accept("1.2.3", b"film") is None
    spool.reported("1.2.3", b"report")
    names = [os.path.basename(p) for p in synced]
    assert len(names) == 4 and names[0].startswith(".tmp-") and names[0].endswith("1.2.3.dcm")
    assert names[1] == "incoming" and names[2].startswith(".tmp-") and names[3] == "outbox"


def test_tls_associations(node_and_pacs, tmp_path):
    make, pacs, node_peer = node_and_pacs
    node_cert, node_key = certificate(tmp_path, "node")
    caller_cert, caller_key = certificate(tmp_path, "caller")
    make(tls=server_context(node_cert, node_key, ca=caller_cert))  # callers must show the caller certificate
    film = chest_film(tmp_path / "film.dcm", np.full((64, 64), 90, np.uint8))
    with pytest.raises(DataError, match="refused or did not answer"):
        send_files([film], node_peer)  # plain TCP to a TLS node
    with pytest.raises(DataError, match="refused or did not answer"):
        send_files([film], node_peer, tls=client_context(node_cert))  # TLS, but no certificate of its own
    assert send_files([film], node_peer, tls=client_context(node_cert, caller_cert, caller_key)) == [(film, "sent")]
    assert len(pacs.wait_for(1)) == 1
    with pytest.raises(ConfigError, match="cannot load the TLS files"):
        server_context(str(tmp_path / "absent.pem"), node_key)


def test_reports_go_to_a_pacs_over_tls(node_and_pacs, tmp_path):
    make, pacs, node_peer = node_and_pacs
    pacs_cert, pacs_key = certificate(tmp_path, "pacs")
    pacs.stop()
    pacs.tls = server_context(pacs_cert, pacs_key)
    pacs.start()
    node = make(send_tls=client_context(pacs_cert))
    film = chest_film(tmp_path / "film.dcm", np.full((64, 64), 90, np.uint8))
    assert send_files([film], node_peer) == [(film, "sent")]
    assert len(pacs.wait_for(1)) == 1 and delivered(node)


def test_heatmaps_with_an_export_are_refused_in_one_line(capsys, export):
    assert main(["dicom", "listen", "--model", str(export), "--heatmap", "--send-to", "PACS@127.0.0.1:1"]) == 2
    assert "--heatmap needs the Keras model" in capsys.readouterr().err


def test_a_port_in_use_is_one_line(node_and_pacs, capsys, export):
    make, _, node_peer = node_and_pacs
    make()
    assert main(["dicom", "listen", "--model", str(export), "--port", str(node_peer.port), "--send-to",
                 "PACS@127.0.0.1:1"]) == 2
    assert f"cannot listen on 127.0.0.1:{node_peer.port}" in capsys.readouterr().err


def test_peer_addresses_are_checked():
    assert Peer.parse("ORTHANC@127.0.0.1:4242") == Peer("ORTHANC", "127.0.0.1", 4242)
    for text in ("ORTHANC", "ORTHANC@host", "@h:1", "A@h:0", "WAY_TOO_LONG_AE_TITLE@h:1"):
        with pytest.raises(ConfigError):
            Peer.parse(text)


def test_send_names_what_is_not_dicom(node_and_pacs, tmp_path):
    make, _, node_peer = node_and_pacs
    make()
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM")
    film = chest_film(tmp_path / "film.dcm", np.full((64, 64), 90, np.uint8))
    results = dict(send_files([text, film], node_peer))
    assert results[film] == "sent" and results[text].startswith("not a DICOM file")


def listen(export, spool, port: int, pacs_port: int, send_to_aet: str = "PACS", allow: list[str] = (),
           refuse_ood: bool = True, options: tuple[str, ...] = ()):
    """`lungxray dicom listen` as its own process, once it accepts associations."""
    allowed = [argument for aet in allow for argument in ("--allow", aet)] + ([] if refuse_ood else ["--no-refuse-ood"])
    process = subprocess.Popen([sys.executable, "-c", CHILD, "dicom", "listen", "--model", str(export), "--port",
                                str(port), "--send-to", f"{send_to_aet}@127.0.0.1:{pacs_port}", "--spool", str(spool),
                                *allowed, *options], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert "listening as LUNGXRAY" in process.stdout.readline()
    return process


CHILD = "import sys\nfrom lungxray.cli import main\nsys.exit(main(sys.argv[1:]))"


def test_the_node_killed_mid_stream_reports_every_film_once(export, tmp_path):
    node_port, pacs_port = free_ports(2)
    pacs = Pacs(pacs_port).start()
    films = [chest_film(tmp_path / f"f{i:02d}.dcm", np.full((64, 64), 3 * i, np.uint8)) for i in range(24)]
    uids = {str(pydicom.dcmread(f).SOPInstanceUID) for f in films}
    node = listen(export, tmp_path / "spool", node_port, pacs_port)
    try:
        sender = subprocess.run([sys.executable, "-c", CHILD, "dicom", "send", *map(str, films[:12]), "--to",
                                 f"LUNGXRAY@127.0.0.1:{node_port}"], capture_output=True, text=True, timeout=120)
        assert sender.returncode == 0 and sender.stdout.count(": sent") == 12, sender.stdout + sender.stderr
        node.send_signal(signal.SIGKILL)  # whatever was received, reported or in flight
        node.wait()
        node = listen(export, tmp_path / "spool", node_port, pacs_port)
        assert send_files(films[12:], Peer("LUNGXRAY", "127.0.0.1", node_port)) == [(f, "sent") for f in films[12:]]
        received = pacs.wait_for(24)
        time.sleep(1.0)  # time for a second report, were one coming
        # One report per film. A report whose delivery the kill interrupted may arrive again, but as the
        # same instance (same SOP Instance UID), which a PACS stores once.
        reports: dict = {}
        for report in received:
            reports.setdefault(report_values(report)["source"], set()).add(str(report.SOPInstanceUID))
        assert set(reports) == uids and all(len(r) == 1 for r in reports.values())
        assert len(received) - 24 <= 1  # at most the one in flight when the node was killed
    finally:
        node.terminate()
        node.wait(timeout=30)
        pacs.stop()
    assert node.returncode == 0  # SIGTERM: a clean stop
