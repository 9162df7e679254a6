"""Lung-field localisation: a small U-Net, trained on films with lung masks (../shared/lungmasks),
finds the lungs; the classifier then sees the box around them instead of the whole film, so that
borders, burned-in text, markers, devices and body habitus carry less of the signal.

    crop = LungCrop.trained(masks_folder, cache_dir)   # trained once (~2 min here), then cached
    box = crop(pil_image)                               # (left, top, right, bottom), with a margin

The U-Net follows keras.io's "Image segmentation with a U-Net-like architecture", at 128x128 grey.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from lungxray.config import default_cache_dir
from lungxray.errors import DataError, WeightsError
from lungxray.model.features import ModelRuntime
from lungxray.io import atomic_path

log = logging.getLogger("lungxray")

SIZE = 128
RECIPE = {"version": 1, "size": SIZE, "filters": [8, 16, 32, 64], "epochs": 40, "batch_size": 16,
          "learning_rate": 1e-3, "val_share": 0.15, "seed": 0}
MARGIN = 0.08  # of the box's size, on each side: the lung edges (costophrenic angles, apices) stay in
MIN_LUNG_FRACTION = 0.05  # a mask smaller than this is not trusted: the whole image is kept


def build_segmenter(size: int = SIZE, filters=tuple(RECIPE["filters"])) -> keras.Model:
    """U-Net: grey image in [0, 255] -> per-pixel lung probability."""
    inputs = keras.Input((size, size, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    skips = []
    for width in filters[:-1]:
        x = _convolutions(x, width)
        skips.append(x)
        x = keras.layers.MaxPooling2D()(x)
    x = _convolutions(x, filters[-1])
    for width, skip in zip(reversed(filters[:-1]), reversed(skips)):
        x = keras.layers.Concatenate()([keras.layers.UpSampling2D()(x), skip])
        x = _convolutions(x, width)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs, name="lung_segmenter")


def _convolutions(x, width: int):
    for _ in range(2):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Activation("relu")(x)
    return x


def load_masks(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(grey images (n, SIZE, SIZE, 1) uint8, masks (n, SIZE, SIZE, 1) float32 in {0, 1}, sources)."""
    manifest = Path(folder) / "manifest.csv"
    if not manifest.is_file():
        raise DataError(f"{manifest} does not exist; lung masks need a folder with manifest.csv, images/ and masks/")
    images, masks, sources = [], [], []
    for row in csv.DictReader(open(manifest)):
        images.append(_grey(Image.open(Path(folder) / row["image"])))
        mask = Image.open(Path(folder) / row["mask"]).convert("L").resize((SIZE, SIZE), Image.Resampling.NEAREST)
        masks.append((np.asarray(mask) > 127).astype(np.float32))
        sources.append(row.get("source", ""))
    return np.stack(images)[..., None], np.stack(masks)[..., None], sources


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L").resize((SIZE, SIZE), Image.Resampling.BILINEAR), np.uint8)


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    predicted, truth = predicted > 0.5, truth > 0.5
    total = predicted.sum() + truth.sum()
    return float(2 * (predicted & truth).sum() / total) if total else 1.0


def train_segmenter(folder: Path) -> tuple[keras.Model, dict]:
    """The U-Net trained on `folder`'s masks, and its Dice per source on a held-back share."""
    keras.utils.set_random_seed(RECIPE["seed"])
    images, masks, sources = load_masks(folder)
    order = np.random.default_rng(RECIPE["seed"]).permutation(len(images))
    n_val = int(len(images) * RECIPE["val_share"])
    val, fit = order[:n_val], order[n_val:]
    model = build_segmenter()
    model.compile(optimizer=keras.optimizers.Adam(RECIPE["learning_rate"]), loss="binary_crossentropy")
    model.fit(_augmented(images[fit], masks[fit]), validation_data=(images[val].astype(np.float32), masks[val]),
              epochs=RECIPE["epochs"], shuffle=False, verbose=2)  # the dataset shuffles itself
    predicted = model.predict(images[val].astype(np.float32), verbose=0)
    report = {"train_images": len(fit), "val_images": len(val), "dice": {}}
    for source in sorted(set(sources)):
        rows = [i for i, v in enumerate(val) if sources[v] == source]
        if rows:
            report["dice"][source] = float(np.mean([dice(predicted[i], masks[val[i]]) for i in rows]))
    return model, report


