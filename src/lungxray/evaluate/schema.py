"""What `metrics.json` holds: the types every writer fills and every reader relies on.

`classification_metrics` writes the core (`Metrics`); `evaluate` adds the data description, the
overlap with training, the gate's flags, subgroups and, on request, the occlusion test. Readers
(the run report, `lungxray evaluate`, the server's model card) load it with `read_metrics`, which
checks the keys they rely on and names the file when one is missing.
"""

from pathlib import Path
from typing import NotRequired, TypedDict

from lungxray.errors import DataError
from lungxray.io import read_json

METRICS_FILE = "metrics.json"


class Interval(TypedDict):
    value: float | None
    ci95: list[float] | None  # [2.5th, 97.5th percentile] of the bootstrap draws


class ClassMetrics(TypedDict):
    precision: float
    recall: float
    f1: float
    support: int
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    auroc: float | None  # None when the class is absent (undefined)
    average_precision: float | None


class Calibration(TypedDict):
    ece: float
    ece_bins: int
    ece_binning: str
    brier: float
    nll: float
    reliability: list[dict]
    temperature: NotRequired[float]


class DataSummary(TypedDict):
    source: str
    split: str | None
    images: int
    scored: int
    counts: dict[str, int]
    unreadable: list[dict]


class Metrics(TypedDict):
    classes: list[str]
    n: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    macro_auroc: float | None
    pairwise_auroc: NotRequired[dict[str, float | None]]  # "a_vs_b": AUROC of b against a, on a and b images
    confusion_matrix: list[list[int]]  # rows true, columns predicted
    per_class: dict[str, ClassMetrics]
    calibration: Calibration
    intervals: NotRequired[dict[str, Interval]]  # keys: accuracy, macro_f1, macro_auroc, sensitivity/C, auroc/C
    bootstrap: NotRequired[dict]
    # Added by `evaluate`:
    calibration_before_scaling: NotRequired[Calibration]
    data: NotRequired[DataSummary]
    overlap_with_training: NotRequired[dict]
    ood: NotRequired[dict]
    conformal: NotRequired[dict[str, dict]]  # "0.90", "0.95": coverage and set size, overall and per class
    subgroups: NotRequired[dict[str, dict[str, "Metrics"]]]
    occlusion: NotRequired[dict]


def read_metrics(path: str | Path) -> Metrics:
    """A metrics.json (or the one in an evaluation folder), with its required keys checked."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    metrics = read_json(path, DataError, "does not exist; evaluate the model first (lungxray evaluate)")
    missing = [key for key in Metrics.__required_keys__ if key not in metrics]
    if missing:
        raise DataError(f"{path} lacks {missing}: it was not written by lungxray evaluate")
    return metrics
