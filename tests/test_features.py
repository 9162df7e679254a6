import keras
import numpy as np
import pytest
from PIL import Image

from lungxray.model.features import FeatureExtractor
from lungxray.model.network import build_backbone
from tests.conftest import TINY, WEIGHTS, require_shared


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("none", TINY)


def files_of(folder):
    return sorted(folder.rglob("*.png"))


def test_litert_matches_keras(tmp_path, split_folders):
    """LiteRT/XNNPACK computes the Keras backbone's function: within 1e-3 absolute on features
    of magnitude ~1-10 (measured ~1e-4 with the real weights)."""
    require_shared()
    backbone = build_backbone(str(WEIGHTS), 64)
    files = files_of(split_folders)[:12]
    keras_features = FeatureExtractor(backbone, 64, runtime="keras", cache_dir=tmp_path).extract(files, views=2).vectors
    litert = FeatureExtractor(backbone, 64, runtime="litert", cache_dir=tmp_path)
    assert litert.runtime.name == "litert"
    litert_features = litert.extract(files, views=2).vectors
    for view in ("orig", "flip"):
        np.testing.assert_allclose(litert_features[view], keras_features[view], atol=1e-3, rtol=1e-4)
    assert not np.allclose(keras_features["orig"], keras_features["flip"])


def test_second_pass_reads_the_cache(backbone, split_folders, cache_dir):
    files = files_of(split_folders)
    first = FeatureExtractor(backbone, TINY, runtime="keras", cache_dir=cache_dir)
    first_pass = first.extract(files, views=2)
    assert first_pass.computed == len(files) and not first_pass.errors
    again = FeatureExtractor(backbone, TINY, runtime="keras", cache_dir=cache_dir)
    second_pass = again.extract(files, views=2)
    assert second_pass.computed == 0
    np.testing.assert_array_equal(second_pass.vectors["flip"], first_pass.vectors["flip"])
    assert second_pass.hashes == first_pass.hashes and len(set(first_pass.hashes)) == len(files)


def test_cache_key_follows_the_weights(split_folders, cache_dir):
    import keras

    keras.utils.set_random_seed(1)
    one = FeatureExtractor(build_backbone("none", TINY), TINY, runtime="keras", cache_dir=cache_dir)
    keras.utils.set_random_seed(2)
    two = FeatureExtractor(build_backbone("none", TINY), TINY, runtime="keras", cache_dir=cache_dir)
    assert one.cache.key != two.cache.key
    files = files_of(split_folders)[:3]
    one.extract(files)
    assert two.extract(files).computed == 3


def test_same_content_under_another_name_is_a_cache_hit(backbone, split_folders, cache_dir, tmp_path):
    files = files_of(split_folders)[:2]
    FeatureExtractor(backbone, TINY, runtime="keras", cache_dir=cache_dir).extract(files)
    copy = tmp_path / "renamed.png"
    copy.write_bytes(files[0].read_bytes())
    again = FeatureExtractor(backbone, TINY, runtime="keras", cache_dir=cache_dir)
    assert again.extract([copy]).computed == 0


def test_unreadable_images_never_enter_the_cache(backbone, split_folders, cache_dir):
    bad = split_folders / "bad.png"
    bad.write_bytes(b"not an image")
    extractor = FeatureExtractor(backbone, TINY, runtime="keras", cache_dir=cache_dir)
    result = extractor.extract([bad, *files_of(split_folders / "train")[:2]])
    assert [e.path for e in result.errors] == [str(bad)] and "not a recognised image" in result.errors[0].reason
    features = result.vectors["orig"]
    assert np.isnan(features[0]).all() and not np.isnan(features[1:]).any()
    assert len(extractor.cache.entries) == 2


