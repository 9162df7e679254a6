"""Training on a large merged manifest: time and peak memory of `lungxray train` at two sizes, in one run.

    LUNGXRAY_WEIGHTS=../shared/weights/mobilenet_v3_small_imagenet_tv_no_top.weights.h5 \
        python benchmarks/train_scale.py [--sizes 20000,100000] [--workdir /tmp/lungxray-scale] [--epochs 30]

The images are benchmarks/scale.py's (JPEGs re-encoded from ../shared/cxr films, made once in
WORKDIR/images). Each size gets a manifest in the shape `lungxray data merge` writes (file, label,
split, source, patient_id): a copy keeps its film's label, split and source, so no film crosses
splits. Each row is a fresh `lungxray train` process with a cold feature cache (the cached engine:
every image and its mirror image through the backbone once, then the head's epochs); memory is the
peak resident set of the process tree, sampled every 0.2 s. The difference between the two rows,
scaled to 100,000 images, is what each further 100,000 images cost.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import CXR, make_images, timed  # noqa: E402


def manifest(listing: Path, n: int) -> Path:
    """The first `n` images of scale.py's listing, labelled from the films they were made from."""
    films = list(csv.DictReader(open(CXR / "manifest.csv")))
    names = [row["file"] for row in csv.DictReader(open(listing))][:n]
    out = listing.with_name(f"manifest-{n}.csv")
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "split", "source", "patient_id"])
        for name in names:
            film = films[int(Path(name).stem) % len(films)]  # make_images' rule: image i is film i mod len
            writer.writerow([name, film["label"], film["split"], film["source"], film["patient_id"]])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20000,100000", help="manifest sizes, comma-separated")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lungxray-scale"))
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))

    listing = make_images(sizes[-1], args.workdir / "images")
    lungxray = str(Path(sys.executable).parent / "lungxray")
    print(f"{os.cpu_count()} cores, {args.epochs} epochs, cached engine, cold cache each row\n")
    print("| images | wall s | images/s | peak memory MB |\n|---|---|---|---|")
    peaks = []
    for n in sizes:
        run, cache = args.workdir / f"run-{n}", args.workdir / f"cache-{n}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        seconds, peak, said = timed([lungxray, "train", "--data", str(manifest(listing, n)), "--out", str(run),
                                     "--cache", str(cache), "--epochs", str(args.epochs)])
        peaks.append(peak)
        print(f"| {n:,} | {seconds:.0f} | {n / seconds:.0f} | {peak:.0f} |  <!-- {said} -->", flush=True)
    if len(sizes) > 1:
        per_100k = (peaks[-1] - peaks[0]) / (sizes[-1] - sizes[0]) * 100_000
        print(f"\neach further 100,000 images: {per_100k:.0f} MB")


if __name__ == "__main__":
    main()
