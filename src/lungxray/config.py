"""The training recipe: one object, the reference recipe as its defaults, saved with every run.

Each field carries its help text and its constraint, so that validation, the JSON loader and the
command line's flags (`lungxray train --help`) all come from this one definition."""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path

from lungxray.errors import ConfigError
from lungxray.io import read_json, write_json

WEIGHTS_ENV = "LUNGXRAY_WEIGHTS"
LUNG_MASKS_ENV = "LUNGXRAY_LUNGMASKS"
CACHE_ENV = "LUNGXRAY_CACHE"
CONVERSIONS_ENV = "LUNGXRAY_CONVERSIONS"
# Keras applications a backbone may be; the first is the reference's. DenseNet121-XRV is DenseNet121
# with TorchXRayVision's input, for its chest-film weights (`lungxray convert-backbone`).
BACKBONES = ("MobileNetV3Small", "MobileNetV3Large", "EfficientNetV2B0", "DenseNet121", "DenseNet121-XRV")


def environment_path(name: str) -> Path | None:
    """An environment variable holding a path, made absolute once, here: a relative path would
    otherwise mean different files to code running in different folders."""
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else None


def default_cache_dir() -> Path:
    """Where features, converted backbones and downloaded data are kept: `LUNGXRAY_CACHE` or ~/.cache/lungxray."""
    return environment_path(CACHE_ENV) or Path.home() / ".cache" / "lungxray"


def conversions_dir(cache_dir: Path) -> Path:
    """Where converted models are kept (LiteRT backbones, LiteRT and ONNX exports): `LUNGXRAY_CONVERSIONS`,
    or the cache's `litert/`. A conversion depends on the model alone (~10 s each), so several feature
    caches may share one folder."""
    return environment_path(CONVERSIONS_ENV) or cache_dir / "litert"


def default_lung_masks() -> str | None:
    path = environment_path(LUNG_MASKS_ENV)
    return str(path) if path else None


def default_weights() -> str:
    """`imagenet` for users; `LUNGXRAY_WEIGHTS` lets offline machines point at a file."""
    path = environment_path(WEIGHTS_ENV)
    return str(path) if path else "imagenet"


