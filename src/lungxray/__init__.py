"""lungxray: chest X-ray classification (covid / normal / pneumonia) with Keras 3.

    from lungxray import Config, train, Predictor
    result = train("data/", "runs/first", Config(epochs=30))
    predictor = Predictor.load(result.run_dir)      # or an export: Predictor.load("model.tflite")
    predictions = predictor.predict_files(["xray.png"])  # .probabilities, .errors

Names are imported on first use (as scikit-learn does), so that `import lungxray` and commands that
need no model start without loading TensorFlow. In the base install, without TensorFlow,
`Predictor` is `LitePredictor`, which loads exports.
"""

import importlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

_EXPORTS = {"Config": "lungxray.config", "Predictor": "lungxray.predict", "LitePredictor": "lungxray.lite",
            "RunDir": "lungxray.rundir", "train": "lungxray.training"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lungxray' has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    except ModuleNotFoundError as missing:
        if name != "Predictor" or (missing.name or "").split(".")[0] not in ("tensorflow", "keras"):
            raise
        return __getattr__("LitePredictor")


def __dir__():
    return sorted(__all__)
