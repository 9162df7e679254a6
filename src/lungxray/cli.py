"""The `lungxray` command line: it parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from lungxray.data.images import ImageError
    from lungxray.data.records import DataError
    from lungxray.model import WeightsError

    try:
        return args.run(args) or 0
    except (DataError, WeightsError, ImageError, ValueError) as error:
        print(f"lungxray {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lungxray {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungxray", description="Chest X-ray classification with Keras.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train the recipe and evaluate on the test split")
    train.add_argument("--data", required=True, help="reference layout folder, class folders or manifest CSV")
    train.add_argument("--out", help="run folder (default runs/<timestamp>)")
    train.add_argument("--config", help="JSON configuration file (a run's config.json reruns it)")
    train.add_argument("--weights", help="imagenet | none | PATH (default: $LUNGXRAY_WEIGHTS or imagenet)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--engine", choices=["auto", "cached", "keras"])
    train.add_argument("--fine-tune-epochs", type=int, help="end-to-end epochs with the top of the backbone unfrozen")
    train.add_argument("--holdout-source", help="leave this manifest 'source' out of training and test on it")
    train.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    train.add_argument("--cache", help="feature cache folder (default $LUNGXRAY_CACHE or ~/.cache/lungxray)")
    train.set_defaults(run=run_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a trained model on labelled data")
    evaluate.add_argument("--model", required=True, help="run folder or .keras file")
    evaluate.add_argument("--data", required=True, help="reference layout folder, class folders or manifest CSV")
    evaluate.add_argument("--split", choices=["train", "val", "test"], help="split to evaluate")
    evaluate.add_argument("--out", help="output folder (default: <model run>/evaluation-<data name>)")
    evaluate.add_argument("--by", action="append", default=[], metavar="COLUMN",
                          help="also report every metric per value of this manifest column (repeatable)")
    evaluate.add_argument("--cache", help="feature cache folder")
    evaluate.set_defaults(run=run_evaluate)

    predict = commands.add_parser("predict", help="class probabilities for images")
    predict.add_argument("--model", required=True, help="run folder or .keras file")
    predict.add_argument("images", nargs="+", help="image files or folders")
    predict.add_argument("--format", choices=["table", "csv", "json"], default="table")
    predict.add_argument("--cache", help="feature cache folder")
    predict.set_defaults(run=run_predict)

    compare = commands.add_parser("compare", help="compare evaluated runs on the same images (paired bootstrap)")
    compare.add_argument("runs", nargs="+", help="run folders (their evaluation/) or evaluation folders")
    compare.add_argument("--resamples", type=int, default=1000)
    compare.set_defaults(run=run_compare)

    data = commands.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    fetch = data.add_parser("fetch", help="download and unpack the reference Dataset.zip")
    fetch.add_argument("--url", help="archive URL (default: the reference Dropbox link)")
    fetch.add_argument("--dest", help="destination folder (default ~/.cache/lungxray/datasets)")
    fetch.add_argument("--print-path", action="store_true", help="print only the unpacked dataset's folder")
    fetch.set_defaults(run=run_fetch)
    return parser


def _cache(args):
    return Path(args.cache) if getattr(args, "cache", None) else None


def run_train(args) -> int:
    from lungxray.config import Config
    from lungxray.train import train

    config = Config.load(args.config) if args.config else Config()
    config = config.replace(weights=args.weights, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                            engine=args.engine, fine_tune_epochs=args.fine_tune_epochs, image_size=args.image_size,
                            holdout_source=args.holdout_source)
    config.validate()
    result = train(args.data, args.out, config, cache_dir=_cache(args))
    print(f"run folder: {result.run_dir}")
    if result.test_metrics:
        print(f"test accuracy {result.test_metrics['accuracy']:.4f}, macro F1 {result.test_metrics['macro_f1']:.4f}")
    if result.external_metrics:
        print(f"external ({config.holdout_source}) accuracy {result.external_metrics['accuracy']:.4f}")
    print(f"report: {result.run_dir / 'report.md'}")
    return 0


def run_evaluate(args) -> int:
    from lungxray.evaluate import evaluate
    from lungxray.predict import Predictor

    predictor = Predictor.load(args.model, cache_dir=_cache(args))
    model_dir = Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent
    out = Path(args.out) if args.out else model_dir / f"evaluation-{Path(args.data).stem}"
    metrics = evaluate(predictor, args.data, out, split=args.split, by=args.by)
    print((out / "classification_report.txt").read_text())
    overlap = metrics["overlap_with_training"]
    if overlap.get("known") and overlap["images"]:
        print(f"warning: {overlap['images']} evaluated images are identical to training images")
    print(f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}; report: {out / 'report.html'}")
    return 0


def run_predict(args) -> int:
    from lungxray.data.records import IMAGE_SUFFIXES
    from lungxray.predict import Predictor

    files: list[Path] = []
    for item in map(Path, args.images):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(item)
    predictor = Predictor.load(args.model, cache_dir=_cache(args))
    predictions = predictor.predict_files(files)
    errors = predictions.errors
    reasons = {e.path: e.reason for e in errors}
    rows = []
    for path, row in zip(files, predictions.probabilities):
        if str(path) in reasons:
            rows.append({"file": str(path), "error": reasons[str(path)]})
        else:
            rows.append({"file": str(path), "predicted": predictor.classes[int(row.argmax())],
                         "probabilities": {c: round(float(p), 6) for c, p in zip(predictor.classes, row)}})
    print(format_predictions(rows, predictor.classes, args.format))
    return 1 if errors and len(errors) == len(files) else 0


def format_predictions(rows: list[dict], classes: list[str], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    header = ["file", "predicted", *classes, "error"]
    table = [[r["file"], r.get("predicted", ""),
              *[f"{r['probabilities'][c]:.4f}" if "probabilities" in r else "" for c in classes], r.get("error", "")]
             for r in rows]
    if fmt == "csv":
        import csv
        import io

        buffer = io.StringIO()
        csv.writer(buffer).writerows([header, *table])
        return buffer.getvalue().rstrip("\n")
    widths = [max(len(str(x)) for x in column) for column in zip(header, *table)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *table])


def run_compare(args) -> int:
    from lungxray.evaluate.compare import compare_runs, format_comparison

    print(format_comparison(compare_runs([Path(r) for r in args.runs], resamples=args.resamples)))
    return 0


def run_fetch(args) -> int:
    from lungxray.data.fetch import DEFAULT_URL, describe, fetch_dataset

    layout = fetch_dataset(args.url or DEFAULT_URL, Path(args.dest) if args.dest else None)
    print(layout if args.print_path else describe(layout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
