"""Why `lungxray export` offers no int8 format: TensorFlow Lite's post-training quantisation of this
network, measured against the float Keras model on the run's own images.

    python benchmarks/quantisation.py --model RUN_DIR [--calibration 200] [--n 300]

Variants: dynamic-range (int8 weights, float activations), full-integer int8 (int8 weights and
activations, float input and output, calibrated on `--calibration` training images), and 16x8
(int16 activations). Each row: largest probability difference and label agreement with Keras and
the relative L2 error of the backbone features on `--n` validation images, and accuracy on `--n`
test images against Keras' accuracy on the same images.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from lungxray.data.records import load_dataset
from lungxray.infer.export import with_features
from lungxray.infer.keras_predictor import KerasPredictor

VARIANTS = {
    "dynamic-range int8": dict(representative=False, ops=None),
    "full-integer int8": dict(representative=True, ops=[tf.lite.OpsSet.TFLITE_BUILTINS_INT8]),
    "16x8": dict(representative=True, ops=[tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]),
}


def convert(network, calibration: list[np.ndarray], representative: bool, ops) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(network)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if representative:
        converter.representative_dataset = lambda: ([np.asarray(image, np.float32)[None]] for image in calibration)
    if ops:
        converter.target_spec.supported_ops = ops
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints every captured variable
        return converter.convert()


def run_tflite(blob: bytes, images: list[np.ndarray], classes: int) -> tuple[np.ndarray, np.ndarray]:
    # Reference kernels: XNNPACK refuses to prepare the full-integer graph ("failed to prepare").
    interpreter = Interpreter(model_content=blob, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    source, targets = interpreter.get_input_details()[0], interpreter.get_output_details()
    probabilities, features = [], []
    for image in images:
        interpreter.set_tensor(source["index"], np.asarray(image, np.float32)[None])
        interpreter.invoke()
        outputs = [interpreter.get_tensor(target["index"])[0] for target in targets]
        which = 0 if outputs[0].shape == (classes,) else 1
        probabilities.append(outputs[which])
        features.append(outputs[1 - which])
    return np.array(probabilities), np.array(features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calibration", type=int, default=200)
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()

    predictor = KerasPredictor.load(args.model, runtime="keras")
    dataset = load_dataset(args.model / "data.csv")
    rng = np.random.default_rng(0)

    def sample(split: str, n: int):
        records = dataset.split(split)
        return [records[i] for i in sorted(rng.permutation(len(records))[:n])]

    calibration = [predictor.read(record.path) for record in sample("train", args.calibration)]
    validation = [predictor.read(record.path) for record in sample("val", args.n)]
    test = sample("test", args.n)
    test_images = [predictor.read(record.path) for record in test]
    truth = np.array([predictor.classes.index(record.label) for record in test])

    network = with_features(predictor.model)
    keras_val, keras_features = network.predict(np.stack(validation).astype(np.float32), verbose=0)
    keras_test = network.predict(np.stack(test_images).astype(np.float32), verbose=0)[0]
    print(f"{args.calibration} calibration (train), {len(validation)} validation and {len(test)} test images; "
          f"Keras float test accuracy {np.mean(keras_test.argmax(1) == truth):.3f}\n")
    print("| variant | size (KB) | max prob. difference | label agreement | feature error (rel. L2) | test accuracy |")
    print("|---|---|---|---|---|---|")
    for name, settings in VARIANTS.items():
        try:
            blob = convert(network, calibration, **settings)
            probabilities, features = run_tflite(blob, validation, len(predictor.classes))
            test_probabilities, _ = run_tflite(blob, test_images, len(predictor.classes))
        except Exception as error:  # a variant the converter or the interpreter refuses is a row, not a crash
            print(f"| {name} | – | failed: {str(error).splitlines()[0][:80]} | | | |")
            continue
        print(f"| {name} | {len(blob) // 1024} | {np.abs(probabilities - keras_val).max():.3f} "
              f"| {np.mean(probabilities.argmax(1) == keras_val.argmax(1)):.1%} "
              f"| {np.linalg.norm(features - keras_features) / np.linalg.norm(keras_features):.3f} "
              f"| {np.mean(test_probabilities.argmax(1) == truth):.3f} |")


if __name__ == "__main__":
    main()