def _augmented(images: np.ndarray, masks: np.ndarray) -> tf.data.Dataset:
    """Batches where image and mask move together (flip, rotation, zoom, shift) and the image's
    contrast varies, so the U-Net meets films unlike the few it learns from."""
    spatial = keras.Sequential([keras.layers.RandomFlip("horizontal", seed=1),
                                keras.layers.RandomRotation(0.04, fill_mode="constant", seed=2),
                                keras.layers.RandomZoom(0.15, fill_mode="constant", seed=3),
                                keras.layers.RandomTranslation(0.08, 0.08, fill_mode="constant", seed=4)])
    contrast = keras.layers.RandomContrast(0.4, seed=5)

    def augment(image, mask):
        both = spatial(tf.concat([tf.cast(image, tf.float32), mask * 255.0], axis=-1), training=True)
        image = tf.clip_by_value(contrast(both[..., :1], training=True), 0.0, 255.0)
        return image, tf.cast(both[..., 1:] > 127.5, tf.float32)

    data = tf.data.Dataset.from_tensor_slices((images, masks)).shuffle(len(images), seed=RECIPE["seed"])
    return data.batch(RECIPE["batch_size"]).map(augment, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


class LungCrop:
    """Called on a decoded image, returns the box around its lung fields (with MARGIN), or the
    whole image when the segmenter finds too little lung to trust."""

    def __init__(self, segmenter: keras.Model, runtime: str = "auto", cache_dir: Path | None = None):
        self.segmenter = segmenter
        self.runtime = ModelRuntime(segmenter, runtime, cache_dir)
        self.fingerprint = self.runtime.fingerprint

    def mask(self, image: Image.Image) -> np.ndarray:
        """Lung probability (SIZE, SIZE) of an image."""
        return self.runtime([_grey(image)[..., None]])[0, ..., 0]

    def __call__(self, image: Image.Image) -> tuple[int, int, int, int]:
        rows, columns = np.nonzero(self.mask(image) > 0.5)
        width, height = image.size
        if len(rows) < MIN_LUNG_FRACTION * SIZE * SIZE:
            return 0, 0, width, height
        top, bottom, left, right = rows.min(), rows.max() + 1, columns.min(), columns.max() + 1
        pad_y, pad_x = MARGIN * (bottom - top), MARGIN * (right - left)
        box = (max(0.0, left - pad_x) / SIZE * width, max(0.0, top - pad_y) / SIZE * height,
               min(SIZE, right + pad_x) / SIZE * width, min(SIZE, bottom + pad_y) / SIZE * height)
        return tuple(int(round(v)) for v in box)

    def save(self, path: Path) -> None:
        with atomic_path(path) as temporary:
            self.segmenter.save(temporary)

    @classmethod
    def load(cls, path: Path, runtime: str = "auto", cache_dir: Path | None = None) -> "LungCrop":
        try:
            return cls(keras.models.load_model(path, safe_mode=True, compile=False), runtime, cache_dir)
        except Exception as error:
            raise WeightsError(f"{path} is not a loadable lung segmenter ({type(error).__name__}: {error})") from None

    @classmethod
    def trained(cls, masks_folder: str | Path, cache_dir: Path | None = None, runtime: str = "auto") -> "LungCrop":
        """The segmenter for `masks_folder`, trained on first use and cached under a key of the
        masks' manifest and the recipe."""
        cache_dir = Path(cache_dir or default_cache_dir())
        manifest = Path(masks_folder) / "manifest.csv"
        if not manifest.is_file():
            raise DataError(f"{manifest} does not exist; crop=lungs needs lung_masks, a folder with manifest.csv, "
                            "images/ and masks/ (such as ../shared/lungmasks)")
        key = hashlib.sha256(manifest.read_bytes() + json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:24]
        path = cache_dir / "lungs" / f"{key}.keras"
        if not path.is_file():
            log.info("training the lung segmenter on %s (once; cached in %s)", masks_folder, path)
            model, report = train_segmenter(Path(masks_folder))
            log.info("lung segmenter Dice on held-back films: %s", report["dice"])
            with atomic_path(path.with_suffix(".json")) as temporary:
                temporary.write_text(json.dumps(report, indent=2))
            with atomic_path(path) as temporary:
                model.save(temporary)
        return cls.load(path, runtime, cache_dir)
