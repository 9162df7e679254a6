"""Start-up time of `lungxray` commands, whole process, median of N runs.

    python benchmarks/startup.py [--runs 7]

Commands that need no model must not pay for TensorFlow; the last row (importing the KerasPredictor,
which loads TensorFlow) shows what they would otherwise pay.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def seconds(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    lungxray = shutil.which("lungxray") or str(Path(sys.executable).parent / "lungxray")
    with tempfile.TemporaryDirectory() as dest:
        for split in ("train", "val", "test"):  # an already fetched dataset
            (Path(dest) / "Dataset" / "Dataset" / split).mkdir(parents=True)
        commands = {
            "lungxray --help": [lungxray, "--help"],
            "lungxray train --help": [lungxray, "train", "--help"],
            "lungxray data fetch --print-path": [lungxray, "data", "fetch", "--print-path", "--dest", dest],
            "lungxray compare --help": [lungxray, "compare", "--help"],
            "python -c 'from lungxray import KerasPredictor' (TensorFlow)": [sys.executable, "-c",
                                                                       "from lungxray import KerasPredictor"],
        }
        print(f"| command | median s of {args.runs} |\n|---|---|")
        for name, argv in commands.items():
            print(f"| `{name}` | {seconds(argv, args.runs):.3f} |")


if __name__ == "__main__":
    main()
