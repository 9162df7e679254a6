"""One door to a trained model, for the command line and the server: an export (`.tflite`, `.onnx`,
`.savedmodel`) opens as a `LitePredictor` (LiteRT and ONNX without importing TensorFlow); a run folder
or `.keras` file as a Keras `Predictor`, or, with `runtime="litert"` or `"onnx"`, as the run's export in
that format, exported (and checked against Keras) on first use."""

from __future__ import annotations

from pathlib import Path

from lungxray.errors import ConfigError

RUNTIMES = ("auto", "keras", "litert", "onnx")


def load_predictor(model: str | Path, cache_dir: Path | None = None, runtime: str = "auto"):
    if runtime not in RUNTIMES:
        raise ConfigError(f"'runtime' must be one of {list(RUNTIMES)}. Got {runtime!r} instead.")
    from lungxray.lite import EXPORT_SUFFIXES, LitePredictor, is_export  # NumPy, Pillow: not for `--help`

    if is_export(model):
        wanted = EXPORT_SUFFIXES.get(runtime)
        if runtime == "keras" or (wanted and Path(model).suffix != wanted):
            raise ConfigError(f"{model} is an exported model; it runs in its own runtime, not {runtime} "
                              "(give the run folder to choose the runtime)")
        return LitePredictor.load(model)
    if runtime in ("litert", "onnx"):
        return LitePredictor.load(run_export(model, runtime, cache_dir))
    from lungxray.predict import Predictor  # imports TensorFlow: only when a Keras model is asked for

    return Predictor.load(model, runtime=runtime, cache_dir=cache_dir)  # "keras", or "auto": the backbone in LiteRT


def run_export(model: str | Path, fmt: str, cache_dir: Path | None = None) -> Path:
    """The run's export in `fmt` (RUN/export/model.tflite or .onnx), made now if it is missing or
    older than the run's model."""
    from lungxray.lite import EXPORT_SUFFIXES
    from lungxray.rundir import RunDir

    run = RunDir.open(model)
    exported = run.export(EXPORT_SUFFIXES[fmt])
    if exported.exists() and exported.stat().st_mtime >= run.model.stat().st_mtime:
        return exported
    from lungxray.export import export_model  # imports TensorFlow: only the first time

    return export_model(run.model, exported, cache_dir=cache_dir, fmt=fmt).path
