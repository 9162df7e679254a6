"""The training recipe: one object, the reference recipe as its defaults, saved with every run."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from lungxray.data.records import check_ratios

WEIGHTS_ENV = "LUNGXRAY_WEIGHTS"


def default_weights() -> str:
    """`imagenet` for users; `LUNGXRAY_WEIGHTS` lets offline machines point at a file."""
    return os.environ.get(WEIGHTS_ENV, "imagenet")


@dataclasses.dataclass
class Config:
    """Every setting that determines a run. Defaults are the reference recipe (seed-recipe.md)."""

    # Backbone: frozen MobileNetV3Small, max-pooled to 576 features.
    weights: str = dataclasses.field(default_factory=default_weights)
    image_size: int = 224
    pooling: str = "max"
    interpolation: str = "nearest"
    # Head: Dense(256, relu) -> BatchNorm -> Dropout(0.2) -> Dense(classes, softmax).
    dense_units: int = 256
    dropout: float = 0.2
    # Optimisation.
    learning_rate: float = 1e-3
    batch_size: int = 64
    epochs: int = 30
    seed: int = 21
    horizontal_flip: bool = True
    monitor: str = "val_accuracy"
    early_stopping_patience: int = 10
    # Data.
    split_ratios: tuple[float, float, float] = (0.7, 0.2, 0.1)
    max_unreadable_fraction: float = 0.05
    holdout_source: str | None = None  # leave this manifest `source` out of training; test on it
    # Engine: "auto" picks "cached" when the backbone is frozen and the only augmentation is a flip.
    engine: str = "auto"
    feature_runtime: str = "auto"
    fine_tune_epochs: int = 0
    fine_tune_layers: int = 20
    fine_tune_learning_rate: float = 1e-5

    def __post_init__(self):
        self.split_ratios = tuple(float(r) for r in self.split_ratios)
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.image_size >= 32, "image_size must be at least 32"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.epochs >= 1, "epochs must be at least 1"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.learning_rate > 0, "learning_rate must be positive"),
            (self.pooling in ("max", "avg"), "pooling must be 'max' or 'avg'"),
            (self.interpolation in ("nearest", "bilinear", "bicubic"),
             "interpolation must be nearest, bilinear or bicubic"),
            (self.engine in ("auto", "cached", "keras"), "engine must be auto, cached or keras"),
            (self.feature_runtime in ("auto", "keras", "litert"),
             "feature_runtime must be auto, keras or litert"),
            (0.0 <= self.max_unreadable_fraction <= 1.0, "max_unreadable_fraction must be in [0, 1]"),
            (self.fine_tune_epochs >= 0, "fine_tune_epochs must be 0 or more"),
            (self.monitor in ("val_accuracy", "val_loss"), "monitor must be val_accuracy or val_loss"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid configuration: {message}")
        check_ratios(self.split_ratios)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        from lungxray.io import write_json

        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"configuration file {path} does not exist") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"configuration file {path} is not valid JSON: {error}") from None
        return cls.from_dict(values)

    def replace(self, **overrides) -> "Config":
        """A copy with the given settings changed; `None` values mean 'keep'."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})
