"""Does a configuration learn the disease or the hospital? Leave-one-source-out, for each configuration.

    python benchmarks/generalisation.py --data ../shared/cxr/manifest.csv \
        --weights ../shared/weights/mobilenet_v3_small_imagenet_tv_no_top.weights.h5 [--write-docs]

For each configuration: a run on all sources (internal test split), a run with
`ieee8023_covid-chestxray` held out (adult covid and adult pneumonia from case reports) and a run
with `rsna_lung_opacity` held out (adult pneumonia from NIH films). Run folders are kept under --out
and reused when complete, so an interrupted benchmark picks up where it stopped. `--write-docs`
replaces the table between the generalisation markers in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from lungxray import Config, RunDir, train
from lungxray.evaluate.schema import read_metrics

HELD_OUT = {"ieee8023": "ieee8023_covid-chestxray", "rsna": "rsna_lung_opacity"}
CONFIGURATIONS = {
    "reference": {},
    "balance class x source": {"balance": "class_source"},
    "worst-group selection": {"monitor": "val_worst_group_accuracy"},
    "histogram equalisation": {"intensity": "equalize"},
    "average pooling": {"pooling": "avg"},
    "lung crop": {"crop": "lungs"},
    "lung crop + worst-group selection": {"crop": "lungs", "monitor": "val_worst_group_accuracy"},
    "lung crop + balance + worst-group": {"crop": "lungs", "balance": "class_source",
                                          "monitor": "val_worst_group_accuracy"},
    "average pooling + worst-group selection": {"pooling": "avg", "monitor": "val_worst_group_accuracy"},
    "average pooling + lung crop + worst-group": {"pooling": "avg", "crop": "lungs",
                                                  "monitor": "val_worst_group_accuracy"},
    "average pooling + worst-group + equalisation": {"pooling": "avg", "monitor": "val_worst_group_accuracy",
                                                     "intensity": "equalize"},
    "robust preset": "robust",
    "robust + blocks from conv_1 fine-tuned": {"pooling": "avg", "monitor": "val_worst_group_accuracy",
                                              "train_from": "conv_1", "fine_tune_epochs": 10,
                                              "fine_tune_learning_rate": 1e-4},
    "robust + blocks from expanded_conv_9 fine-tuned": {"pooling": "avg", "monitor": "val_worst_group_accuracy",
                                                        "train_from": "expanded_conv_9", "fine_tune_epochs": 10,
                                                        "fine_tune_learning_rate": 1e-4},
    "robust + 6 training views": {"pooling": "avg", "monitor": "val_worst_group_accuracy", "views": 6},
    "robust + 6 views + blocks from conv_1 fine-tuned": {"pooling": "avg", "monitor": "val_worst_group_accuracy",
                                                         "views": 6, "train_from": "conv_1", "fine_tune_epochs": 10,
                                                         "fine_tune_learning_rate": 1e-4},
}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
MARKERS = ("<!-- generalisation table: start -->", "<!-- generalisation table: end -->")
SOURCES = ("covid19-radiography-db", "kermany_224", "kermany_fullres", "covid-cxnet", "ieee8023_covid-chestxray",
           "rsna_lung_opacity")


def configuration(spec, weights: str, lung_masks: str | None) -> Config:
    settings = {"weights": weights, "lung_masks": lung_masks}
    if isinstance(spec, str):
        return Config.preset(spec).replace(**settings)
    return Config(**{**settings, **spec})


def run(data: Path, folder: Path, config: Config, cache: Path | None) -> RunDir:
    """Train into `folder` unless a finished run is already there."""
    if not (folder / RunDir.REPORT).is_file():
        train(data, folder, config, cache_dir=cache)
    return RunDir(folder)


def interval(metrics, key: str) -> str:
    entry = metrics.get("intervals", {}).get(key) or {}
    if entry.get("value") is None:
        return "n/a"
    low, high = entry["ci95"]
    return f"{entry['value']:.2f} ({low:.2f}–{high:.2f})"


def group_accuracy(metrics, column: str, value: str) -> str:
    group = metrics.get("subgroups", {}).get(column, {}).get(value)
    return "n/a" if group is None else f"{group['accuracy']:.2f}"


def row(name: str, runs: dict[str, RunDir]) -> str:
    internal = read_metrics(runs["internal"].evaluation())
    ieee = read_metrics(runs["ieee8023"].evaluation(external=True))
    rsna = read_metrics(runs["rsna"].evaluation(external=True))
    seconds = read_timings(runs["internal"])
    cells = [
        name,
        f"{internal['macro_auroc']:.3f}", f"{internal['accuracy']:.3f}",
        group_accuracy(internal, "age_group", "adult"), group_accuracy(internal, "age_group", "pediatric"),
        f"{ieee['pairwise_auroc']['covid_vs_pneumonia']:.3f}", f"{ieee['macro_auroc']:.3f}",
        interval(ieee, "sensitivity/covid"), interval(ieee, "sensitivity/pneumonia"), f"{ieee['calibration']['ece']:.3f}",
        interval(rsna, "sensitivity/pneumonia"), f"{seconds:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def source_row(name: str, runs: dict[str, RunDir]) -> str:
    """Internal test accuracy on each source's films (n in the header)."""
    internal = read_metrics(runs["internal"].evaluation())
    return "| " + " | ".join([name, *(group_accuracy(internal, "source", source) for source in SOURCES)]) + " |"


