import csv

import numpy as np
import pytest
from PIL import Image

from lungxray.cli import main
from lungxray.evaluate.probe import probe
from lungxray.data.records import load_dataset
from lungxray.evaluate.evaluation import occlude
from lungxray.model.features import FeatureExtractor
from lungxray.model.network import build_backbone
from tests.conftest import CLASSES, WEIGHTS, require_shared, synthetic_image


@pytest.fixture
def confounded(tmp_path):
    """Within every class, 'framed' images carry a bright frame (a hospital's marker); 'coin' is random."""
    rng = np.random.default_rng(0)
    rows = []
    for index, label in enumerate(CLASSES):
        for i in range(40):
            image = synthetic_image(index, rng, size=64)
            site = "framed" if i % 2 else "plain"
            if site == "framed":
                image[:4], image[-4:], image[:, :4], image[:, -4:] = 255, 255, 255, 255
            path = tmp_path / f"{label}_{i}.png"
            Image.fromarray(image).save(path)
            rows.append([path.name, label, site, rng.choice(["heads", "tails"])])
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        csv.writer(handle).writerows([["file", "label", "site", "coin"], *rows])
    return manifest


def test_probe_detects_a_planted_confounder_and_not_a_random_column(confounded, tmp_path):
    require_shared()
    extractor = FeatureExtractor(build_backbone(str(WEIGHTS), 64), 64, runtime="keras", cache_dir=tmp_path / "c")
    dataset = load_dataset(confounded)
    site = probe(dataset, "site", extractor)
    coin = probe(dataset, "coin", extractor)
    for label in CLASSES:
        assert site["classes"][label]["balanced_accuracy"] > 0.9
        assert coin["classes"][label]["balanced_accuracy"] < 0.75
        assert site["classes"][label]["chance_balanced_accuracy"] == 0.5


def test_probe_cli_needs_the_column(confounded, capsys):
    assert main(["data", "probe", str(confounded), "--by", "hospital", "--weights", "none"]) == 2
    assert "no such column" in capsys.readouterr().err


def test_occlude_blacks_out_the_centre_only():
    images = np.full((2, 100, 100, 3), 200, np.uint8)
    out = occlude(images)
    assert (out[:, 10:90, 15:85] == 0).all()
    assert (out[:, :10] == 200).all() and (out[:, :, :15] == 200).all() and (out[:, 90:] == 200).all()
    assert (images == 200).all()
