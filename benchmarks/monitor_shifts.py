"""Simulated deployments for `lungxray monitor`: the test split's films, then a shift switched on.

    python benchmarks/monitor_shifts.py --model RUN [--data ../shared/cxr] [--window 100] [--before 500] [--after 500]

Each deployment is `--before` films of the run's internal test split in random order, then up to
`--after` films of one shift: pediatric films only; one source hospital only (kermany_224); the test
films with a gamma of 0.5 (a contrast change); with noise and JPEG quality 15 (a scanner change);
pneumonia at twice its share (a prevalence shift). Each is scored by `predict --out` through the run's
export (records in the order given) and monitored with the films' labels. Printed per shift: false
alarms before the switch, the films after it until the first alarmed window ("-" for none), and the
mean label-free estimate against the mean realised accuracy over the shifted windows.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lungxray.infer.batch import score  # noqa: E402
from lungxray.io import file_hash  # noqa: E402
from lungxray.monitor import monitor  # noqa: E402


def gamma(image: Image.Image, rng) -> Image.Image:
    return Image.fromarray((255 * (np.asarray(image.convert("L")) / 255.0) ** 0.5).astype(np.uint8))


def scanner(image: Image.Image, rng) -> Image.Image:
    noisy = np.asarray(image.convert("L"), dtype=float) + rng.normal(0, 12, image.size[::-1])
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=15)
    return Image.open(buffer)


def shifts(rows: list[dict], after: int, rng: random.Random) -> dict[str, tuple[list[dict], object]]:
    """Each shift's films (rows of the manifest) and the change made to their pixels, if any."""
    pneumonia = [r for r in rows if r["label"] == "pneumonia"]
    share = len(pneumonia) / len(rows)
    doubled = rng.sample(pneumonia, int(2 * share * after)) + rng.sample(
        [r for r in rows if r["label"] != "pneumonia"], after - int(2 * share * after))
    return {"pediatric only": ([r for r in rows if r["age_group"] == "pediatric"][:after], None),
            "one source (kermany_224)": ([r for r in rows if r["source"] == "kermany_224"][:after], None),
            "contrast (gamma 0.5)": (rng.sample(rows, after), gamma),
            "scanner (noise, JPEG q15)": (rng.sample(rows, after), scanner),
            "prevalence (pneumonia x2)": (rng.sample(doubled, len(doubled)), None)}


def deployment(base: list[dict], shifted: list[dict], change, data: Path, folder: Path) -> tuple[Path, Path]:
    """A manifest of the films in order (changed films written to `folder`), and their reads."""
    rng = np.random.default_rng(0)
    files, reads = [], []
    for index, row in enumerate(base + shifted):
        path = data / row["file"]
        if change is not None and index >= len(base):
            path = folder / f"{index}.png"
            change(Image.open(data / row["file"]), rng).convert("L").save(path)
        files.append(str(path))
        reads.append((file_hash(path.read_bytes()), row["label"]))
    manifest, labels = folder / "deployment.csv", folder / "reads.csv"
    manifest.write_text("file\n" + "\n".join(files) + "\n")
    with labels.open("w", newline="") as handle:
        csv.writer(handle).writerows([("sha256", "label"), *reads])
    return manifest, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a run folder with its reference.jsonl and export")
    parser.add_argument("--data", default="../shared/cxr")
    parser.add_argument("--window", default="100")
    parser.add_argument("--before", type=int, default=500)
    parser.add_argument("--after", type=int, default=500)
    args = parser.parse_args()
    data, rng = Path(args.data), random.Random(0)
    rows = [r for r in csv.DictReader(open(data / "manifest.csv", newline="")) if r["split"] == "test"]
    export = next((Path(args.model) / "export").glob("model.tflite"))
    print("shift | films after | alarms before the switch | films until alarm | estimated | realised (shifted windows)")
    for name, (shifted, change) in shifts(rows, args.after, rng).items():
        chosen = {r["file"] for r in shifted}
        base = rng.sample([r for r in rows if r["file"] not in chosen], args.before)
        with tempfile.TemporaryDirectory() as folder:
            manifest, labels = deployment(base, shifted, change, data, Path(folder))
            score(export, [manifest], Path(folder) / "scored", batch_size=10_000)
            result = monitor([Path(folder) / "scored"], args.model, args.window, labels, Path(folder) / "monitoring")
        size = int(args.window)
        before = [w for i, w in enumerate(result.windows) if (i + 1) * size <= args.before]
        after = result.windows[len(before):]
        first = next((i for i, w in enumerate(after) if w["alarms"]), None)
        estimated = np.mean([w["estimated"]["accuracy"] for w in after])
        realised = np.mean([w["realised"]["accuracy"] for w in after if w["realised"]])
        kinds = sorted({kind for w in before for kind in w["alarms"]})
        print(f"{name} | {len(shifted)} | {sum(bool(w['alarms']) for w in before)} of {len(before)} {kinds or ''} | "
              f"{'-' if first is None else (first + 1) * size} | {estimated:.3f} | {realised:.3f}")


if __name__ == "__main__":
    main()
