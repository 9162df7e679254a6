"""Backbone features computed by Ray workers (`train --extract-engine ray`): the same vectors as one
process, stored in the same cache, and a model trained on them that predicts the same."""

import numpy as np
import pytest

from lungxray import Config, train
from lungxray.cli import main
from lungxray.cluster import RayCluster
from lungxray.errors import ConfigError
from lungxray.model.features import FeatureExtractor
from lungxray.model.network import build_backbone
from tests.conftest import TINY, write_class_folders

pytestmark = pytest.mark.usefixtures("ray_alone")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("cluster") / "data", per_class=6, splits=["train", "val", "test"])


def test_ray_workers_fill_the_cache_with_the_same_features(data, tmp_path):
    backbone = build_backbone("none", TINY)
    paths = sorted(data.rglob("*.png"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    paths.append(tmp_path / "broken.png")
    local = FeatureExtractor(backbone, TINY, cache_dir=tmp_path / "local").extract(paths, views=3)
    on_ray = FeatureExtractor(backbone, TINY, cache_dir=tmp_path / "ray", cluster=RayCluster(workers=2))
    extraction = on_ray.extract(paths, views=3)
    assert extraction.computed == 0  # every vector came back from the cache the workers filled
    assert list((tmp_path / "ray" / "features").glob("*/shard-*.npz"))
    for view in ("orig", "flip", "acq1-2"):  # the film, its mirror image and a variant
        np.testing.assert_array_equal(extraction.vectors[view], local.vectors[view])  # NaN rows alike
    assert [e.path for e in extraction.errors] == [str(tmp_path / "broken.png")]
    assert extraction.hashes == local.hashes


def test_a_model_trained_on_ray_features_predicts_the_same(data, tmp_path, capsys):
    config = Config(weights="none", image_size=TINY, epochs=3, batch_size=8, dense_units=16)
    here = train(data, tmp_path / "here", config, cache_dir=tmp_path / "cache-here")
    config.save(tmp_path / "config.json")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "ray"), "--config", str(tmp_path / "config.json"),
                 "--cache", str(tmp_path / "cache-ray"), "--extract-engine", "ray", "--workers", "2"]) == 0
    assert "run folder" in capsys.readouterr().out
    predictions = [(run / "evaluation" / "predictions.csv").read_text() for run in (here.run_dir, tmp_path / "ray")]
    assert predictions[0].count("\n") == 1 + 3 * 6 and predictions[0] == predictions[1]


def test_ray_features_need_the_cached_engine(data, tmp_path):
    config = Config(weights="none", image_size=TINY, epochs=1, batch_size=8, dense_units=16, engine="keras")
    with pytest.raises(ConfigError, match="only the cached engine"):
        train(data, tmp_path / "run", config, cache_dir=tmp_path / "cache", cluster=RayCluster(workers=1))
