"""Runtimes for exported models: LiteRT interpreters (`InterpreterPool`, also the cached engine's
backbone runtime) and ONNX Runtime sessions (`OnnxSession`), without TensorFlow, and TensorFlow
SavedModels (`SavedModelRunner`). Each takes a sequence of images and returns each output as an
(n, *shape) array.

LiteRT: one single-threaded interpreter per core, borrowed by whichever thread needs one: measured here,
two such interpreters in two threads give 1,160 images/s against 1,010 for one interpreter with
two threads, and they do not stall when decoding threads take a core."""

from __future__ import annotations

import os
import queue
from pathlib import Path

import numpy as np


def litert_available() -> bool:
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def as_batch(images) -> np.ndarray:
    """An (n, H, W, C) float32 array from an array or a sequence of (H, W, C) arrays."""
    return np.asarray(np.stack(images) if isinstance(images, (list, tuple)) else images, np.float32)


class InterpreterPool:
    def __init__(self, model_path: Path, size: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self._free: queue.Queue = queue.Queue()
        for _ in range(size or os.cpu_count() or 1):
            interpreter = Interpreter(model_path=str(model_path), num_threads=1)
            interpreter.allocate_tensors()
            self._free.put(interpreter)
        interpreter = self._free.queue[0]
        self.input_shape = tuple(interpreter.get_input_details()[0]["shape"][1:])
        self.output_shapes = [tuple(d["shape"][1:]) for d in interpreter.get_output_details()]

    def __call__(self, images) -> list[np.ndarray]:
        """Each output, (n, *shape), for a sequence or array of n images."""
        interpreter = self._free.get()
        try:
            (source,), targets = interpreter.get_input_details(), interpreter.get_output_details()
            outputs = [np.empty((len(images), *shape), np.float32) for shape in self.output_shapes]
            for row, image in enumerate(images):
                interpreter.set_tensor(source["index"], np.asarray(image, np.float32)[None])
                interpreter.invoke()
                for output, target in zip(outputs, targets):
                    output[row] = interpreter.get_tensor(target["index"])[0]
            return outputs
        finally:
            self._free.put(interpreter)


class OnnxSession:
    """An ONNX Runtime session (thread-safe: threads share it)."""

    def __init__(self, model_path: Path):
        import onnxruntime  # the CLI turns its absence into "pip install 'lungxray[onnx]'"
        self.session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = tuple(self.session.get_inputs()[0].shape[1:])
        self.output_shapes = [tuple(output.shape[1:]) for output in self.session.get_outputs()]

    def __call__(self, images) -> list[np.ndarray]:
        batch = as_batch(images)
        return [np.asarray(output, np.float32) for output in self.session.run(None, {self.input_name: batch})]


class SavedModelRunner:
    """A SavedModel's serving signature (this one needs TensorFlow)."""

    def __init__(self, model_path: Path):
        import tensorflow as tf

        signature = tf.saved_model.load(str(model_path)).signatures["serving_default"]
        (self.input_name, spec), = signature.structured_input_signature[1].items()
        self.input_shape = tuple(spec.shape[1:])
        # Keras names a multi-output model's outputs output_0, output_1... in the model's order.
        self._names = sorted(signature.structured_outputs)
        self.output_shapes = [tuple(signature.structured_outputs[name].shape[1:]) for name in self._names]
        self._signature, self._tf = signature, tf

    def __call__(self, images) -> list[np.ndarray]:
        batch = as_batch(images)
        outputs = self._signature(**{self.input_name: self._tf.constant(batch)})
        return [outputs[name].numpy() for name in self._names]
