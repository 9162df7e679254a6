"""The network: a frozen ImageNet backbone (MobileNetV3Small, the reference's) and the reference's small head.

The full model is `inputs -> backbone -> head`, with `backbone` and `head` as named sub-models, so
that the cached-feature engine can train `head` alone on backbone outputs and still save the same
`model.keras` as the end-to-end engine.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import keras
import numpy as np

from lungxray.config import BACKBONES
from lungxray.errors import ConfigError, WeightsError
from lungxray.io import atomic_path

# ImageNet's channel statistics, which DenseNet121's weights expect after scaling to [0, 1]
# (`keras.applications.densenet.preprocess_input`); the other backbones rescale [0, 255] themselves.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# TorchXRayVision's models take films scaled from [0, 255] to [-1024, 1024] (`xrv.datasets.normalize`).
XRV_BACKBONE, XRV_RANGE = "DenseNet121-XRV", 1024.0
# The HDF5 attribute that names the backbone a converted weights file is for: DenseNet121's ImageNet
# weights and TorchXRayVision's have the same layers, so only this tells their files apart.
BACKBONE_ATTRIBUTE = "lungxray_backbone"


def build_backbone(weights: str = "imagenet", image_size: int = 224, pooling: str = "max",
                   architecture: str = "MobileNetV3Small") -> keras.Model:
    """`architecture` (one of `lungxray.config.BACKBONES`) without its top, frozen. It takes RGB in [0, 255].

    `weights`: "imagenet" (Keras' download), "none" (random initialisation) or a weights file of that
    architecture without its top, as `save_weights` writes it.
    """
    if architecture not in BACKBONES:
        raise ConfigError(f"backbone must be one of {list(BACKBONES)}. Got {architecture!r} instead.")
    application = getattr(keras.applications, architecture.removesuffix("-XRV"))
    inputs = keras.Input((image_size, image_size, 3))
    images = inputs
    if architecture == "DenseNet121":
        images = keras.layers.Rescaling(1 / 255)(images)
        images = keras.layers.Normalization(mean=IMAGENET_MEAN, variance=np.square(IMAGENET_STD))(images)
    if architecture == XRV_BACKBONE:
        if weights == "imagenet":
            raise WeightsError(f"{XRV_BACKBONE} has no ImageNet weights: convert a TorchXRayVision checkpoint with "
                               "`lungxray convert-backbone CHECKPOINT --out FILE` and pass --weights FILE")
        images = keras.layers.Rescaling(2 * XRV_RANGE / 255, offset=-XRV_RANGE)(images)
    # Built on `images`, so that its layers follow the preprocessing in one flat graph (Grad-CAM and
    # train_from look for layers by name).
    options = dict(input_tensor=images, include_top=False, pooling=pooling)
    if weights == "imagenet":
        try:
            network = application(weights="imagenet", **options)
        except Exception as error:  # urllib, socket and HTTP errors all end up here
            raise WeightsError(
                f"could not download the ImageNet weights for {architecture} ({type(error).__name__}: "
                f"{error}). Without internet, pass a weights file with --weights PATH or set "
                "LUNGXRAY_WEIGHTS=PATH (e.g. ../shared/weights/mobilenet_v3_small_imagenet_tv_no_top.weights.h5)"
            ) from None
    else:
        network = application(weights=None, **options)
        if weights != "none":
            path = Path(weights)
            if not path.is_file():
                raise WeightsError(f"weights file {path} does not exist; use imagenet, none or a file path")
            check_marked_backbone(path, architecture)
            try:
                network.load_weights(str(path))
            except Exception as error:
                raise WeightsError(f"{path} is not a {architecture} (no top) weights file: {error}") from None
    backbone = keras.Model(network.input, network.output, name="backbone")
    backbone.trainable = False
    return backbone


def mark_backbone(path: Path, architecture: str) -> None:
    """Write into a weights file which backbone it is for (see BACKBONE_ATTRIBUTE)."""
    import h5py

    with h5py.File(path, "a") as weights:
        weights.attrs[BACKBONE_ATTRIBUTE] = architecture


def check_marked_backbone(path: Path, architecture: str) -> None:
    """Refuse a weights file marked for another backbone, and an unmarked one for DenseNet121-XRV."""
    import h5py

    try:
        with h5py.File(path, "r") as weights:
            marked = weights.attrs.get(BACKBONE_ATTRIBUTE)
    except OSError:
        return  # not HDF5: Keras' own loading says what is wrong with it
    if marked is not None and marked != architecture:
        raise WeightsError(f"{path} holds {marked} weights: train with --backbone {marked}, not {architecture}")
    if marked is None and architecture == XRV_BACKBONE:
        raise WeightsError(f"{path} is not a converted TorchXRayVision DenseNet121: make one with "
                           "`lungxray convert-backbone CHECKPOINT --out FILE` (an ImageNet DenseNet121 file is "
                           "--backbone DenseNet121)")


def backbone_blocks(backbone: keras.Model) -> list[str]:
    """The blocks fine-tuning may start from, bottom to top: MobileNetV3's inverted-residual blocks
    (expanded_conv_1 to expanded_conv_10 in the small one) and its last convolution (conv_1)."""
    blocks = []
    for layer in backbone.layers:
        match = re.match(r"(expanded_conv_\d+|conv_1)(_|$)", layer.name)
        if match and match.group(1) not in blocks:
            blocks.append(match.group(1))
    return blocks


def split_backbone(backbone: keras.Model, block: str) -> tuple[keras.Model, keras.Model]:
    """(below, above): the backbone up to the input of `block`, and from there to the features.
    `above` is made of the backbone's own layers, so training it trains the backbone."""
    blocks = backbone_blocks(backbone)
    if block not in blocks:
        raise ConfigError(f"train_from must be one of the backbone's blocks {blocks}. Got {block!r} instead.")
    cut = next(layer for layer in backbone.layers if re.match(rf"{block}(_|$)", layer.name)).input
    return keras.Model(backbone.input, cut, name="below"), keras.Model(cut, backbone.output, name="above")


def build_head(feature_dim: int, num_classes: int, dense_units: int = 256, dropout: float = 0.2,
               seed: int = 21, synchronized: bool = False) -> keras.Model:
    """Dense(relu) -> BatchNormalization -> Dropout -> Dense(softmax), seeded so both engines
    start from the same weights and draw the same dropout masks. `synchronized`: batch statistics
    over the whole batch when replicas each hold a share of it (`tf.distribute`)."""
    return keras.Sequential(
        [
            keras.Input((feature_dim,)),
            keras.layers.Dense(dense_units, activation="relu",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed)),
            keras.layers.BatchNormalization(synchronized=synchronized),
            keras.layers.Dropout(dropout, seed=seed),
            keras.layers.Dense(num_classes, activation="softmax",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1)),
        ],
        name="head",
    )


