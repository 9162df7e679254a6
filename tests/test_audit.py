"""The audit on real X-rays with planted problems: it must find each, and nothing else."""

import csv
import json
import random
import shutil

import pytest
from PIL import Image, ImageOps

from lungxray.cli import main
from lungxray.data.audit import audit
from lungxray.data.records import load_dataset
from lungxray.data.split import leakage_free_split
from tests.conftest import CLASSES, CXR, require_shared


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A reference-layout dataset built from ../shared/cxr, with four planted problems."""
    require_shared()
    rows = list(csv.DictReader(open(CXR / "manifest.csv")))
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("planted") / "data"
    for split, n in (("train", 16), ("val", 5), ("test", 8)):
        for label in CLASSES:
            for row in rng.sample([r for r in rows if r["split"] == split and r["label"] == label], n):
                target = root / split / label / row["file"].split("/")[-1]
                target.parent.mkdir(parents=True, exist_ok=True)
                if label == "pneumonia":  # planted: one class entirely in another format
                    Image.open(CXR / row["file"]).save(target.with_suffix(".png"))
                else:
                    shutil.copy(CXR / row["file"], target)
    test_covid = sorted((root / "test" / "covid").iterdir())
    test_normal = sorted((root / "test" / "normal").iterdir())
    # planted: a resized, re-encoded copy of a test image in train
    Image.open(test_covid[0]).resize((512, 512), Image.BILINEAR).save(root / "train" / "covid" / "resized_copy.jpg",
                                                                       quality=80)
    # planted: a mirrored copy of another test image in train
    ImageOps.mirror(Image.open(test_normal[0])).save(root / "train" / "normal" / "mirrored_copy.jpg", quality=90)
    # planted: one picture under two labels
    source = sorted((root / "train" / "covid").iterdir())[3]
    shutil.copy(source, root / "train" / "normal" / "same_picture_other_label.jpg")
    expected = {
        frozenset({f"test/covid/{test_covid[0].name}", "train/covid/resized_copy.jpg"}),
        frozenset({f"test/normal/{test_normal[0].name}", "train/normal/mirrored_copy.jpg"}),
        frozenset({f"train/covid/{source.name}", "train/normal/same_picture_other_label.jpg"}),
    }
    return root, expected


def test_audit_finds_every_planted_problem_and_nothing_else(planted, tmp_path):
    root, expected = planted
    report = audit(load_dataset(root))
    found = {frozenset({d["a"], d["b"]}) for d in report["duplicates"]}
    true_positives = len(found & expected)
    precision, recall = true_positives / max(1, len(found)), true_positives / len(expected)
    assert (precision, recall) == (1.0, 1.0), f"found {found}"
    kinds = {frozenset({d["a"], d["b"]}): d["kind"] for d in report["duplicates"]}
    assert kinds[next(p for p in expected if "train/normal/same_picture_other_label.jpg" in p)] == "exact"
    summary = report["summary"]
    assert sorted(summary["leaked_eval_images"]) == sorted(
        next(iter(p - {"train/covid/resized_copy.jpg", "train/normal/mirrored_copy.jpg"}))
        for p in expected if "train/covid/resized_copy.jpg" in p or "train/normal/mirrored_copy.jpg" in p)
    assert [(d["label_a"], d["label_b"]) for d in summary["label_conflicts"]] in ([("covid", "normal")],
                                                                                [("normal", "covid")])
    formats = {(f["attribute"], f["value"], f["class"]) for f in report["shortcuts"]}
    assert formats == {("format", "PNG", "pneumonia"), ("format", "JPEG", "covid"), ("format", "JPEG", "normal")}
    assert report["counts"]["train"]["covid"] == 17 and not report["unreadable"]


def test_audit_cli_writes_the_contract(planted, tmp_path, capsys):
    root, _ = planted
    (root / "val" / "covid" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    try:
        assert main(["data", "audit", str(root), "--out", str(tmp_path)]) == 0
    finally:
        (root / "val" / "covid" / "broken.jpg").unlink()
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["unreadable"] == [{"file": "val/covid/broken.jpg", "reason": report["unreadable"][0]["reason"]}]
    pair = report["duplicates"][0]
    assert set(pair) >= {"a", "b", "kind", "distance", "split_a", "split_b", "label_a", "label_b"}
    assert "leakage: 2 val/test images have a copy in train" in capsys.readouterr().out
    assert "## Label conflicts" in (tmp_path / "audit.md").read_text()


def test_split_keeps_duplicates_together_and_dedupes(planted, tmp_path):
    root, expected = planted
    dataset = leakage_free_split(load_dataset(root), seed=3)
    split_of = {r.file: r.split for r in dataset.records}
    for pair in expected:
        a, b = sorted(pair)
        assert split_of[a] == split_of[b]
    counts = dataset.counts()
    total = sum(sum(row.values()) for row in counts.values())
    assert abs(sum(counts["train"].values()) / total - 0.7) < 0.08
    deduped = leakage_free_split(load_dataset(root), seed=3, dedupe=True)
    assert len(deduped.records) == len(dataset.records) - 3
    assert main(["data", "split", str(root), "--out", str(tmp_path / "s.csv"), "--dedupe"]) == 0
    assert len(load_dataset(tmp_path / "s.csv").records) == len(dataset.records) - 3


def test_audit_reads_dicom_and_names_non_radiographs(tmp_path):
    import numpy as np

    from tests.test_dicom import make_dicom

    pixels = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (64, 1))
    for label in ("covid", "normal"):
        (tmp_path / "data" / label).mkdir(parents=True)
        make_dicom(tmp_path / "data" / label / "chest.dcm", pixels)
    make_dicom(tmp_path / "data" / "normal" / "mr.dcm", pixels, header={"Modality": "MR"})
    report = audit(load_dataset(tmp_path / "data"))
    assert [u["reason"] for u in report["unreadable"]] == ["MR image (DICOM Modality MR), not a chest radiograph"]
