"""Lung-field localisation: the segmenter trains on a masks folder, the crop box follows the mask,
and a run trained with crop=lungs carries its segmenter and crops the same way when loaded."""

import csv

import keras
import numpy as np
import pytest
from PIL import Image

from lungxray import Config, KerasPredictor, train
from lungxray.model import lungs
from lungxray.data.images import read_image
from lungxray.errors import ConfigError, DataError
from lungxray.model.lungs import SIZE, LungCrop
from tests.conftest import TINY


def bright_region_segmenter() -> keras.Model:
    """A stand-in segmenter whose 'lungs' are the bright pixels: sigmoid(10 * (x/255 - 0.5))."""
    inputs = keras.Input((SIZE, SIZE, 1))
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer=keras.initializers.Constant(10 / 255),
                                  bias_initializer=keras.initializers.Constant(-5.0))(inputs)
    return keras.Model(inputs, outputs)


def film_with_bright_box(width=300, height=200, box=(60, 40, 240, 160)) -> Image.Image:
    pixels = np.full((height, width), 20, np.uint8)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = 230
    return Image.fromarray(pixels).convert("RGB")


def test_crop_box_follows_the_mask_with_a_margin():
    crop = LungCrop(bright_region_segmenter(), runtime="keras")
    left, top, right, bottom = crop(film_with_bright_box())
    # The box (60, 40)-(240, 160) widened by MARGIN (8%) of its size on each side, within a pixel or two.
    assert left == pytest.approx(60 - 0.08 * 180, abs=3) and right == pytest.approx(240 + 0.08 * 180, abs=3)
    assert top == pytest.approx(40 - 0.08 * 120, abs=3) and bottom == pytest.approx(160 + 0.08 * 120, abs=3)


def test_too_little_lung_keeps_the_whole_film():
    crop = LungCrop(bright_region_segmenter(), runtime="keras")
    assert crop(film_with_bright_box(box=(10, 10, 20, 20))) == (0, 0, 300, 200)


def test_read_image_crops_before_resizing(tmp_path):
    path = tmp_path / "film.png"
    film_with_bright_box().save(path)
    image = read_image(path, 64, crop=lambda _: (60, 40, 240, 160))
    assert image.shape == (64, 64, 3) and image.min() == 230


def masks_folder(root, n=12):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        left, top = rng.integers(20, 60, 2)
        film = np.asarray(film_with_bright_box(256, 256, (left, top, left + 150, top + 150)).convert("L"))
        Image.fromarray(film).save(root / "images" / f"{i}.jpg")
        Image.fromarray(np.where(film > 127, 255, 0).astype(np.uint8)).save(root / "masks" / f"{i}.png")
        rows.append([f"images/{i}.jpg", f"masks/{i}.png", "site_a" if i % 2 else "site_b"])
    with open(root / "manifest.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "mask", "source"], *rows])
    return root


def test_segmenter_trains_once_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setitem(lungs.RECIPE, "epochs", 2)
    folder = masks_folder(tmp_path / "masks")
    crop = LungCrop.trained(folder, tmp_path / "cache", runtime="keras")
    (cached,) = (tmp_path / "cache" / "lungs").glob("*.keras")
    report = (tmp_path / "cache" / "lungs").glob("*.json")
    assert "dice" in next(report).read_text()
    monkeypatch.setattr(lungs, "train_segmenter", lambda folder: pytest.fail("trained twice"))
    again = LungCrop.trained(folder, tmp_path / "cache", runtime="keras")
    assert again.fingerprint == crop.fingerprint and cached.is_file()


def test_missing_masks_say_what_to_give(tmp_path):
    with pytest.raises(DataError, match="needs lung_masks"):
        LungCrop.trained(tmp_path / "nothing", tmp_path)
    with pytest.raises(ConfigError, match="crop='lungs' needs lung_masks"):
        Config(crop="lungs", lung_masks=None)


def test_a_cropped_run_crops_again_when_loaded(split_folders, tmp_path, cache_dir, monkeypatch):
    segmenter = bright_region_segmenter()
    monkeypatch.setattr(LungCrop, "trained", classmethod(lambda cls, folder, cache, runtime="auto":
                                                         cls(segmenter, "keras")))
    config = Config(weights="none", image_size=TINY, epochs=1, batch_size=8, dense_units=16, feature_runtime="keras",
                    crop="lungs", lung_masks=str(tmp_path))
    result = train(split_folders, tmp_path / "run", config, cache_dir=cache_dir)
    assert (result.run_dir / "lungs.keras").is_file()
    loaded = KerasPredictor.load(result.run_dir, runtime="keras", cache_dir=cache_dir)
    assert loaded.crop is not None and loaded.crop.fingerprint == LungCrop(segmenter, "keras").fingerprint
    film = sorted(split_folders.rglob("*.png"))[0]
    cropped = read_image(film, TINY, crop=LungCrop(segmenter, "keras"))
    np.testing.assert_array_equal(loaded.read(film), cropped)
    assert not np.array_equal(cropped, read_image(film, TINY))
