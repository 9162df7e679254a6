"""Monitoring at scale, and what a record costs a service.

    python benchmarks/monitor.py --model RUN [--records 1000000] [--window 500]

1. `lungxray monitor` over RECORDS records (the run's reference records drawn again with new times,
   written to a temporary records file first, not timed), in a child process: wall seconds and the
   child's peak resident memory (target: 1,000,000 records in <= 60 s and <= 1 GB on 2 cores).
2. The cost of a monitoring record per answer, as `serve --records` pays it, against the time `serve`
   takes per image in process (the run's export predicting one 224 x 224 image after decoding it;
   target: <= 2%): in all (the image's statistics, the record, its line written), and on the event
   loop alone (the record and its line; `serve` reads the statistics in the thread that decodes).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lungxray.infer.answer import answer_row  # noqa: E402
from lungxray.infer.loader import load_predictor  # noqa: E402
from lungxray.infer.monitoring_record import RecordWriter, monitoring_record, observation  # noqa: E402
from lungxray.monitor.records import read_reference  # noqa: E402


def write_deployment(run: str, count: int, path: Path) -> None:
    reference = read_reference(run)
    rng = np.random.default_rng(0)
    start = datetime(2026, 12, 1, tzinfo=timezone.utc)
    with path.open("w") as handle:
        for index, row in enumerate(rng.integers(0, len(reference), count)):
            record = dict(reference[row], time=(start + timedelta(seconds=index)).isoformat())
            handle.write(json.dumps(record, separators=(",", ":")) + "\n")


def monitor_at_scale(run: str, count: int, window: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        records = Path(folder) / "records.jsonl"
        write_deployment(run, count, records)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "lungxray.cli", "monitor", str(records), "--model", run,
                               "--window", window, "--out", str(Path(folder) / "out")], capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode not in (0, 3):
            raise SystemExit(done.stderr[-2000:])
        windows = len(json.loads((Path(folder) / "out" / "monitoring.json").read_text())["windows"])
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"records": count, "windows": windows, "seconds": round(seconds, 1), "peak_mb": round(peak_mb)}


def record_cost(run: str, rounds: int = 1000) -> dict:
    predictor = load_predictor(run)  # the export, as `serve` runs it
    data = png_of(run)
    started = time.perf_counter()
    for _ in range(rounds):
        image = predictor.read(data, "film.png")
        predictions = predictor.predict_images(image[None])
    answer_seconds = (time.perf_counter() - started) / rounds
    answer = answer_row(predictor, predictions, 0, "film.png", "0" * 64)
    with tempfile.TemporaryDirectory() as folder, RecordWriter(Path(folder) / "records.jsonl") as writer:
        started = time.perf_counter()
        for _ in range(rounds):
            observed = observation(data, image, "film.png")
        observed_seconds = (time.perf_counter() - started) / rounds
        started = time.perf_counter()
        for _ in range(rounds):
            writer.write(monitoring_record(answer, observed=observed))
        written_seconds = (time.perf_counter() - started) / rounds
    record_seconds = observed_seconds + written_seconds
    return {"answer_ms": round(answer_seconds * 1000, 3), "record_ms": round(record_seconds * 1000, 3),
            "share": round(record_seconds / answer_seconds, 4), "event_loop_ms": round(written_seconds * 1000, 3),
            "event_loop_share": round(written_seconds / answer_seconds, 4)}


def png_of(run: str) -> bytes:
    """The first film of the run's test split, as PNG bytes."""
    import csv

    with open(Path(run) / "data.csv", newline="") as handle:
        file = next(row["file"] for row in csv.DictReader(handle) if row["split"] == "test")
    buffer = io.BytesIO()
    Image.open(file).convert("L").save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a run folder with its reference.jsonl and export")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--window", default="500")
    args = parser.parse_args()
    cost = record_cost(args.model)
    print(f"record per answer: {cost['record_ms']} ms against {cost['answer_ms']} ms to answer one image in process "
          f"({100 * cost['share']:.2f}%); on serve's event loop {cost['event_loop_ms']} ms "
          f"({100 * cost['event_loop_share']:.2f}%)")
    scale = monitor_at_scale(args.model, args.records, args.window)
    print(f"monitor: {scale['records']:,} records, {scale['windows']} windows of {args.window}, "
          f"{scale['seconds']} s, peak {scale['peak_mb']} MB")


if __name__ == "__main__":
    main()
