"""The monitoring record: what it holds of an answer, the image and a DICOM header, and nothing that
names a patient or a file; its writer's rotation, permissions and several writers on one file; the
records `serve --records` and `dicom listen --records` write."""

import csv
import hashlib
import json
import os
import stat
import threading

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient

from lungxray.dicom.send import send_files
from lungxray.infer.answer import WITHHELD, Answer
from lungxray.infer.keras_predictor import KerasPredictor
from lungxray.infer.monitoring_record import STRIDE, RecordWriter, age_band, image_statistics, monitoring_record
from lungxray.serve import create_app
from tests.test_dicom_node import chest_film, node_and_pacs, predictor  # noqa: F401 (fixtures)
from tests.test_serve import png_bytes

PRIVATE = ("Doe", "Jane", "P-0042", "19700101", "film.dcm")  # chest_film's patient, and the file's name


def test_a_record_holds_the_answer_the_image_and_the_acquisition_but_no_patient(tmp_path):
    film = pydicom.dcmread(chest_film(tmp_path / "film.dcm", np.full((64, 64), 90, np.uint8), PatientAge="045Y",
                                      PatientSex="F", Manufacturer="ACME", ImagerPixelSpacing=[0.139, 0.139]))
    answer = Answer("film.dcm", "ab" * 32, "model-id", WITHHELD, "gate", {"covid": 0.1, "normal": 0.2, "pneumonia": 0.7},
                    ("pneumonia", "normal"), 0.9, 0.8, True, 0.5)
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 16:] = 255
    record = monitoring_record(answer, image, film)
    assert record["decision"] == WITHHELD and record["predicted"] is None and record["p_pneumonia"] == 0.7
    assert record["set_size"] == 2 and record["ood"] is True and record["ood_score"] == 0.8
    assert record["image_mean"] == pytest.approx(127.5) and record["image_dark"] == record["image_bright"] == 0.5
    assert (record["modality"], record["view_position"], record["manufacturer"]) == ("DX", "PA", "ACME")
    assert (record["age_band"], record["sex"], record["pixel_spacing_mm"]) == ("40-59", "F", 0.139)
    assert record["sop_instance_uid"] == hashlib.sha256(str(film.SOPInstanceUID).encode()).hexdigest()[:16]
    line = json.dumps(record)
    assert not any(private in line for private in PRIVATE) and str(film.SOPInstanceUID) not in line


def test_image_statistics_of_a_grey_film_in_colour_channels_are_its_greys_and_a_photographs_colour_shows():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (224, 224), dtype=np.uint8)
    assert image_statistics(np.stack([grey] * 3, axis=-1)) == image_statistics(grey)
    assert image_statistics(grey)["image_colour"] == 0
    coloured = np.stack([grey, grey, np.zeros_like(grey)], axis=-1)  # a yellow tint
    sampled = coloured[::STRIDE, ::STRIDE].astype(int)
    by_hand = np.abs(sampled - sampled.sum(axis=-1, keepdims=True) // 3).mean()
    assert image_statistics(coloured)["image_colour"] == pytest.approx(by_hand, abs=1e-3) and by_hand > 10


@pytest.mark.parametrize("age, band", [("006M", "0-17"), ("017Y", "0-17"), ("018Y", "18-39"), ("085Y", "80+"),
                                       ("", None), ("45", None)])
def test_age_bands(age, band):
    assert age_band(age) == band


def test_records_rotate_are_private_and_survive_several_writers(tmp_path):
    path = tmp_path / "records.jsonl"
    writers = [RecordWriter(path, max_mb=0.01, keep=3) for _ in range(2)]  # two workers on one file

    def write(writer: RecordWriter, offset: int) -> None:
        for index in range(300):
            writer.write({"n": offset + index, "pad": "x" * 40})

    threads = [threading.Thread(target=write, args=(w, 1000 * i)) for i, w in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    files = sorted(tmp_path.glob("records.jsonl*"))
    assert [f.name for f in files] == ["records.jsonl", "records.jsonl.1", "records.jsonl.2", "records.jsonl.3"]
    assert all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in files)
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]  # every line whole
    assert all(f.stat().st_size < 0.01 * 2**20 + 200 for f in files)
    assert len({line["n"] for line in lines}) == len(lines) > 100  # none written twice


def test_serve_writes_a_record_per_answer(run, tmp_path):
    run_dir, _, cache = run
    records = tmp_path / "records.jsonl"
    client = TestClient(create_app(KerasPredictor.load(run_dir, cache_dir=cache), records=records))
    upload = png_bytes()
    answer = client.post("/api/predict", files={"file": ("secret-name.png", upload, "image/png")}).json()
    client.post("/api/predict", files={"file": ("bad.png", b"not an image", "image/png")})
    (record,) = [json.loads(line) for line in records.read_text().splitlines()]
    assert record["sha256"] == hashlib.sha256(upload).hexdigest() == answer["sha256"]
    assert record["decision"] == answer["decision"] and record["image_mean"] == pytest.approx(128, abs=1)
    assert "secret-name" not in records.read_text()


def test_the_dicom_node_writes_a_record_per_answer(node_and_pacs, tmp_path):
    make, pacs, node_peer = node_and_pacs
    make(records=tmp_path / "records.jsonl")
    films = [chest_film(tmp_path / "film.dcm", np.full((64, 64), 90, np.uint8)),
             chest_film(tmp_path / "lateral.dcm", np.full((64, 64), 90, np.uint8), ViewPosition="LL")]
    send_files(films, node_peer)
    pacs.wait_for(2)
    text = (tmp_path / "records.jsonl").read_text()
    records = {r["view_position"]: r for r in map(json.loads, text.splitlines())}
    assert records["PA"]["modality"] == "DX" and "image_mean" in records["PA"] and "p_covid" in records["PA"]
    assert records["LL"]["decision"] == "not analysed" and "image_mean" not in records["LL"]
    assert not any(private in text for private in PRIVATE)


def test_a_run_saves_its_validation_records_as_its_reference(run):
    run_dir, _, _ = run
    with open(run_dir / "data.csv", newline="") as handle:
        validation = [row for row in csv.DictReader(handle) if row["split"] == "val"]
    reference = [json.loads(line) for line in (run_dir / "reference.jsonl").read_text().splitlines()]
    assert len(reference) == len(validation) > 0
    assert all("image_mean" in r and "p_covid" in r and r["ood_score"] is not None for r in reference)
    assert {r["sha256"] for r in reference} == {hashlib.sha256(open(row["file"], "rb").read()).hexdigest()
                                                for row in validation}


def test_the_dicom_node_counts_its_events_and_shows_the_monitoring_gauges(node_and_pacs, run, tmp_path):
    import time

    import httpx

    from tests.test_distribute import free_ports

    make, pacs, node_peer = node_and_pacs
    port = free_ports(1)[0]
    make(metrics_port=port, monitor_window=30, reference=run[0] / "reference.jsonl", refuse_ood=False)
    films = [chest_film(tmp_path / f"f{i}.dcm", np.tile(np.arange(64, dtype=np.uint8) * (i % 4 + 1), (64, 1)))
             for i in range(30)]
    send_files(films, node_peer)
    pacs.wait_for(30)
    deadline = time.monotonic() + 60
    while "lungxray_monitor_windows 1.0" not in (scraped := httpx.get(f"http://127.0.0.1:{port}/metrics").text):
        assert time.monotonic() < deadline, scraped[-2000:]
        time.sleep(0.2)
    assert 'lungxray_dicom_events_total{event="received"} 30.0' in scraped
    assert "lungxray_monitor_drift_score" in scraped and "lungxray_dicom_spool_bytes" in scraped
