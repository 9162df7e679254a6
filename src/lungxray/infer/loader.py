"""The one way in to a trained model, for the command line, the server, the DICOM node and the
Python API: `load_predictor` gives a `Predictor`.

An export (`.tflite`, `.onnx`, `.savedmodel`) opens as a `LitePredictor` (LiteRT and ONNX without
TensorFlow). A run folder or `.keras` file opens, by `runtime`:
- "keras": the Keras model (`KerasPredictor`), its backbone in LiteRT where installed;
- "litert" or "onnx": the run's export in that format, which `lungxray export` made and checked
  against the Keras model; a missing or stale one is an error that names the command to run;
- "auto": the fastest of the run's exports that passed the parity check against its Keras model
  (LiteRT, then ONNX: 1,460 and 565 images/s in docs/benchmarks.md) and is newer than the model;
  without one (or when the caller asks for the Keras model), the Keras model.

Loading never writes: exporting needs TensorFlow and writes into the run, which only `lungxray
export` does. Whatever runs it, a run's predictor answers as the run's model (the identity of its
model.keras) and can explain itself with the run's Keras network.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lungxray.errors import ConfigError, WeightsError
from lungxray.infer.predictor import Predictor

RUNTIMES = ("auto", "keras", "litert", "onnx")
FASTEST_FIRST = ("litert", "onnx")

log = logging.getLogger("lungxray")


def load_predictor(model: str | Path, cache_dir: Path | None = None, runtime: str = "auto",
                   keras: bool = False) -> Predictor:
    """`keras`: the caller needs the run's Keras model itself (evaluation, which reads what it was
    trained on), so "auto" does not choose an export."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"'runtime' must be one of {list(RUNTIMES)}. Got {runtime!r} instead.")
    from lungxray.infer.lite_predictor import EXPORT_SUFFIXES, LitePredictor, is_export  # NumPy, Pillow: not for --help

    if is_export(model):
        wanted = EXPORT_SUFFIXES.get(runtime)
        if runtime == "keras" or (wanted and Path(model).suffix != wanted):
            raise ConfigError(f"{model} is an exported model; it runs in its own runtime, not {runtime} "
                              "(give the run folder to choose the runtime)")
        return LitePredictor.load(model)
    from lungxray.rundir import RunDir

    run = RunDir.open(model)
    exported = run_export(run, runtime) if runtime in FASTEST_FIRST else None
    if runtime == "auto" and not keras:
        exported = checked_export(run)
    if exported is not None:
        predictor = LitePredictor.load(exported, run_model=run.model)  # answers as the run's model
    else:
        from lungxray.infer.keras_predictor import KerasPredictor  # imports TensorFlow: only when Keras is asked for

        predictor = KerasPredictor.load(run.model, runtime=runtime, cache_dir=cache_dir)  # backbone in LiteRT on auto
    if runtime == "auto":
        log.info(predictor.describe())
    return predictor


def checked_export(run) -> Path | None:
    """The fastest runnable export of `run` (a RunDir, or its folder) that is newer than its model
    and passed parity."""
    from lungxray.infer.lite_predictor import EXPORT_SUFFIXES, sidecar_paths
    from lungxray.model.runtimes import litert_available, onnx_available
    from lungxray.rundir import RunDir

    installed = {"litert": litert_available, "onnx": onnx_available}
    run = run if isinstance(run, RunDir) else RunDir.open(run)
    for fmt in FASTEST_FIRST:
        exported = run.export(EXPORT_SUFFIXES[fmt])
        if not is_fresh(run, exported) or not installed[fmt]():
            continue
        info_path, _ = sidecar_paths(exported)
        try:
            parity = json.loads(info_path.read_text()).get("parity") or {}
        except (OSError, ValueError):
            continue
        if parity.get("max_abs_difference", float("inf")) <= parity.get("tolerance", 0):
            return exported
    return None


def run_export(run, fmt: str) -> Path:
    """The run's export in `fmt` (RUN/export/model.tflite or .onnx); an error naming the command that
    makes it when it is missing or older than the run's model."""
    from lungxray.infer.lite_predictor import EXPORT_SUFFIXES

    exported = run.export(EXPORT_SUFFIXES[fmt])
    if not is_fresh(run, exported):
        state = "is older than its model" if exported.exists() else "is missing"
        raise WeightsError(f"{exported} {state}: make it with `lungxray export --model {run.folder} --format {fmt}` "
                           "(which checks it against the Keras model), or choose --runtime keras")
    return exported


def is_fresh(run, exported: Path) -> bool:
    return exported.exists() and exported.stat().st_mtime >= run.model.stat().st_mtime
