"""Prediction speed: the Keras run against its LiteRT, ONNX and SavedModel exports, in one run,
decode included, and where each export's time goes.

    python benchmarks/inference.py --model RUN_DIR [--images ../shared/cxr/test] [--n 1000]

Exports the run where an export is missing. First table: batch prediction from JPEG files on disk
(images/s; the Keras predictor with an empty feature cache, so that nothing is read back),
single-image latency on a decoded image (p50/p99 over 500 calls), and `lungxray predict one.jpg`
as a whole process (median of 5). Second table, per export: the batch split into decoding alone and
the network alone (each with the same two threads as the batch), the latency's network call alone
(the rest is calibration, the gate and Python), and the process's imports alone.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lungxray.infer.export import export_model
from lungxray.infer.lite_predictor import EXPORT_SUFFIXES, LitePredictor
from lungxray.parallel import bounded_map
from lungxray.infer.keras_predictor import KerasPredictor


def images_per_second(predictor, files: list[Path]) -> float:
    started = time.perf_counter()
    predictor.predict_files(files, desc="batch")
    return len(files) / (time.perf_counter() - started)


def latency_ms(predictor, image: np.ndarray, calls: int = 500) -> tuple[float, float]:
    for _ in range(20):
        predictor.predict_images(image[None])
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        predictor.predict_images(image[None])
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def threaded_rate(work, items: list) -> float:
    """Items per second of `work` over `items`, on predict_files' threads."""
    started = time.perf_counter()
    for _ in bounded_map(work, items):
        pass
    return len(items) / (time.perf_counter() - started)


def network_ms(predictor: LitePredictor, image: np.ndarray, calls: int = 500) -> float:
    """p50 of the runtime's call alone, on one decoded image."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        predictor.pool([image])
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 50))


def import_seconds(runs: int = 5) -> float:
    """What a `predict` process from an export pays before it opens the model: Python and the imports."""
    code = "import lungxray.cli, lungxray.infer.loader, lungxray.infer.lite_predictor"
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def profile(name: str, predictor: LitePredictor, files: list[Path], image: np.ndarray) -> str:
    images = list(bounded_map(lambda path: predictor.read(path), files))
    return (f"| {name} | {threaded_rate(predictor.read, files):.0f} | "
            f"{threaded_rate(lambda decoded: predictor.pool([decoded]), images):.0f} | "
            f"{network_ms(predictor, image):.2f} |")


def process_seconds(model: Path, image: Path, runs: int = 5) -> float:
    lungxray = str(Path(sys.executable).parent / "lungxray")
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([lungxray, "predict", "--model", str(model), str(image)], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=Path("../shared/cxr/test"))
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    exports = {fmt: args.model / "export" / f"model{suffix}" for fmt, suffix in EXPORT_SUFFIXES.items()}
    for fmt, path in exports.items():
        if not path.exists():
            export_model(args.model, path, fmt=fmt)
    files = sorted(args.images.rglob("*.jpg"))[: args.n]
    with tempfile.TemporaryDirectory() as cache:
        keras_side = KerasPredictor.load(args.model, cache_dir=Path(cache))
        image = keras_side.read(files[0])
        rows = [("Keras run (LiteRT backbone, Keras head)", keras_side, args.model)]
        rows += [(f"{fmt} export", LitePredictor.load(path), path) for fmt, path in exports.items()]
        print(f"| predictor | batch images/s ({len(files)} JPEGs) | latency p50 ms | p99 ms | `lungxray predict one.jpg` s |")
        print("|---|---|---|---|---|")
        for name, predictor, path in rows:
            rate = images_per_second(predictor, files)
            p50, p99 = latency_ms(predictor, image)
            print(f"| {name} | {rate:.0f} | {p50:.2f} | {p99:.2f} | {process_seconds(path, files[0]):.2f} |", flush=True)
        print("\n| export | decoding alone, images/s | network alone, images/s | network call p50 ms |\n|---|---|---|---|")
        for name, predictor, _ in rows[1:]:
            print(profile(name, predictor, files, image), flush=True)
        print(f"\nimports of a `predict` process from an export (python -c, median of 5): {import_seconds():.2f} s")


if __name__ == "__main__":
    main()
