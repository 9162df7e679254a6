"""One door to a trained model, for the command line, the server and the DICOM node: an export
(`.tflite`, `.onnx`, `.savedmodel`) opens as a `LitePredictor` (LiteRT and ONNX without importing
TensorFlow); a run folder or `.keras` file as a Keras `Predictor`, or, with `runtime="litert"` or
`"onnx"`, as the run's export in that format, exported (and checked against Keras) on first use.

`runtime="auto"` on a run folder takes the fastest of the run's exports that passed the parity check
against its Keras model (LiteRT, then ONNX: 1,460 and 565 images/s in docs/benchmarks.md) and is
newer than the model; without one, the Keras model (its backbone in LiteRT). It does not export by
itself: exporting needs TensorFlow and writes into the run, which `lungxray export RUN` does once.
It logs which it chose (the command line shows the line on stderr)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lungxray.errors import ConfigError

RUNTIMES = ("auto", "keras", "litert", "onnx")
FASTEST_FIRST = ("litert", "onnx")

log = logging.getLogger("lungxray")


def load_predictor(model: str | Path, cache_dir: Path | None = None, runtime: str = "auto", gradients: bool = False):
    """`gradients`: the caller needs the Keras model (Grad-CAM), so "auto" does not choose an export."""
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
    checked = checked_export(model) if runtime == "auto" and not gradients else None
    if checked is not None:
        predictor = LitePredictor.load(checked)
    else:
        from lungxray.predict import Predictor  # imports TensorFlow: only when a Keras model is asked for

        predictor = Predictor.load(model, runtime=runtime, cache_dir=cache_dir)  # "keras", or "auto": backbone in LiteRT
    if runtime == "auto":
        log.info("runtime keras: Grad-CAM needs the Keras model" if gradients else describe_runtime(predictor))
    return predictor


def checked_export(model: str | Path) -> Path | None:
    """The fastest runnable export of the run that is newer than its model and passed parity."""
    from lungxray.lite import EXPORT_SUFFIXES, sidecar_paths
    from lungxray.rundir import RunDir
    from lungxray.runtimes import litert_available, onnx_available

    installed = {"litert": litert_available, "onnx": onnx_available}
    run = RunDir.open(model)
    for fmt in FASTEST_FIRST:
        exported = run.export(EXPORT_SUFFIXES[fmt])
        if not exported.is_file() or exported.stat().st_mtime < run.model.stat().st_mtime or not installed[fmt]():
            continue
        info_path, _ = sidecar_paths(exported)
        try:
            parity = json.loads(info_path.read_text()).get("parity") or {}
        except (OSError, ValueError):
            continue
        if parity.get("max_abs_difference", float("inf")) <= parity.get("tolerance", 0):
            return exported
    return None


def describe_runtime(predictor) -> str:
    """One line saying what runs the model, for the command line to print."""
    if hasattr(predictor, "model_path"):
        parity = predictor.info.get("parity")
        checked = (f" (checked against the Keras model on {parity['images']} images: largest probability "
                   f"difference {parity['max_abs_difference']:.1e})") if parity else ""
        return f"runtime {predictor.runtime}: {predictor.model_path}{checked}"
    return (f"runtime keras (backbone in {predictor.extractor.runtime.name}); `lungxray export RUN` once makes a "
            "checked LiteRT export that --runtime auto then uses, without TensorFlow")


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
