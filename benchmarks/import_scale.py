"""`lungxray data import` at the scale of the big collections: 200,000 rows in NIH ChestX-ray14's and
CheXpert's published formats (synthetic rows, real headers and value conventions), each file present
as an empty file (importers never read pixels). Prints seconds and peak memory of each import, run in
a child process of its own.

    python benchmarks/import_scale.py [--rows 200000]

Target (issue #19): 200,000 rows in <= 60 s with <= 1 GB.
"""

from __future__ import annotations

import argparse
import csv
import random
import subprocess
import sys
import tempfile
from pathlib import Path

NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
NIH_FINDINGS = ["No Finding"] * 6 + ["Pneumonia", "Effusion", "Infiltration|Pneumonia", "Atelectasis", "Cardiomegaly"]
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                   "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                   "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]


def make_nih(root: Path, rows: int, rng: random.Random) -> None:
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(NIH_HEADER)
        for i in range(rows):
            patient, follow_up = i // 4 + 1, i % 4
            name = f"{patient:08d}_{follow_up:03d}.png"
            folder = root / f"images_{i % 12 + 1:03d}" / "images"
            (folder / name).touch()
            writer.writerow([name, rng.choice(NIH_FINDINGS), follow_up, patient, rng.randint(1, 95),
                             rng.choice("MF"), rng.choice(["PA", "AP"]), 2500, 2048, 0.168, 0.168])


def make_chexpert(root: Path, rows: int, rng: random.Random) -> None:
    release = root / "CheXpert-v1.0-small"
    with open(release / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CHEXPERT_HEADER)
        for i in range(rows):
            patient, study = i // 3 + 1, i % 3 + 1
            lateral = rng.random() < 0.15
            path = f"train/patient{patient:05d}/study{study}/view1_{'lateral' if lateral else 'frontal'}.jpg"
            (release / path).parent.mkdir(parents=True, exist_ok=True)
            (release / path).touch()
            values = [rng.choice(["", "", "1.0", "0.0", "-1.0"]) for _ in CHEXPERT_HEADER[5:]]
            writer.writerow([f"CheXpert-v1.0-small/{path}", rng.choice(["Male", "Female"]), rng.randint(18, 90),
                             "Lateral" if lateral else "Frontal", "" if lateral else rng.choice(["AP", "PA"]), *values])


CHILD = """
import resource, sys, time
from lungxray.data.importers import import_collection
started = time.perf_counter()
summary = import_collection(sys.argv[1], sys.argv[2], sys.argv[3])
print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      sum(summary.kept.values()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    rng = random.Random(0)
    print("| collection | rows | kept | import s | peak RSS MB |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for kind, make in (("nih", make_nih), ("chexpert", make_chexpert)):
            root = Path(folder) / kind
            for sub in [f"images_{i:03d}/images" for i in range(1, 13)] if kind == "nih" else ["CheXpert-v1.0-small"]:
                (root / sub).mkdir(parents=True)
            make(root, args.rows, rng)
            output = subprocess.run([sys.executable, "-c", CHILD, kind, str(root), str(Path(folder) / f"{kind}.csv")],
                                    capture_output=True, text=True, check=True).stdout.split()
            seconds, peak, kept = float(output[0]), float(output[1]), int(output[2])
            print(f"| {kind} | {args.rows:,} | {kept:,} | {seconds:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