def build_model(backbone: keras.Model, head: keras.Model) -> keras.Model:
    inputs = keras.Input(backbone.input_shape[1:], name="image")
    return keras.Model(inputs, head(backbone(inputs)), name="lungxray")


def _layers(model: keras.Model):
    for layer in model.layers:
        yield from _layers(layer) if isinstance(layer, keras.Model) else [layer]


def head_probabilities(head, features: np.ndarray, num_classes: int, batch_size: int = 1024) -> np.ndarray:
    """The head's softmax outputs for backbone features, in batches; rows with NaN (unreadable
    images) stay NaN. `head` is the head model or any callable computing it."""
    probabilities = np.full((len(features), num_classes), np.nan, np.float32)
    rows = np.flatnonzero(~np.isnan(features).any(axis=1))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        probabilities[chunk] = np.asarray(head(features[chunk]))
    return probabilities


def compile_for_training(model: keras.Model, learning_rate: float, steps_per_execution: int = 1) -> None:
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
                  loss="categorical_crossentropy", metrics=["accuracy"],
                  steps_per_execution=steps_per_execution)


def model_fingerprint(model: keras.Model) -> str:
    """A hash of a model's layers (type and settings, names aside) and weight values: two models with
    the same fingerprint compute the same function. The layers matter as much as the weights: max
    and average pooling share every weight."""
    digest = hashlib.sha256()
    for layer in _layers(model):
        settings = {k: v for k, v in layer.get_config().items() if k != "name"}
        digest.update(f"{type(layer).__name__}{json.dumps(settings, sort_keys=True, default=str)}".encode())
    for array in model.get_weights():
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


CONVERTED_SUFFIXES = {"litert": ".tflite", "onnx": ".onnx"}


def converted(model: keras.Model, fmt: str, folder: Path, tag: str = "", fingerprint: str | None = None) -> Path:
    """`model` converted to `fmt` (litert or onnx) by Keras' exporter, once per fingerprint and input
    size, in `folder` (`lungxray.config.conversions_dir`): a conversion depends on the model alone and
    takes ~10 s even for a small one. `tag` tells apart models that share their layers but not their
    outputs (an export's network also returns its features); `fingerprint`, the model's, where the
    caller has it (hashing DenseNet121's weights takes ~0.35 s)."""
    fingerprint = fingerprint or model_fingerprint(model)
    name = "-".join(filter(None, [fingerprint[:32], str(model.input_shape[1]), tag]))
    path = Path(folder) / f"{name}{CONVERTED_SUFFIXES[fmt]}"
    if not path.is_file():
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # the exporters log every asset they write
        with atomic_path(path) as temporary:
            model.export(str(temporary), format=fmt, verbose=False)
    return path


def load_model(path: Path) -> keras.Model:
    """Load a `.keras` file in safe mode, with an error that says what went wrong."""
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as error:
        raise WeightsError(f"{path} is not a loadable Keras model ({type(error).__name__}: {error})") from None