def source_header(runs: dict[str, RunDir]) -> str:
    groups = read_metrics(runs["internal"].evaluation()).get("subgroups", {}).get("source", {})
    names = [f"{source} (n={groups[source]['n']})" if source in groups else source for source in SOURCES]
    return "| internal test accuracy by source | " + " | ".join(names) + " |\n|---|" + "---|" * len(SOURCES)


def read_timings(run_dir: RunDir) -> float:
    return json.loads(run_dir.path(run_dir.TIMINGS).read_text())["total"]


HEADER = ("| configuration | internal macro AUROC | internal accuracy | internal adult acc. | internal pediatric acc. "
          "| ieee8023 held out: pneumonia-vs-covid AUROC | macro AUROC | covid sensitivity (95% CI) "
          "| pneumonia sensitivity (95% CI) | ECE | rsna held out: pneumonia sensitivity (95% CI) | train() s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def write_docs(table: str) -> None:
    text = DOCS.read_text()
    start, end = (re.escape(m) for m in MARKERS)
    replaced, count = re.subn(f"{start}.*?{end}", f"{MARKERS[0]}\n{table}\n{MARKERS[1]}", text, flags=re.S)
    if count != 1:
        sys.exit(f"{DOCS} lacks the generalisation markers {MARKERS}")
    DOCS.write_text(replaced)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="manifest CSV with source and age_group columns")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--lung-masks", help="films with lung masks, for the configurations that crop to the lungs")
    parser.add_argument("--out", type=Path, default=Path("runs/generalisation"))
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--only", action="append", help="run only these configurations (repeatable)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    rows, by_source = [], []
    for name, spec in CONFIGURATIONS.items():
        if args.only and name not in args.only:
            continue
        config = configuration(spec, args.weights, args.lung_masks)
        folder = args.out / name.replace(" ", "-").replace("+", "and")
        runs = {"internal": run(args.data, folder / "internal", config, args.cache)}
        for short, source in HELD_OUT.items():
            runs[short] = run(args.data, folder / f"without-{short}", config.replace(holdout_source=source), args.cache)
        rows.append(row(name, runs))
        by_source.append(source_row(name, runs))
        print(rows[-1], flush=True)
    table = HEADER + "\n" + "\n".join(rows) + "\n\n" + source_header(runs) + "\n" + "\n".join(by_source)
    print(table)
    if args.write_docs:
        write_docs(table)


if __name__ == "__main__":
    main()
