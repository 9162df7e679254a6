"""Where does the model look? The share of Grad-CAM saliency inside the lung fields.

    python benchmarks/gradcam_lungs.py --masks ../shared/lungmasks RUN [RUN ...]

On the films of ../shared/lungmasks (never used for training the classifier), the Grad-CAM map of
each run's predicted class is upsampled to the mask and its mass inside the lungs is measured. A
map spread evenly over the film scores the lungs' area fraction (the "uniform" column): a model
looking at the lungs scores well above it, one reading borders and text below. For a run that crops
to the lungs, the mask is cropped with the same box, so the baseline is the lungs' share of the box.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from lungxray import KerasPredictor
from lungxray.infer.explain import GradCam, share_inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--masks", type=Path, required=True, help="folder with manifest.csv, images/, masks/")
    parser.add_argument("--per-source", type=int, default=40, help="films per source (default 40)")
    args = parser.parse_args()
    films = defaultdict(list)
    for row in csv.DictReader(open(args.masks / "manifest.csv")):
        if len(films[row["source"]]) < args.per_source:
            films[row["source"]].append(row)
    print("| run | source | films | saliency inside the lungs (mean, IQR) | uniform (lung area) |\n|---|---|---|---|---|")
    for run in args.runs:
        predictor = KerasPredictor.load(run)
        gradcam = GradCam(predictor.model)
        for source, rows in films.items():
            shares, areas = [], []
            for row in rows:
                image = predictor.read(args.masks / row["image"])
                mask = Image.open(args.masks / row["mask"]).convert("L")
                if predictor.crop is not None:  # the model saw the box around the lungs: so does the mask
                    mask = mask.crop(predictor.crop(Image.open(args.masks / row["image"]).convert("RGB")))
                mask = np.asarray(mask.resize((predictor.image_size,) * 2, Image.Resampling.NEAREST))
                heat, _ = gradcam.heatmap(image)
                shares.append(share_inside(heat, mask))
                areas.append(float((mask > 0).mean()))
            low, high = np.nanpercentile(shares, [25, 75])
            print(f"| {run} | {source} | {len(rows)} | {np.nanmean(shares):.2f} ({low:.2f}–{high:.2f}) "
                  f"| {np.mean(areas):.2f} |", flush=True)


if __name__ == "__main__":
    main()
