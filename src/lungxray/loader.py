"""One door to a trained model, for the command line and the server: an export (`.tflite`, `.onnx`)
opens as a `LitePredictor` without importing TensorFlow; a run folder or `.keras` file as a Keras
`Predictor`."""

from __future__ import annotations

from pathlib import Path

from lungxray.lite import LitePredictor, is_export


def load_predictor(model: str | Path, cache_dir: Path | None = None):
    if is_export(model):
        return LitePredictor.load(model)
    from lungxray.predict import Predictor  # imports TensorFlow: only when a Keras model is asked for

    return Predictor.load(model, cache_dir=cache_dir)
