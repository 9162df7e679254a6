"""The out-of-distribution gate of a trained run: false alarms on X-rays, detections on other pictures.

    python benchmarks/ood_gate.py --model RUN_DIR --data ../shared/cxr

Non-X-ray pictures: scikit-image's bundled photographs, a text document, noise and a gradient
(the same set the tests use).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lungxray import KerasPredictor  # noqa: E402
from lungxray.data.records import load_dataset  # noqa: E402
from tests.test_integration import non_xray_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default="../shared/cxr")
    parser.add_argument("--cache")
    args = parser.parse_args()
    predictor = KerasPredictor.load(args.model, cache_dir=args.cache)
    if predictor.ood is None:
        sys.exit(f"{args.model} has no out-of-distribution gate (ood.npz); retrain it")
    others = non_xray_images(Path(tempfile.mkdtemp()) / "others")
    other = predictor.predict_files(others)
    print(f"threshold (99th percentile of validation distances): {predictor.ood.threshold:.1f}\n")
    print("| images | n | flagged | rate |")
    print("|---|---|---|---|")
    for split in ("val", "test"):
        records = load_dataset(args.data).split(split)
        flags = predictor.predict_files([r.path for r in records]).ood
        print(f"| X-rays, {split} split (false alarms) | {len(flags)} | {int(flags.sum())} | {flags.mean():.3f} |")
    print(f"| non-X-ray pictures (detections) | {len(others)} | {int(other.ood.sum())} | {other.ood.mean():.3f} |")
    for path, score, flag in zip(others, other.ood_score, other.ood):
        print(f"  {path.stem:18s} distance {score:7.1f} {'flagged' if flag else 'MISSED'}")


if __name__ == "__main__":
    main()
