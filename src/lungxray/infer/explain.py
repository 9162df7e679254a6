"""Grad-CAM (Selvaraju et al., 2017), following keras.io's "Grad-CAM class activation visualization":
the gradient of the class score with respect to the backbone's last convolutional feature map,
averaged per channel, weights that map; its positive part shows where the evidence for the class lies.

`Explainer` is the one Grad-CAM service: `predict --explain`, the API's `explain=true` and the DICOM
node's heat maps all ask it, with any `Predictor` that `can_explain`."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from PIL import Image

from lungxray.errors import ConfigError
from lungxray.io import atomic_path
from lungxray.parallel import progress


def last_conv_layer(backbone):
    """The last layer of the backbone whose output is still a spatial map (batch, H, W, C)."""
    for layer in reversed(backbone.layers):
        if len(layer.output.shape) == 4:
            return layer
    raise ValueError("the backbone has no spatial feature map to explain")


class GradCam:
    """Grad-CAM of a lungxray network (a Keras model with "backbone" and "head" parts). TensorFlow is
    imported here, not with the module: a server that may explain need not load it until it does."""

    def __init__(self, model):
        import keras

        backbone, self.head = model.get_layer("backbone"), model.get_layer("head")
        self.layer = last_conv_layer(backbone)
        self.inner = keras.Model(backbone.input, [self.layer.output, backbone.output])

    def heatmap(self, image: np.ndarray, class_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(heat map in [0, 1] at the feature map's resolution, class probabilities) for one uint8 image."""
        import tensorflow as tf

        batch = tf.convert_to_tensor(image[None].astype(np.float32))
        with tf.GradientTape() as tape:
            feature_map, pooled = self.inner(batch, training=False)
            probabilities = self.head(pooled, training=False)
            if class_index is None:
                class_index = int(tf.argmax(probabilities[0]))
            score = probabilities[:, class_index]
        gradients = tape.gradient(score, feature_map)
        weights = tf.reduce_mean(gradients, axis=(0, 1, 2))
        cam = tf.nn.relu(tf.reduce_sum(feature_map[0] * weights, axis=-1)).numpy()
        peak = cam.max()
        return (cam / peak if peak > 0 else cam), probabilities[0].numpy()


class Explainer:
    """Grad-CAM heat maps for a predictor's answers: with its own Keras network, or, for a run
    answered through its export, the run's network, loaded (with TensorFlow) on first use."""

    def __init__(self, predictor):
        if not predictor.can_explain:
            raise ConfigError("Grad-CAM needs the Keras model: give the run folder (not an export alone)")
        self.predictor, self._gradcam, self._lock = predictor, None, threading.Lock()

    def heatmap(self, image: np.ndarray, class_name: str) -> np.ndarray:
        """The heat map of `class_name` for `image` (uint8, at the model's input size), in [0, 1]."""
        with self._lock:
            if self._gradcam is None:
                self._gradcam = GradCam(self.predictor.keras_network())
        heat, _ = self._gradcam.heatmap(image, self.predictor.classes.index(class_name))
        return heat


def upsample(heat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The heat map at `shape` (height, width), bilinear, in [0, 1]."""
    return np.asarray(Image.fromarray(np.float32(heat), mode="F").resize(shape[::-1], Image.Resampling.BILINEAR))


def share_inside(heat: np.ndarray, mask: np.ndarray) -> float:
    """The share of the heat map's mass that falls inside a binary `mask` (e.g. the lung fields);
    a map spread evenly over the image scores the mask's area fraction."""
    heat = upsample(heat, mask.shape)
    total = float(heat.sum())
    return float((heat * (mask > 0)).sum() / total) if total > 0 else float("nan")


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The heat map, upsampled and coloured (jet), over the image."""
    import matplotlib

    colours = matplotlib.colormaps["jet"](np.clip(upsample(heat, image.shape[:2]), 0, 1))[..., :3]
    return np.uint8(np.clip((1 - alpha) * image + alpha * 255 * colours, 0, 255))


def save_explanation(image: np.ndarray, heat: np.ndarray, title: str, path: Path) -> None:
    """A PNG: the X-ray and its Grad-CAM overlay side by side, titled with the prediction."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe beside a server's threads

    figure = Figure(figsize=(8, 4.4))
    axes = figure.subplots(1, 2)
    for axis, shown, name in zip(axes, (image, overlay(image, heat)), ("image", "Grad-CAM")):
        axis.imshow(shown)
        axis.set_title(name)
        axis.axis("off")
    figure.suptitle(title)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, bbox_inches="tight", format="png")


def explain_files(predictor, answers, out_dir: Path) -> list[Path]:
    """A Grad-CAM PNG in `out_dir` per answer that gives a class, titled with it and its probability."""
    explainer, out_dir = Explainer(predictor), Path(out_dir)
    written = []
    for index, answer in enumerate(progress(answers, len(answers), "Grad-CAM")):
        if answer.predicted is None:
            continue
        image = predictor.read(answer.file)
        target = out_dir / f"{index:04d}_{Path(answer.file).stem}.gradcam.png"
        title = f"{Path(answer.file).name}: {answer.predicted} (p = {answer.probabilities[answer.predicted]:.2f})"
        save_explanation(image, explainer.heatmap(image, answer.predicted), title, target)
        written.append(target)
    return written
