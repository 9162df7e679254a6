"""Simulated deployments for `lungxray monitor`: the test split's films, then a shift switched on.

    python benchmarks/monitor_shifts.py --model RUN [--data ../shared/cxr] [--window 100] [--before 500] [--after 500]
        [--through predict,serve,dicom] [--silent-trial N]

Each deployment is the same `--before` films of the run's internal test split in random order, then
up to `--after` films of one shift, drawn from the rest of the split: pediatric films only; one
source hospital only (kermany_224); the test films with a gamma of 0.5 (a contrast change); with
noise and JPEG quality 15 (a scanner change); pneumonia at twice its share (a prevalence shift); one
film in five not a chest film (CT and MR slices from pydicom's test files, fundus and microscopy
images and photographs from scikit-image's, each cropped, turned and sized afresh). The films go,
in order, through the run's export by each path of `--through`, each writing the records a
deployment would:

- predict: `lungxray predict --out` (`infer.batch.score`);
- serve: a `lungxray serve --records FILE` process, each film uploaded to /api/predict;
- dicom: a `lungxray dicom listen --records FILE` process, each film sent to it by C-STORE as a CR
  (its reports go to a Storage SCP standing in for the PACS); the reads are keyed by SOP Instance UID.

Then they are monitored with the films' reads (none for the non-chest images), against the run's
reference or, with `--silent-trial N`, against the records of N of the run's validation films sent
through the same path first (a silent trial: the reference recorded the way the deployment records).
Printed per path and shift: false alarms before the switch, the films after it until the first
alarmed window ("-" for none), the mean out-of-distribution rate and label-free estimate and the
mean realised accuracy over the shifted windows.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serve_load import server  # noqa: E402
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


def not_chest_images() -> list[np.ndarray]:
    """Grey images of anything but a chest film: real CT and MR slices, fundus and microscopy images,
    photographs."""
    import skimage.data
    from pydicom.data import get_testdata_file

    images = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        pixels = pydicom.dcmread(get_testdata_file(name)).pixel_array.astype(float)
        images.append((255 * (pixels - pixels.min()) / np.ptp(pixels)).astype(np.uint8))
    for name in ("retina", "microaneurysms", "immunohistochemistry", "camera", "moon", "coins", "page", "text",
                 "brick", "grass", "clock", "astronaut", "coffee", "rocket", "hubble_deep_field", "cat"):
        images.append(np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("L")))
    return images


def not_chest(rng, pool: list[np.ndarray]) -> Image.Image:
    """One of `pool`, cropped (70-100% of each side), turned by a multiple of 90 degrees and sized to 512."""
    pixels = pool[rng.integers(len(pool))]
    height, width = (int(side * rng.uniform(0.7, 1.0)) for side in pixels.shape)
    top, left = rng.integers(pixels.shape[0] - height + 1), rng.integers(pixels.shape[1] - width + 1)
    cropped = np.rot90(pixels[top:top + height, left:left + width], rng.integers(4))
    return Image.fromarray(np.ascontiguousarray(cropped)).resize((512, 512))


def shifts(rows: list[dict], after: int, rng: random.Random) -> dict[str, tuple[list[dict], object]]:
    """Each shift's films (rows of the manifest, None for a non-chest image) and the change made to
    their pixels, if any."""
    pneumonia = [r for r in rows if r["label"] == "pneumonia"]
    share = len(pneumonia) / len(rows)
    doubled = rng.sample(pneumonia, int(2 * share * after)) + rng.sample(
        [r for r in rows if r["label"] != "pneumonia"], after - int(2 * share * after))
    mixed = [None if i % 5 == 4 else row for i, row in enumerate(rng.sample(rows, after))]
    return {"pediatric only": ([r for r in rows if r["age_group"] == "pediatric"][:after], None),
            "one source (kermany_224)": ([r for r in rows if r["source"] == "kermany_224"][:after], None),
            "contrast (gamma 0.5)": (rng.sample(rows, after), gamma),
            "scanner (noise, JPEG q15)": (rng.sample(rows, after), scanner),
            "prevalence (pneumonia x2)": (rng.sample(doubled, len(doubled)), None),
            "1 in 5 not a chest film": (mixed, None)}


def deployment(base: list[dict], shifted: list[dict | None], change, data: Path,
               folder: Path) -> list[tuple[Path, str | None]]:
    """The films in order (changed and non-chest ones written to `folder`), each with its read."""
    rng, pool = np.random.default_rng(0), None
    films = []
    for index, row in enumerate(base + shifted):
        if row is None:
            pool = pool or not_chest_images()
            path = folder / f"{index}.png"
            not_chest(rng, pool).save(path)
        elif change is not None and index >= len(base):
            path = folder / f"{index}.png"
            change(Image.open(data / row["file"]), rng).convert("L").save(path)
        else:
            path = data / row["file"]
        films.append((path, row and row["label"]))
    return films


def write_reads(reads: list[tuple[str, str]], key: str, path: Path) -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([(key, "label"), *reads])
    return path


def through_predict(export: Path, films, folder: Path) -> tuple[list[Path], Path]:
    manifest = folder / "deployment.csv"
    manifest.write_text("file\n" + "\n".join(str(path) for path, _ in films) + "\n")
    score(export, [manifest], folder / "scored", batch_size=10_000)
    reads = [(file_hash(path.read_bytes()), label) for path, label in films if label]
    return [folder / "scored"], write_reads(reads, "sha256", folder / "reads.csv")


def through_serve(export: Path, films, folder: Path) -> tuple[list[Path], Path]:
    import httpx

    records = folder / "records.jsonl"
    with server(str(export), 1, folder / "audit.jsonl", options=("--records", str(records))) as (port, _):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for path, _ in films:
                answer = client.post("/api/predict", files={"file": (path.name, path.read_bytes(), "image/png")})
                answer.raise_for_status()
    reads = [(file_hash(path.read_bytes()), label) for path, label in films if label]
    return [records], write_reads(reads, "sha256", folder / "reads.csv")


def through_dicom(export: Path, films, folder: Path) -> tuple[list[Path], Path]:
    from lungxray.dicom.send import Peer, send_files
    from tests.test_dicom_node import Pacs, listen
    from tests.test_distribute import free_ports
    from tests.test_pacs import cr_film

    crs, reads = [], []
    for index, (path, label) in enumerate(films):
        film = cr_film(folder / f"film{index:04d}.dcm", np.asarray(Image.open(path).convert("L")))
        crs.append(film)
        if label:
            reads.append((str(pydicom.dcmread(film, stop_before_pixels=True).SOPInstanceUID), label))
    records = folder / "records.jsonl"
    node_port, pacs_port = free_ports(2)
    pacs = Pacs(pacs_port).start()
    node = listen(export, folder / "spool", node_port, pacs_port, options=("--records", str(records)))
    try:
        sent = send_files(crs, Peer("LUNGXRAY", "127.0.0.1", node_port))
        assert all(outcome == "sent" for _, outcome in sent), sent
        deadline = time.monotonic() + 600
        while (records.read_text().count("\n") if records.exists() else 0) < len(crs):
            assert time.monotonic() < deadline, "the node did not answer every film"
            time.sleep(0.5)
    finally:
        node.terminate()
        node.wait(timeout=60)
        pacs.stop()
    return [records], write_reads(reads, "sop_instance_uid", folder / "reads.csv")


THROUGH = {"predict": through_predict, "serve": through_serve, "dicom": through_dicom}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a run folder with its reference.jsonl and export")
    parser.add_argument("--data", default="../shared/cxr")
    parser.add_argument("--window", default="100")
    parser.add_argument("--before", type=int, default=500)
    parser.add_argument("--after", type=int, default=500)
    parser.add_argument("--through", default="predict", help=f"a comma-separated list of {', '.join(THROUGH)}")
    parser.add_argument("--silent-trial", type=int, default=0, metavar="N",
                        help="the reference: N validation films through the same path (default 0: the run's)")
    args = parser.parse_args()
    paths = args.through.split(",")
    if not set(paths) <= set(THROUGH):
        parser.error(f"--through takes {', '.join(THROUGH)}. Got {args.through!r} instead.")
    data = Path(args.data)
    rows = [r for r in csv.DictReader(open(data / "manifest.csv", newline="")) if r["split"] == "test"]
    export = Path(args.model) / "export" / "model.tflite"
    print("path | shift | films after | alarms before the switch | films until alarm | OOD rate | estimated "
          "| realised (shifted windows)")
    trial = tempfile.TemporaryDirectory()
    validation = [r for r in csv.DictReader(open(data / "manifest.csv", newline="")) if r["split"] == "val"]
    for through in paths:
        reference = None
        if args.silent_trial:
            folder = Path(trial.name) / through
            folder.mkdir()
            sample = random.Random(1).sample(validation, args.silent_trial)
            reference, _ = THROUGH[through](export, [(data / r["file"], None) for r in sample], folder)
        rng = random.Random(0)  # the same deployments by every path
        # The films before the switch are drawn first, from the whole split: drawn from what a shift
        # left, they would lack its films (the pediatric ones, say) and be shifted themselves.
        base = rng.sample(rows, args.before)
        drawn = {r["file"] for r in base}
        for name, (shifted, change) in shifts([r for r in rows if r["file"] not in drawn], args.after, rng).items():
            with tempfile.TemporaryDirectory() as folder:
                films = deployment(base, shifted, change, data, Path(folder))
                records, reads = THROUGH[through](export, films, Path(folder))
                result = monitor(records, args.model, args.window, reads, Path(folder) / "monitoring", reference)
            size = int(args.window)
            before = [w for i, w in enumerate(result.windows) if (i + 1) * size <= args.before]
            after = result.windows[len(before):]
            first = next((i for i, w in enumerate(after) if w["alarms"]), None)
            ood = np.mean([w["ood_rate"] for w in after])
            estimated = np.mean([w["estimated"]["accuracy"] for w in after])
            realised = np.mean([w["realised"]["accuracy"] for w in after if w["realised"]])
            kinds = sorted({kind for w in before for kind in w["alarms"]})
            print(f"{through} | {name} | {len(shifted)} | {sum(bool(w['alarms']) for w in before)} of {len(before)} "
                  f"{kinds or ''} | {'-' if first is None else (first + 1) * size} | {ood:.3f} | {estimated:.3f} "
                  f"| {realised:.3f}", flush=True)


if __name__ == "__main__":
    main()
