"""Evaluation as a reviewer wants it: subgroups, overlap, held-out source, HTML report, comparison."""

import csv
import json
from html.parser import HTMLParser

import pytest

from lungxray import Config, KerasPredictor, train
from lungxray.cli import main
from lungxray.evaluate.evaluation import evaluate
from tests.conftest import TINY, write_class_folders


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Synthetic images in a manifest with `source` (three sites) and `split` columns."""
    root = write_class_folders(tmp_path_factory.mktemp("m") / "images", per_class=24)
    rows = []
    for i, path in enumerate(sorted(root.rglob("*.png"))):
        index = int(path.stem.split("_")[1])
        split = "train" if index < 14 else "val" if index < 19 else "test"
        site = "site_c" if index % 8 == 7 else "site_a" if index % 2 else "site_b"
        rows.append([path.relative_to(root).as_posix(), path.parent.name, split, site])
    path = root / "manifest.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "split", "source"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def runs(manifest, tmp_path_factory):
    folder, cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("cache")
    config = Config(weights="none", image_size=TINY, epochs=3, batch_size=8, dense_units=16, feature_runtime="keras")
    plain = train(manifest, folder / "plain", config, cache_dir=cache)
    held = train(manifest, folder / "held", config.replace(holdout_source="site_c", seed=5), cache_dir=cache)
    return plain, held, cache


def test_training_writes_calibration_and_subgroups(runs):
    plain, _, _ = runs
    info = json.loads((plain.run_dir / "model.json").read_text())
    assert 0.05 <= info["temperature"] <= 20
    metrics = plain.test_metrics
    assert set(metrics["subgroups"]["source"]) == {"site_a", "site_b", "site_c"}
    group = metrics["subgroups"]["source"]["site_c"]
    assert group["too_small"] and group["n"] == sum(group["counts"].values())
    # The flagged shares of the groups add up to the flagged share overall.
    groups = metrics["subgroups"]["source"].values()
    assert sum(g["ood_flag_rate"] * g["n"] for g in groups) == pytest.approx(metrics["ood"]["flagged"])
    assert metrics["calibration"]["temperature"] == info["temperature"]
    assert "ece" in metrics["calibration_before_scaling"]
    assert metrics["overlap_with_training"] == {**metrics["overlap_with_training"], "known": True, "images": 0}


def test_holdout_source_is_never_trained_on(runs, manifest):
    _, held, _ = runs
    trained_files = {row["file"] for row in csv.DictReader(open(held.run_dir / "data.csv"))}
    sources = {row["file"]: row["source"] for row in csv.DictReader(open(manifest))}
    assert all(sources[f.split("images/")[-1]] != "site_c" for f in trained_files)
    external = held.external_metrics
    assert external["n"] == sum(1 for s in sources.values() if s == "site_c")
    report = (held.run_dir / "report.md").read_text()
    assert "External test: source `site_c`" in report and "Internal test split" in report


def test_overlap_with_training_is_reported(runs, manifest, tmp_path):
    plain, _, cache = runs
    predictor = KerasPredictor.load(plain.run_dir, runtime="keras", cache_dir=cache)
    metrics = evaluate(predictor, manifest, tmp_path, split="train", resamples=20)
    assert metrics["overlap_with_training"]["images"] == metrics["n"] == 14 * 3


class Sections(HTMLParser):
    def __init__(self):
        super().__init__()
        self.headings, self.images, self._in_h2 = [], [], False

    def handle_starttag(self, tag, attrs):
        self._in_h2 = tag == "h2"
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data.strip())
            self._in_h2 = False


def test_html_report_has_every_section_and_embedded_image(runs):
    plain, _, _ = runs
    parser = Sections()
    parser.feed((plain.run_dir / "evaluation" / "report.html").read_text())
    assert parser.headings == ["Data", "Headline metrics", "Curves", "Confusion matrices", "Calibration", "Subgroups",
                               "Model card"]
    alts = [i["alt"] for i in parser.images]
    assert alts == ["ROC curves", "PR curves", "confusion matrix", "row-normalised confusion matrix",
                    "reliability diagram"]
    assert all(i["src"].startswith("data:image/png;base64,") and len(i["src"]) > 2000 for i in parser.images)


def test_evaluate_by_column_from_the_cli(runs, manifest, tmp_path, capsys):
    plain, _, cache = runs
    assert main(["evaluate", "--model", str(plain.run_dir), "--data", str(manifest), "--split", "test",
                 "--by", "source", "--out", str(tmp_path), "--cache", str(cache)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["subgroups"]["source"]) == {"site_a", "site_b", "site_c"}
    assert main(["evaluate", "--model", str(plain.run_dir), "--data", str(manifest), "--by", "hospital",
                 "--out", str(tmp_path), "--cache", str(cache)]) == 2
    assert "no such column" in capsys.readouterr().err


def test_compare_is_paired_and_flags_significance(runs, capsys):
    plain, held, _ = runs
    assert main(["compare", str(plain.run_dir), str(plain.run_dir), "--resamples", "50"]) == 0
    out = capsys.readouterr().out
    assert "Δ +0.0000 (+0.0000–+0.0000)" in out and "*" not in out.split("\n")[-3]


def test_compare_refuses_runs_without_shared_images(runs, tmp_path, capsys):
    plain, held, _ = runs
    (tmp_path / "predictions.csv").write_text("file,label,predicted,p_covid,p_normal,p_pneumonia\n"
                                              "x.png,covid,covid,0.9,0.05,0.05\n")
    assert main(["compare", str(plain.run_dir), str(tmp_path)]) == 2
    assert "share no evaluated images" in capsys.readouterr().err


def test_lung_occlusion_is_reported(runs, manifest, tmp_path, capsys):
    plain, _, cache = runs
    assert main(["evaluate", "--model", str(plain.run_dir), "--data", str(manifest), "--split", "test",
                 "--occlude-lungs", "--out", str(tmp_path), "--cache", str(cache)]) == 0
    occlusion = json.loads((tmp_path / "metrics.json").read_text())["occlusion"]
    assert 0 <= occlusion["accuracy_occluded"] <= 1 and occlusion["box"] == [0.10, 0.15, 0.90, 0.85]
    assert "with the lungs blacked out" in capsys.readouterr().out
