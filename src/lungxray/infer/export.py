"""Take a model anywhere: `lungxray export` writes the whole network (backbone and head) as one
LiteRT or ONNX file (or a TensorFlow SavedModel folder), with a sidecar that carries everything needed to use it correctly (classes, input
contract, calibration temperature, provenance) and the out-of-distribution gate beside it, then
checks the exported model against the Keras model on real images and refuses to leave a file that
disagrees.

    RUN/export/model.tflite          inputs: (1, size, size, 3) float32 RGB in [0, 255] (ONNX, SavedModel: a batch)
                                     outputs: softmax probabilities (before temperature), backbone features
    RUN/export/model.tflite.json     classes, input contract, temperature, parity, provenance
    RUN/export/model.tflite.ood.npz  the gate (Mahalanobis on the features output)
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import keras
import numpy as np

from lungxray import __version__
from lungxray.config import conversions_dir, default_cache_dir
from lungxray.data.records import load_dataset
from lungxray.errors import DataError, WeightsError
from lungxray.io import atomic_folder, atomic_path, remove, write_json
from lungxray.infer.lite_predictor import EXPORT_SUFFIXES, LitePredictor, sidecar_paths
from lungxray.model.network import converted
from lungxray.infer.keras_predictor import KerasPredictor
from lungxray.rundir import RunDir

# Largest difference in any class probability between the exported and the Keras model on the
# sample: LiteRT (XNNPACK), onnxruntime and TensorFlow order float32 operations differently.
FLOAT_TOLERANCE = 1e-4
SAMPLE_SIZE = 200


@dataclasses.dataclass
class ExportResult:
    path: Path
    parity: dict


def export_model(model: str | Path, out: str | Path | None = None, data: str | Path | None = None,
                 sample_size: int = SAMPLE_SIZE, cache_dir: Path | None = None, fmt: str = "litert") -> ExportResult:
    """Export a run's model to `fmt` (litert, onnx or savedmodel), then check it on `sample_size` validation
    images (from the run's data.csv, or `data`)."""
    if fmt not in EXPORT_SUFFIXES:
        raise WeightsError(f"unknown export format {fmt!r}; formats are {sorted(EXPORT_SUFFIXES)}")
    run = RunDir.open(model)
    predictor = KerasPredictor.load(run.model, runtime="keras", cache_dir=cache_dir)
    if predictor.crop is not None:
        raise WeightsError("a model trained with crop=lungs cannot be exported yet: its lung segmenter would "
                           "have to travel with it")
    sample = parity_sample(run, data, sample_size)
    out = Path(out) if out else run.export(EXPORT_SUFFIXES[fmt])
    if out.suffix != EXPORT_SUFFIXES[fmt]:
        raise WeightsError(f"a {fmt} export is a {EXPORT_SUFFIXES[fmt]} file, not {out.name}")
    info_path, gate_path = sidecar_paths(out)
    try:
        write_export(predictor, out, fmt, cache_dir)
        parity = check_parity(predictor, LitePredictor.load(out), sample)
        if parity["max_abs_difference"] > FLOAT_TOLERANCE:
            raise WeightsError(f"the exported model disagrees with the Keras model by "
                               f"{parity['max_abs_difference']:.2e} (tolerance {FLOAT_TOLERANCE:.0e}); nothing was written")
    except BaseException:  # no half-checked export is left behind, whatever went wrong
        for path in (out, info_path, gate_path):
            remove(path)
        raise
    write_json(info_path, {**sidecar(predictor, fmt), "parity": parity})
    return ExportResult(out, parity)


def write_export(predictor: KerasPredictor, out: Path, fmt: str, cache_dir: Path | None = None) -> None:
    """The model file, its sidecar (parity still to come) and its gate. A LiteRT or ONNX file is
    converted once per model and kept with the backbone's conversions: exporting the same model again
    (to another place, or after model.keras was touched) copies it and checks it again."""
    network = with_features(predictor.model)
    if fmt == "savedmodel":
        with atomic_folder(out) as temporary:
            network.export(str(temporary), format="tf_saved_model", verbose=False)
    else:
        made = converted(network, fmt, conversions_dir(Path(cache_dir or default_cache_dir())), tag="export")
        with atomic_path(out) as temporary:
            shutil.copyfile(made, temporary)
    info_path, gate_path = sidecar_paths(out)
    write_json(info_path, sidecar(predictor, fmt))
    if predictor.ood is not None:
        predictor.ood.save(gate_path)


def with_features(network: keras.Model) -> keras.Model:
    """The network with a second output, the backbone's features, which the gate reads."""
    backbone, head = network.get_layer("backbone"), network.get_layer("head")
    image = keras.Input(backbone.input_shape[1:], name="image")
    features = backbone(image)
    both = keras.Model(image, [head(features), features], name="lungxray_export")
    both(np.zeros((1, *backbone.input_shape[1:]), np.float32))  # the ONNX exporter wants a model that has run
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # the exporters log every asset they write
    return both


def sidecar(predictor: KerasPredictor, fmt: str) -> dict:
    hashes = "".join(sorted(predictor.train_hashes or []))
    return {
        "format": fmt, "lungxray_version": __version__, "classes": predictor.classes,
        "input": {"size": predictor.image_size, "channels": 3, "dtype": "float32", "range": [0, 255],
                  "order": "RGB", "resize": predictor.interpolation, "intensity": predictor.intensity},
        "outputs": ["probabilities (softmax, before temperature scaling)", "backbone features"],
        "temperature": predictor.temperature,
        "conformal": predictor.conformal.to_json() if predictor.conformal else None,
        "training_data_fingerprint": hashlib.sha256(hashes.encode()).hexdigest() if hashes else None,
        "trained": predictor.info.get("trained"), "architecture": predictor.info.get("architecture"),
        "exported_from": dataclasses.asdict(predictor.identity),  # the run's model (an export answers as itself)
    }


def parity_sample(run: RunDir, data: str | Path | None, size: int) -> list[Path]:
    """A seeded sample of validation images: the run's own split unless `data` is given."""
    source = Path(data) if data else run.path(run.DATA)
    if not source.exists():
        raise DataError(f"no images to check the export on: {source} does not exist; give --data")
    dataset = load_dataset(source)
    records = dataset.split("val") or dataset.records
    chosen = np.random.default_rng(0).permutation(len(records))[:size]
    return [records[i].path for i in sorted(chosen)]


def check_parity(reference: KerasPredictor, exported: LitePredictor, paths: list[Path]) -> dict:
    """Largest probability difference and label agreement, exported against Keras, on `paths`."""
    expected = reference.predict_files(paths, desc="Keras").raw
    got = exported.predict_files(paths, desc="exported").raw
    both = ~np.isnan(expected).any(axis=1) & ~np.isnan(got).any(axis=1)
    if not both.any():
        raise DataError("none of the images chosen to check the export could be read")
    return {"images": int(both.sum()), "max_abs_difference": float(np.abs(expected[both] - got[both]).max()),
            "label_agreement": float(np.mean(expected[both].argmax(axis=1) == got[both].argmax(axis=1))),
            "tolerance": FLOAT_TOLERANCE}
