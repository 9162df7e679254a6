"""Scoring an archive into Parquet parts (`lungxray predict --out`): every input kind, unreadable
files as rows, resuming, damaged parts, and the same table from a local 2-worker Ray instance."""

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lungxray.infer.batch import PART_GLOB, score
from lungxray.cli import main
from lungxray.cluster import RayCluster
from lungxray.infer.lite_predictor import LitePredictor
from lungxray.model.ood import OutOfDistribution


@pytest.fixture
def inputs(run, tmp_path):
    """A folder, a manifest CSV (relative paths), a Parquet list and a broken file: 36 images + 1."""
    data = run[1]
    manifest = data / "val" / "list.csv"
    with open(manifest, "w", newline="") as handle:
        csv.writer(handle).writerows([["file"]] + [[f"covid/{p.name}"] for p in sorted((data / "val" / "covid").glob("*.png"))])
    listed = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": [str(p) for p in sorted((data / "val" / "normal").glob("*.png"))]}), listed)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    return [str(data / "train"), str(manifest), str(listed), str(broken)]


def table_of(out):
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob(PART_GLOB))]).sort_by("file")


def test_scores_every_input_once_and_resumes(export, inputs, tmp_path):
    out = tmp_path / "scored"
    first = score(export, inputs, out, batch_size=10)
    assert (first.scored, first.skipped, first.errors) == (24 + 8 + 8 + 1, 0, 1)
    table = table_of(out)
    assert table.num_rows == 41 and len(set(table.column("file").to_pylist())) == 41
    broken = table.filter(pa.compute.ends_with(table.column("file"), "broken.png")).to_pylist()[0]
    assert "not a recognised image format" in broken["error"] and broken["p_covid"] is None and broken["sha256"] is None
    good = table.filter(table.column("error").is_null())
    files = good.column("file").to_pylist()
    expected = LitePredictor.load(export).predict_files(files)
    got = np.stack([good.column(f"p_{c}").to_numpy() for c in ("covid", "normal", "pneumonia")], axis=1)
    np.testing.assert_allclose(got, expected.probabilities, atol=1e-6)
    assert good.column("sha256").to_pylist() == expected.hashes
    assert good.column("ood").null_count == 0

    again = score(export, inputs, out, batch_size=10)
    assert (again.scored, again.skipped) == (0, 41)

    parts = sorted(out.glob(PART_GLOB))
    lost, damaged = (pq.read_table(part).num_rows for part in parts[:2])
    parts[0].unlink()  # as if the job had been killed before writing this batch
    parts[1].write_bytes(b"half a parquet file")  # and this one damaged
    resumed = score(export, inputs, out, batch_size=10, write_csv=True)
    assert (resumed.scored, resumed.skipped) == (lost + damaged, 41 - lost - damaged)
    assert [p.name for p in out.glob("*.bad")] == [parts[1].name + ".bad"] and table_of(out).num_rows == 41
    with open(resumed.csv) as handle:
        assert sum(1 for _ in csv.DictReader(handle)) == 41
    records = [json.loads(line) for part in sorted((out / "records").glob("part-*.jsonl"))
               for line in part.read_text().splitlines()]  # a record per answer, none twice after the resume
    assert len(records) == 41 and len({r["sha256"] for r in records if r["sha256"]}) == 40
    assert sum("image_mean" in r for r in records) == 40 and sum(r["decision"] == "not analysed" for r in records) == 1


@pytest.mark.usefixtures("ray_alone")
def test_ray_with_two_workers_gives_the_local_table(export, inputs, tmp_path):
    local = score(export, inputs, tmp_path / "local", batch_size=8)
    on_ray = score(export, inputs, tmp_path / "ray", RayCluster(workers=2), batch_size=8)
    assert (on_ray.scored, on_ray.errors) == (local.scored, local.errors)
    a, b = table_of(tmp_path / "local"), table_of(tmp_path / "ray")
    assert a.column_names == b.column_names and a.column("file").equals(b.column("file"))
    for name in ("p_covid", "p_normal", "p_pneumonia", "ood_score"):
        np.testing.assert_allclose(b.column(name).to_numpy(zero_copy_only=False),
                                   a.column(name).to_numpy(zero_copy_only=False), atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "ray").glob(PART_GLOB)) == \
        sorted(p.name for p in (tmp_path / "local").glob(PART_GLOB))


@pytest.mark.usefixtures("ray_alone")  # it needs no Ray instance running
def test_cli_scoring_and_what_it_refuses(export, inputs, tmp_path, capsys):
    assert main(["predict", "--model", str(export), "--out", str(tmp_path / "o"), "--format", "csv", *inputs]) == 0
    assert "scored 41 files (1 unreadable" in capsys.readouterr().out and (tmp_path / "o" / "predictions.csv").is_file()
    assert main(["predict", "--model", str(export), "--engine", "ray", *inputs]) == 2
    assert "give --out DIR" in capsys.readouterr().err
    assert main(["predict", "--model", str(export), "--out", str(tmp_path / "o"), "--batch-size", "0", *inputs]) == 2
    capsys.readouterr()
    assert main(["predict", "--model", str(export), "--out", str(tmp_path / "new"), "--engine", "ray",
                 "--address", "auto", *inputs]) == 2  # no Ray instance runs here
    assert "cannot reach the Ray cluster at --address auto" in capsys.readouterr().err


def test_refuse_ood_keeps_the_flag_and_withholds_the_class(export, inputs, tmp_path, monkeypatch):
    predictor = LitePredictor.load(export)
    gate = predictor.ood
    gate.threshold = float(np.median(predictor.predict_files(sorted(Path(inputs[0]).rglob("*.png"))).ood_score))
    monkeypatch.setattr(OutOfDistribution, "load", classmethod(lambda cls, path: gate))  # half of them flagged
    score(export, [inputs[0]], tmp_path / "o", refuse_ood=True)
    table = table_of(tmp_path / "o")
    flagged = table.filter(table.column("ood"))
    assert 0 < flagged.num_rows < table.num_rows
    assert flagged.column("predicted").null_count == flagged.num_rows == flagged.column("p_covid").null_count
    assert flagged.column("ood_score").null_count == 0
    kept = table.filter(pa.compute.invert(table.column("ood")))
    assert kept.column("predicted").null_count == 0 and kept.column("p_covid").null_count == 0