def test_corrupt_or_foreign_shards_are_discarded(backbone, split_folders, cache_dir):
    files = files_of(split_folders)[:4]
    extractor = FeatureExtractor(backbone, TINY, runtime="keras", cache_dir=cache_dir)
    extractor.extract(files)
    (shard,) = extractor.cache.folder.glob("shard-*.npz")
    shard.write_bytes(b"half a shard")
    foreign = extractor.cache.folder / "shard-foreign.npz"
    np.savez(foreign, key=np.array("another-key"), hashes=np.array(["x"]), views=np.array(["orig"]),
             features=np.zeros((1, 576), np.float32))
    again = FeatureExtractor(backbone, TINY, runtime="keras", cache_dir=cache_dir)
    assert not again.cache.entries and not shard.exists() and not foreign.exists()
    assert again.extract(files).computed == 4


def test_interrupted_extraction_keeps_finished_shards(backbone, split_folders, cache_dir, monkeypatch):
    import lungxray.model.features as features

    monkeypatch.setattr(features, "SHARD_SIZE", 4)
    files = files_of(split_folders)
    extractor = FeatureExtractor(backbone, TINY, runtime="keras", cache_dir=cache_dir)
    calls = {"n": 0}
    real = extractor.runtime.__class__.__call__

    def failing(self, images):
        calls["n"] += 1
        if calls["n"] > 9:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(extractor.runtime.__class__, "__call__", failing)
    with pytest.raises(KeyboardInterrupt):
        extractor.extract(files)
    monkeypatch.setattr(extractor.runtime.__class__, "__call__", real)
    again = FeatureExtractor(backbone, TINY, runtime="keras", cache_dir=cache_dir)
    assert len(again.cache.entries) == 8  # two full shards of 4 survived
    assert again.extract(files).computed == len(files) - 8


def test_pooling_is_part_of_the_cache_key(tmp_path, cache_dir):
    """Max and average pooling share every weight; their features must not share a cache entry.
    (64 px: at 32 the last feature map is 1x1 and both poolings agree.)"""
    files = [tmp_path / f"{i}.png" for i in range(2)]
    for i, path in enumerate(files):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    pooled = {}
    for pooling in ("max", "avg"):
        keras.utils.set_random_seed(0)  # the same weights for both
        pooled[pooling] = FeatureExtractor(build_backbone("none", 64, pooling), 64, runtime="keras",
                                           cache_dir=cache_dir)
    assert np.array_equal(pooled["max"].runtime.model.get_weights()[0], pooled["avg"].runtime.model.get_weights()[0])
    assert pooled["max"].cache.key != pooled["avg"].cache.key
    vectors = {p: e.extract(files).vectors["orig"] for p, e in pooled.items()}
    assert not np.allclose(vectors["max"], vectors["avg"], rtol=1e-3, atol=0)  # random weights: tiny values


def test_stale_temporary_shards_are_removed(cache_dir):
    import os
    import time

    backbone = build_backbone("none", TINY)
    folder = FeatureExtractor(backbone, TINY, runtime="keras", cache_dir=cache_dir).cache.folder
    stale, fresh = folder / ".tmp-killed-shard.npz", folder / ".tmp-being-written-shard.npz"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    FeatureExtractor(backbone, TINY, runtime="keras", cache_dir=cache_dir)
    assert not stale.exists() and fresh.exists()


def test_further_views_add_to_the_cache(backbone, split_folders, cache_dir):
    """Going from 2 views to 4 computes only views 2 and 3, from the films' variants; a new
    extractor then reads all four back."""
    from lungxray.data.acquisition import read_views

    files = files_of(split_folders)[:6]
    extractor = FeatureExtractor(backbone, TINY, runtime="keras", cache_dir=cache_dir)
    two = extractor.extract(files, views=2)
    four = extractor.extract(files, views=4)
    assert four.computed == len(files) and four.table.shape == (len(files), 4, *extractor.feature_shape)
    np.testing.assert_array_equal(four.table[:, :2], two.table)
    expected = extractor.runtime(read_views(files[0], [2, 3], four.hashes[0], TINY))
    np.testing.assert_allclose(four.table[0, 2:], expected, rtol=1e-4, atol=0)
    assert not np.allclose(four.table[:, 2], four.table[:, 0], rtol=1e-2, atol=0)
    again = FeatureExtractor(backbone, TINY, runtime="keras", cache_dir=cache_dir).extract(files, views=4)
    assert again.computed == 0
    np.testing.assert_array_equal(again.table, four.table)