@dataclasses.dataclass(frozen=True)
class Interval:
    """A number in [low, high] (None: unbounded); `open_high` excludes `high`."""

    low: float | None = None
    high: float | None = None
    open_high: bool = False

    def __contains__(self, value) -> bool:
        above = self.low is None or value >= self.low
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def __str__(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"the range [{low}, {high}{')' if self.open_high or self.high is None else ']'}"


def setting(default, help: str, check: Interval | tuple | None = None, **field_options):
    """A Config field: its default, the help the CLI shows, and an Interval or a tuple of choices."""
    if callable(default):
        field_options["default_factory"] = default
    else:
        field_options["default"] = default
    return dataclasses.field(metadata={"help": help, "check": check}, **field_options)


@dataclasses.dataclass
class Config:
    """Every setting that determines a run. Defaults are the reference recipe (seed-recipe.md)."""

    # Backbone: frozen MobileNetV3Small, max-pooled to 576 features.
    backbone: str = setting(BACKBONES[0], "the ImageNet network, frozen, whose features the head learns from; "
                                          "weights must be that network's", BACKBONES)
    weights: str = setting(default_weights, "backbone weights: imagenet, none or a weights file "
                                            f"(default: ${WEIGHTS_ENV} if set, else imagenet)")
    image_size: int = setting(224, "input size in pixels (square)", Interval(32))
    pooling: str = setting("max", "global pooling of the backbone's last feature map", ("max", "avg"))
    interpolation: str = setting("nearest", "resize method", ("nearest", "bilinear", "bicubic"))
    intensity: str = setting("none", "intensity normalisation after resizing: histogram equalisation or a "
                                     "1st-99th percentile window", ("none", "equalize", "autocontrast"))
    crop: str = setting("none", "what the model sees: the whole film, or the box around the lung fields found "
                                "by a segmenter trained on lung_masks", ("none", "lungs"))
    lung_masks: str | None = setting(default_lung_masks, "folder of films with lung masks (manifest.csv, images/, "
                                     f"masks/) for crop=lungs (default: ${LUNG_MASKS_ENV})")
    # Head: Dense(256, relu) -> BatchNorm -> Dropout(0.2) -> Dense(classes, softmax).
    dense_units: int = setting(256, "units of the head's hidden Dense layer", Interval(1))
    dropout: float = setting(0.2, "dropout rate before the output layer", Interval(0, 1, open_high=True))
    # Optimisation.
    learning_rate: float = setting(1e-3, "Adam learning rate of the head", Interval(0, None))
    batch_size: int = setting(64, "images per batch", Interval(1))
    epochs: int = setting(30, "head-training epochs (at most; see early_stopping_patience)", Interval(1))
    seed: int = setting(21, "seed of every random choice (splits, shuffling, flips, initial weights)", Interval(0))
    horizontal_flip: bool = setting(True, "mirror each training image with probability 1/2")
    views: int = setting(2, "training views of each film, each epoch showing it as one of them: 2 is itself and its "
                            "mirror image (horizontal_flip); each further view changes what a scanner or a hospital "
                            "changes (gamma, contrast, blur, noise, JPEG quality, small rotation and scale), drawn "
                            "once per film and cached like its features", Interval(2))
    monitor: str = setting("val_accuracy", "validation metric that picks the best epoch; "
                           "val_worst_group_accuracy is the lowest accuracy over the validation's class x source "
                           "cells (needs a manifest with a source column)",
                           ("val_accuracy", "val_loss", "val_worst_group_accuracy"))
    early_stopping_patience: int = setting(10, "epochs without improvement before training stops", Interval(1))
    balance: str = setting("none", "weight training images so that each class, or each class within each "
                           "source (and age group), weighs the same", ("none", "class", "class_source",
                                                                       "class_source_age"))
    # Data.
    split_ratios: tuple[float, float, float] = setting((0.7, 0.2, 0.1),
                                                       "train,val,test shares for data without splits")
    max_unreadable_fraction: float = setting(0.05, "largest share of unreadable images tolerated", Interval(0, 1))
    holdout_source: str | None = setting(None, "leave this manifest 'source' out of training and test on it")
    # Engine: "auto" picks "cached" when the backbone is frozen and the only augmentation is a flip.
    engine: str = setting("auto", "training engine", ("auto", "cached", "keras"))
    feature_runtime: str = setting("auto", "backbone runtime of the cached engine", ("auto", "keras", "litert"))
    fine_tune_epochs: int = setting(0, "end-to-end epochs with the top of the backbone unfrozen", Interval(0))
    fine_tune_layers: int = setting(20, "backbone layers (from the top) that fine-tuning unfreezes", Interval(1))
    fine_tune_learning_rate: float = setting(1e-5, "Adam learning rate while fine-tuning", Interval(0, None))
    train_from: str | None = setting(None, "fine-tune from this backbone block (e.g. expanded_conv_9) on cached "
                                     "inputs to it: the blocks from it up train with the head for fine_tune_epochs, "
                                     "images never go through the backbone again; unset: fine-tuning runs end "
                                     "to end on images")

    def __post_init__(self):
        _check_settings(self)
        if self.train_from and (not self.fine_tune_epochs or self.engine == "keras"):
            raise ConfigError("train_from fine-tunes on cached block inputs: it needs fine_tune_epochs > 0 and "
                              "engine auto or cached")
        if self.train_from and not self.backbone.startswith("MobileNetV3"):
            raise ConfigError(f"train_from names one of MobileNetV3's blocks; backbone {self.backbone} has none of "
                              "them: fine-tune it end to end (fine_tune_epochs without train_from)")
        if self.views > 2 and not self.horizontal_flip:
            raise ConfigError("views above 2 add variants to each film and its mirror image: they need horizontal_flip")
        if self.crop == "lungs" and not self.lung_masks:
            raise ConfigError(f"crop='lungs' needs lung_masks, a folder of films with lung masks (such as "
                              f"../shared/lungmasks); set it or ${LUNG_MASKS_ENV}")

    @classmethod
    def preset(cls, name: str) -> "Config":
        """A named starting point: `reference` (the defaults, the seed's recipe exactly) or another of PRESETS."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, values: dict, origin: str = "configuration") -> "Config":
        if not isinstance(values, dict):
            raise ConfigError(f"{origin} must be a JSON object of settings; got {type(values).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{origin}: unknown setting(s) {unknown}; known settings are {known}")
        try:
            return cls(**values)
        except ConfigError as error:
            raise ConfigError(f"{origin}: {error}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        return cls.from_dict(read_json(path, ConfigError, "does not exist"), origin=str(path))

    def replace(self, **overrides) -> "Config":
        """A copy with the given settings changed (validated); `None` values mean 'keep'."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def describe_model(self) -> str:
        """The network this configuration builds, in one line (reports and model cards use it)."""
        tuned = f" (fine-tuned from {self.train_from} up)" if self.train_from else " (top layers fine-tuned)"
        backbone = self.backbone + (tuned if self.fine_tune_epochs else " (frozen)")
        return (f"{backbone}, {self.pooling}-pooled, {self.image_size}x{self.image_size} input, weights "
                f"{Path(self.weights).name if self.weights not in ('imagenet', 'none') else self.weights}; head "
                f"Dense({self.dense_units}, relu) → BatchNormalization → Dropout({self.dropout:g}) → Dense(softmax)")


PRESETS: dict[str, dict] = {
    # The seed's recipe, exactly.
    "reference": {},
    # What held up best on sources never seen in training (docs/results.md, section 6): average
    # pooling, and the epoch chosen by its worst class x source cell instead of pooled accuracy.
    "robust": {"pooling": "avg", "monitor": "val_worst_group_accuracy"},
}


@dataclasses.dataclass
class Federation:
    """How a federation trains the recipe's head across sites (`lungxray federate`), saved with the
    run beside the Config. Defaults: docs/federated.md says how they were chosen."""

    site_column: str = setting("source", "the manifest column naming each film's site (hospital)")
    rounds: int = setting(30, "rounds of local training and aggregation", Interval(1))
    local_steps: int = setting(20, "batches each site trains on per round", Interval(1))
    aggregation: str = setting("scaffold", "how the sites' heads are combined: FedAvg (weighted by examples), "
                                          "FedProx (FedAvg with a proximal term in each site's loss), FedAdam "
                                          "(an Adam step on the server) or SCAFFOLD (FedAvg with server momentum "
                                          "and each site's drift corrected by the federation's gradient)",
                               ("fedavg", "fedprox", "fedadam", "scaffold"))
    proximal_mu: float = setting(0.1, "FedProx's proximal weight: how hard a site's head is pulled back "
                                      "towards the round's global head", Interval(0, None))
    server_learning_rate: float = setting(0.003, "FedAdam's server learning rate", Interval(0, None))
    server_momentum: float = setting(0.9, "SCAFFOLD's server momentum on the averaged step (0: none)",
                                     Interval(0, 1, open_high=True))
    local_learning_rate: float = setting(0.01, "FedAdam's sites' learning rate (plain gradient steps; FedAvg and "
                                              "FedProx sites use the recipe's Adam and learning_rate)", Interval(0, None))
    min_sites: int = setting(2, "sites that must take part in every round", Interval(1))
    dp_noise_multiplier: float = setting(0.0, "differential privacy for each site (Flower's central DP): Gaussian "
                                              "noise of this many clipping norms added to each round's summed "
                                              "update, and the epsilon it gives reported (0: off; with fedavg, "
                                              "fedprox or fedadam)", Interval(0, None))
    dp_clipping_norm: float = setting(1.0, "differential privacy: the L2 norm each site's update to the head is "
                                           "clipped to", Interval(1e-12, None))
    dp_delta: float = setting(1e-5, "differential privacy: the delta the epsilon is reported at",
                              Interval(1e-12, 1, open_high=True))
    secure_aggregation: bool = setting(False, "average the sites' heads by Flower's SecAgg+, so that the server "
                                              "sees their weighted sum and never one site's head (with fedavg or "
                                              "fedprox)")

    def __post_init__(self):
        _check_settings(self)
        if self.dp_noise_multiplier and self.aggregation == "scaffold":
            raise ConfigError("differential privacy covers the heads the sites send, and SCAFFOLD's sites send "
                              "their gradients too: with --dp-noise-multiplier, choose --aggregation fedavg, "
                              "fedprox or fedadam")
        if self.secure_aggregation and (self.aggregation not in ("fedavg", "fedprox") or self.dp_noise_multiplier):
            raise ConfigError("secure aggregation hides each site's head from the server, which FedAdam's and "
                              "SCAFFOLD's steps and central differential privacy's clipping need: with "
                              "--secure-aggregation, choose --aggregation fedavg or fedprox and no "
                              "--dp-noise-multiplier")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())


