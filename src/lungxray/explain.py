"""Grad-CAM (Selvaraju et al., 2017), following keras.io's "Grad-CAM class activation visualization":
the gradient of the class score with respect to the backbone's last convolutional feature map,
averaged per channel, weights that map; its positive part shows where the evidence for the class lies."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from lungxray.parallel import progress


def last_conv_layer(backbone: keras.Model) -> keras.layers.Layer:
    """The last layer of the backbone whose output is still a spatial map (batch, H, W, C)."""
    for layer in reversed(backbone.layers):
        if len(layer.output.shape) == 4:
            return layer
    raise ValueError("the backbone has no spatial feature map to explain")


class GradCam:
    def __init__(self, model: keras.Model):
        backbone, self.head = model.get_layer("backbone"), model.get_layer("head")
        self.layer = last_conv_layer(backbone)
        self.inner = keras.Model(backbone.input, [self.layer.output, backbone.output])

    def heatmap(self, image: np.ndarray, class_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(heat map in [0, 1] at the feature map's resolution, class probabilities) for one uint8 image."""
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
    from lungxray.evaluate.plots import plt, save_figure

    figure, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(overlay(image, heat))
    axes[1].set_title("Grad-CAM")
    for axis in axes:
        axis.axis("off")
    figure.suptitle(title)
    save_figure(figure, path)


def explain_files(predictor, paths: list[Path], probabilities: np.ndarray, out_dir: Path) -> list[Path]:
    """A Grad-CAM PNG per readable file in `out_dir`, titled with its predicted class and probability."""
    gradcam = GradCam(predictor.model)
    out_dir = Path(out_dir)
    written = []
    for index, (path, row) in enumerate(progress(zip(paths, probabilities), len(paths), "Grad-CAM")):
        if np.isnan(row).any():
            continue
        image = predictor.read(path)
        predicted = int(row.argmax())
        heat, _ = gradcam.heatmap(image, predicted)
        target = out_dir / f"{index:04d}_{Path(path).stem}.gradcam.png"
        save_explanation(image, heat, f"{Path(path).name}: {predictor.classes[predicted]} (p = {row[predicted]:.2f})",
                         target)
        written.append(target)
    return written