def _check_settings(settings) -> None:
    """Every field of a settings dataclass converted to its type and checked against its constraint."""
    hints = typing.get_type_hints(type(settings))
    for field in dataclasses.fields(settings):
        value = _checked(field.name, getattr(settings, field.name), hints[field.name], field.metadata["check"])
        object.__setattr__(settings, field.name, value)


def _type_name(annotation) -> str:
    names = {int: "an int", float: "a float", bool: "a bool", str: "a str"}
    if annotation in names:
        return names[annotation]
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return f"a list of {len(arguments)} numbers"
    return " or ".join(_type_name(a) for a in arguments) + " or null"


def _checked(name: str, value, annotation, check):
    """`value` converted to the field's type, or a ConfigError in scikit-learn's words."""

    def fail(expected: str):
        raise ConfigError(f"'{name}' must be {expected}. Got {value!r} instead.")

    arguments = typing.get_args(annotation)
    if type(None) in arguments:  # Optional[...]
        if value is None:
            return None
        annotation = next(a for a in arguments if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(annotation)):
            fail(_type_name(annotation))
        numbers = tuple(_checked(name, v, float, None) for v in value)
        if any(v < 0 for v in numbers) or abs(sum(numbers) - 1.0) > 1e-6:
            fail("three non-negative numbers summing to 1, such as [0.7, 0.2, 0.1]")
        return numbers
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if annotation in (int, float) and (isinstance(value, bool) or not isinstance(value, annotation)):
        fail(_type_name(annotation))
    if annotation is float and not math.isfinite(value):
        fail("a finite float")
    if annotation in (bool, str) and not isinstance(value, annotation):
        fail(_type_name(annotation))
    if isinstance(check, Interval) and value not in check:
        fail(f"{_type_name(annotation)} in {check}")
    if isinstance(check, tuple) and value not in check:
        fail(f"one of {list(check)}")
    return value
