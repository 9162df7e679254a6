"""The `lungxray` command line: it parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path

from lungxray.cli_dicom import add_dicom_commands
from lungxray.cli_serve import add_serve_commands
from lungxray.config import PRESETS, Config
from lungxray.conformal import check_coverage
from lungxray.data.importers import COLLECTIONS
from lungxray.data.importers.base import UNCERTAIN_POLICIES
from lungxray.errors import ConfigError, LungxrayError
from lungxray.loader import RUNTIMES
from lungxray.rundir import RunDir

# Modules the base install lacks, and the extra that brings each (pyproject.toml).
EXTRA_PROVIDING = {"tensorflow": "full", "keras": "full", "sklearn": "full", "matplotlib": "full", "scipy": "full",
                   "imagehash": "full", "pyarrow": "full", "onnxruntime": "onnx", "tf2onnx": "onnx", "ray": "ray",
                   "pynetdicom": "dicom", "highdicom": "dicom", "torch": "convert"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # pydicom logs its decoders' tracebacks; the file's one-line reason reaches the user as an ImageError.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # it logs every PDU at INFO
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every attribute an SR copies at INFO
    try:
        return args.run(args) or 0
    except LungxrayError as error:
        print(f"lungxray {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        extra = EXTRA_PROVIDING.get((error.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"lungxray {args.command}: error: this needs {error.name}, which the base install leaves out "
              f"(it runs exported models); pip install 'lungxray[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lungxray {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungxray", description="Chest X-ray classification with Keras.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train the recipe and evaluate on the test split")
    train.add_argument("--data", required=True, help="reference layout folder, class folders or manifest CSV")
    train.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--preset", choices=sorted(PRESETS), default="reference",
                       help="the recipe to start from; the settings below change it (default: reference)")
    start.add_argument("--config", help="JSON configuration file to start from (a run's config.json reruns it)")
    start.add_argument("--resume", action="store_true",
                       help="continue the interrupted run in --out, with the configuration saved there")
    train.add_argument("--cache", help="feature cache folder (default: $LUNGXRAY_CACHE or ~/.cache/lungxray)")
    train.add_argument("--extract-engine", choices=["local", "ray"], default="local",
                       help="compute the backbone features the cache lacks here or on Ray workers "
                            "(pip install 'lungxray[ray]'); the model is the same (default: local)")
    train.add_argument("--address", help="with --extract-engine ray: the Ray cluster (ray://HOST:PORT or auto; "
                                         "default: start one here)")
    train.add_argument("--workers", type=int, help="with --extract-engine ray: workers, one core each (default: all)")
    train.add_argument("--strategy", choices=["auto", "none", "mirrored", "multi-worker"], default="auto",
                       help="tf.distribute for Keras' fit: multi-worker runs this command on every worker named "
                            "in TF_CONFIG (auto: multi-worker when TF_CONFIG is set, mirrored on 2+ GPUs, else none)")
    add_config_arguments(train.add_argument_group("settings (each overrides the preset or --config)"))
    train.set_defaults(run=run_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a trained model on labelled data")
    evaluate.add_argument("--model", required=True, help="run folder or .keras file")
    evaluate.add_argument("--data", required=True, help="reference layout folder, class folders or manifest CSV")
    evaluate.add_argument("--split", choices=["train", "val", "test"], help="split to evaluate")
    evaluate.add_argument("--out", help="output folder (default: <model run>/evaluation-<data name>)")
    evaluate.add_argument("--by", action="append", default=[], metavar="COLUMN",
                          help="also report every metric per value of this manifest column (repeatable)")
    evaluate.add_argument("--occlude-lungs", action="store_true",
                          help="also measure accuracy with the central chest region blacked out")
    evaluate.add_argument("--cache", help="feature cache folder")
    evaluate.set_defaults(run=run_evaluate)

    predict = commands.add_parser("predict", help="class probabilities for images")
    predict.add_argument("--model", required=True, help="run folder, .keras file, or an export from `lungxray "
                                                        "export` (.tflite, .onnx: no TensorFlow needed; .savedmodel)")
    predict.add_argument("images", nargs="+", help="image files, folders, or manifests (.csv or .parquet with a "
                                                   "'file' or 'path' column)")
    predict.add_argument("--format", choices=["table", "csv", "json"], default="table",
                         help="(with --out: csv adds OUT/predictions.csv to the Parquet parts)")
    predict.add_argument("--out", metavar="DIR", help="score into Parquet parts here instead of printing: resumable, "
                                                      "files already there are skipped (an exported model runs)")
    predict.add_argument("--engine", choices=["local", "ray"], default="local",
                         help="with --out: this process, or Ray Data workers (pip install 'lungxray[ray]')")
    predict.add_argument("--address", help="Ray cluster to use (ray://HOST:PORT or auto; default: start one here)")
    predict.add_argument("--workers", type=int, help="Ray workers, one core each (default: every core of the cluster)")
    predict.add_argument("--batch-size", type=int, default=512, help="files per Parquet part (default: 512)")
    predict.add_argument("--explain", metavar="OUT_DIR", help="write a Grad-CAM overlay PNG per image here")
    predict.add_argument("--coverage", type=float, default=0.9,
                         help="the conformal set holds the true class this often, per class, on images like the "
                              "validation ones (default: 0.9)")
    predict.add_argument("--refuse-ood", action="store_true",
                         help="withhold the class of images the out-of-distribution gate flags")
    predict.add_argument("--runtime", choices=RUNTIMES, default="auto",
                         help="for a run folder: keras, or its LiteRT or ONNX export (made and checked on first "
                              "use); auto: the fastest of the run's checked exports, else Keras with the backbone "
                              "in LiteRT (Keras with --explain); an export runs in its own (default: auto)")
    predict.add_argument("--cache", help="feature cache folder")
    predict.set_defaults(run=run_predict)

    add_serve_commands(commands)

    export = commands.add_parser("export", help="the whole model as one LiteRT, ONNX or SavedModel export, "
                                                "checked against Keras")
    export.add_argument("--model", required=True, help="run folder or .keras file")
    export.add_argument("--format", choices=["litert", "onnx", "savedmodel"], default="litert",
                        help="(default: litert)")
    export.add_argument("--out", help="where to write it (default: RUN/export/model.tflite, .onnx or .savedmodel)")
    export.add_argument("--data", help="images to check the export on (default: the run's validation split)")
    export.add_argument("--sample", type=int, default=200, help="how many images to check it on (default: 200)")
    export.add_argument("--cache", help="feature cache folder")
    export.set_defaults(run=run_export)

    convert = commands.add_parser("convert-backbone", help="a TorchXRayVision DenseNet121 checkpoint as the weights "
                                                          "of --backbone DenseNet121-XRV")
    convert.add_argument("checkpoint", help="a PyTorch checkpoint: a state dict, or with --trust-pickle a whole model")
    convert.add_argument("--out", required=True, help="the Keras weights file to write (NAME.weights.h5)")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="unpickle a whole saved model (this runs code from the file: only for a trusted one)")
    convert.set_defaults(run=run_convert_backbone)

    compare = commands.add_parser("compare", help="compare evaluated runs on the same images (paired bootstrap)")
    compare.add_argument("runs", nargs="+", help="run folders (their evaluation/) or evaluation folders")
    compare.add_argument("--resamples", type=int, default=1000)
    compare.set_defaults(run=run_compare)

    add_dicom_commands(commands)

    data = commands.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    fetch = data.add_parser("fetch", help="download and unpack the reference Dataset.zip")
    fetch.add_argument("--url", help="archive URL (default: the reference Dropbox link)")
    fetch.add_argument("--dest", help="destination folder (default ~/.cache/lungxray/datasets)")
    fetch.add_argument("--print-path", action="store_true", help="print only the unpacked dataset's folder")
    fetch.set_defaults(run=run_fetch)
    audit = data.add_parser("audit", help="counts, unreadable files, duplicates, leakage and format shortcuts")
    audit.add_argument("data", help="any layout train accepts")
    audit.add_argument("--out", help="folder for audit.json and audit.md (default: audit/)", default="audit")
    audit.add_argument("--threshold", type=int, help="near-duplicate Hamming distance (default 10 of 256 bits)")
    audit.set_defaults(run=run_audit)
    split = data.add_parser("split", help="a leakage-free train/val/test manifest")
    split.add_argument("data", help="any layout train accepts")
    split.add_argument("--out", required=True, help="a .csv path, or a folder for split.csv")
    split.add_argument("--group-by", help="a manifest column (e.g. patient_id) whose groups never cross splits")
    split.add_argument("--dedupe", action="store_true", help="keep one image per near-duplicate cluster")
    split.add_argument("--ratios", default="0.7,0.2,0.1", help="train,val,test shares (default 0.7,0.2,0.1)")
    split.add_argument("--seed", type=int, default=21)
    split.set_defaults(run=run_split)
    imports = data.add_parser("import", help="a manifest from a public collection's own label files")
    imports.add_argument("kind", choices=COLLECTIONS, help="the collection (docs/data.md has each one's mapping)")
    imports.add_argument("root", help="the folder the collection unpacks to")
    imports.add_argument("--out", required=True, help="the manifest .csv to write")
    imports.add_argument("--uncertain", default="drop", choices=UNCERTAIN_POLICIES,
                         help="uncertain labels (CheXpert, MIMIC): leave the image out, or read them as "
                              "negative or positive (default drop)")
    imports.add_argument("--views", default="PA,AP", help="views kept, or 'all' (default PA,AP: no laterals)")
    imports.add_argument("--source", help="the manifest's source name (default: the collection's)")
    imports.set_defaults(run=run_import)
    merge = data.add_parser("merge", help="imported manifests as one, patient-disjoint splits, duplicates across "
                                          "collections kept in one split")
    merge.add_argument("manifests", nargs="+", help="manifests written by lungxray data import")
    merge.add_argument("--out", required=True, help="the merged manifest .csv")
    merge.add_argument("--ratios", default="0.7,0.2,0.1", help="train,val,test shares (default 0.7,0.2,0.1)")
    merge.add_argument("--seed", type=int, default=21)
    merge.set_defaults(run=run_merge)
    probe = data.add_parser("probe", help="can backbone features predict a nuisance column within a class?")
    probe.add_argument("data", help="a manifest CSV with the column")
    probe.add_argument("--by", required=True, help="the nuisance column, e.g. source or age_group")
    probe.add_argument("--weights", help="imagenet | none | PATH (default: $LUNGXRAY_WEIGHTS or imagenet)")
    probe.add_argument("--out", help="write probe.json here")
    probe.add_argument("--cache", help="feature cache folder")
    probe.set_defaults(run=run_probe)
    return parser


def add_config_arguments(group) -> None:
    """One flag per Config field, with its help, type, choices and default."""
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        flag, check = "--" + field.name.replace("_", "-"), field.metadata["check"]
        help_text = field.metadata["help"]
        if field.default is not dataclasses.MISSING and field.default is not None:
            help_text += f" (default: {_shown(field.default)})"
        kind, arguments = hints[field.name], typing.get_args(hints[field.name])
        if type(None) in arguments:  # Optional[X]: the flag takes an X
            kind = next(a for a in arguments if a is not type(None))
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is tuple:
            group.add_argument(flag, type=_numbers, metavar="A,B,C", help=help_text)
        else:
            group.add_argument(flag, type=kind, choices=check if isinstance(check, tuple) else None,
                               metavar=None if isinstance(check, tuple) else field.name.split("_")[-1].upper(),
                               help=help_text)


def _shown(value) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers such as 0.7,0.2,0.1") from None


def config_from_args(args) -> Config:
    """The preset or --config file, with every setting given on the command line applied (validated)."""
    config = Config.load(args.config) if args.config else Config.preset(args.preset)
    return config.replace(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})


def _cache(args):
    return Path(args.cache) if getattr(args, "cache", None) else None


def _cluster(args, engine: str):
    """The Ray cluster an `--engine ray` (or `--extract-engine ray`) command runs on; None for local."""
    if engine != "ray":
        return None
    from lungxray.cluster import RayCluster

    return RayCluster(args.address, args.workers)


def run_train(args) -> int:
    from lungxray.training import train

    if args.resume:
        changed = [f.name for f in dataclasses.fields(Config) if getattr(args, f.name) is not None]
        if not args.out or changed:
            raise ConfigError("--resume continues the run in --out with its own config.json: give --out, and no "
                              f"settings{' (got ' + ', '.join(changed) + ')' if changed else ''}")
        result = train(args.data, args.out, cache_dir=_cache(args), resume=True,
                       cluster=_cluster(args, args.extract_engine), strategy=args.strategy)
    else:
        result = train(args.data, args.out, config_from_args(args), cache_dir=_cache(args),
                       cluster=_cluster(args, args.extract_engine), strategy=args.strategy)
    from lungxray.distribute import is_chief

    if not is_chief():
        print("worker done; the chief wrote the run folder")
        return 0
    print(f"run folder: {result.run_dir}")
    if result.test_metrics:
        print(f"test accuracy {result.test_metrics['accuracy']:.4f}, macro F1 {result.test_metrics['macro_f1']:.4f}")
    if result.external_metrics:
        print(f"external test (the held-out source) accuracy {result.external_metrics['accuracy']:.4f}")
    print(f"report: {result.run_dir / RunDir.REPORT}")
    return 0


def run_evaluate(args) -> int:
    from lungxray.evaluate import CLASSIFICATION_REPORT, HTML_REPORT, conformal_lines, evaluate
    from lungxray.predict import Predictor

    run = RunDir.open(args.model)
    predictor = Predictor.load(run.model, cache_dir=_cache(args))
    out = Path(args.out) if args.out else run.path(f"{run.EVALUATION}-{Path(args.data).stem}")
    metrics = evaluate(predictor, args.data, out, split=args.split, by=args.by, occlude_lungs=args.occlude_lungs)
    print((out / CLASSIFICATION_REPORT).read_text())
    overlap = metrics["overlap_with_training"]
    if overlap.get("known") and overlap["images"]:
        print(f"warning: {overlap['images']} evaluated images are identical to training images")
    for line in conformal_lines(metrics):
        print(line)
    if "occlusion" in metrics:
        o = metrics["occlusion"]
        print(f"with the lungs blacked out: accuracy {o['accuracy_occluded']:.4f} "
              f"(majority class alone: {o['majority_class_accuracy']:.4f})")
    print(f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}; report: {out / HTML_REPORT}")
    return 0


def run_predict(args) -> int:
    if args.out:
        return run_scoring(args)
    if args.engine == "ray":
        raise ConfigError("--engine ray writes its results as Parquet: give --out DIR")
    from lungxray.batch import list_inputs
    from lungxray.loader import load_predictor
    from lungxray.predictions import OOD_NOTE, prediction_rows

    files = [Path(f) for f in list_inputs(args.images)]
    predictor = load_predictor(args.model, _cache(args), args.runtime, gradients=bool(args.explain))
    predictions = predictor.predict_files(files)
    rows = prediction_rows(predictions, files, predictor.classes, args.refuse_ood, predictor.conformal,
                           check_coverage(args.coverage))
    print(format_predictions(rows, predictor.classes, args.format))
    flagged = sum(bool(r.get("ood")) for r in rows)
    if flagged and args.format == "table":
        withheld = "; its class is withheld (--refuse-ood)" if args.refuse_ood else ""
        print(f"ood = yes ({flagged} of {len(rows)}): {OOD_NOTE}{withheld}", file=sys.stderr)
    if args.explain:
        from lungxray.explain import explain_files

        if not hasattr(predictor, "model"):
            raise ConfigError("--explain needs the Keras model (a run folder or .keras file), not an exported one")
        written = explain_files(predictor, files, predictions.probabilities, Path(args.explain))
        print(f"{len(written)} Grad-CAM overlays written to {args.explain}", file=sys.stderr)
    return 1 if predictions.errors and len(predictions.errors) == len(files) else 0


def run_scoring(args) -> int:
    from lungxray.batch import score
    from lungxray.lite import is_export
    from lungxray.loader import run_export

    if args.explain or args.runtime == "keras":
        raise ConfigError("scoring into --out runs an exported model: --explain and --runtime keras need a "
                          "terminal table; leave out --out")
    export = Path(args.model) if is_export(args.model) else run_export(
        args.model, "onnx" if args.runtime == "onnx" else "litert", _cache(args))
    result = score(export, args.images, Path(args.out), _cluster(args, args.engine), args.batch_size,
                   write_csv=args.format == "csv", refuse_ood=args.refuse_ood, coverage=check_coverage(args.coverage))
    print(f"scored {result.scored} files ({result.errors} unreadable: rows with their error), "
          f"{result.skipped} already scored; {result.csv or result.out}")
    return 0


def run_export(args) -> int:
    from lungxray.export import export_model

    result = export_model(args.model, args.out, args.data, args.sample, _cache(args), args.format)
    parity = result.parity
    print(f"exported: {result.path} (and its .json and .ood.npz); checked on {parity['images']} "
          f"images: largest probability difference {parity['max_abs_difference']:.2e} (tolerance "
          f"{parity['tolerance']:.0e}), same class for {parity['label_agreement']:.1%}")
    return 0


def format_predictions(rows: list[dict], classes: list[str], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    probabilities = [[f"{r['probabilities'][c]:.4f}" if r.get("probabilities") else "" for c in classes] for r in rows]
    if fmt == "csv":
        import csv
        import io

        header = ["file", "predicted", *classes, "set", "ood_score", "ood", "error"]
        table = [[r["file"], r.get("predicted") or "", *p, "|".join(r.get("set") or []), r.get("ood_score", ""),
                  "" if "ood" not in r else int(r["ood"]), r.get("error", "")] for r, p in zip(rows, probabilities)]
        buffer = io.StringIO()
        csv.writer(buffer).writerows([header, *table])
        return buffer.getvalue().rstrip("\n")
    coverage = next((r["coverage"] for r in rows if "coverage" in r), None)
    header = ["file", "predicted", *classes, f"{coverage:.0%} set" if coverage else "set", "ood", "error"]
    table = [[r["file"], r.get("predicted") or ("withheld" if r.get("withheld") else ""), *p, r.get("set_says") or "",
              "yes" if r.get("ood") else "", r.get("error", "")] for r, p in zip(rows, probabilities)]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *table)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *table])


def run_convert_backbone(args) -> int:
    from lungxray.convert.torchxrayvision import convert_checkpoint

    out = convert_checkpoint(args.checkpoint, args.out, args.trust_pickle)
    print(f"wrote {out}: train on it with --backbone DenseNet121-XRV --weights {out}")
    return 0


def run_compare(args) -> int:
    from lungxray.evaluate.compare import compare_runs, format_comparison

    print(format_comparison(compare_runs([Path(r) for r in args.runs], resamples=args.resamples)))
    return 0


def run_audit(args) -> int:
    from lungxray.data.audit import NEAR_DUPLICATE_DISTANCE, audit, format_summary, write_audit
    from lungxray.data.records import load_dataset

    report = audit(load_dataset(args.data), args.threshold or NEAR_DUPLICATE_DISTANCE)
    write_audit(report, Path(args.out))
    print(format_summary(report))
    print(f"written: {Path(args.out) / 'audit.json'}, {Path(args.out) / 'audit.md'}")
    return 0


def _ratios(text: str) -> tuple[float, float, float]:
    from lungxray.data.records import check_ratios

    try:
        return check_ratios(text.split(","))
    except ValueError:
        raise ConfigError(f"--ratios {text}: give three numbers summing to 1, such as 0.7,0.2,0.1") from None


def _print_counts(dataset, out: Path) -> None:
    for split, row in dataset.counts().items():
        print(f"{split:5s} " + "  ".join(f"{c}: {n}" for c, n in row.items()))
    print(f"written: {out} (use it as lungxray train --data {out})")


def run_split(args) -> int:
    from lungxray.data.records import load_dataset, write_manifest
    from lungxray.data.split import leakage_free_split

    dataset = leakage_free_split(load_dataset(args.data), _ratios(args.ratios), args.seed, args.group_by, args.dedupe)
    out = Path(args.out)
    out = out if out.suffix.lower() == ".csv" else out / "split.csv"
    write_manifest(dataset, out)
    _print_counts(dataset, out)
    return 0


def run_import(args) -> int:
    from lungxray.data.importers import import_collection

    views = None if args.views == "all" else tuple(v.strip().upper() for v in args.views.split(",") if v.strip())
    summary = import_collection(args.kind, args.root, args.out, args.uncertain, views, args.source)
    print("\n".join(summary.lines()))
    print(f"written: {summary.manifest} (merge it with lungxray data merge, or train on it as it is)")
    return 0


def run_merge(args) -> int:
    from lungxray.data.merge import merge_manifests, write_merge

    out = Path(args.out)
    if out.suffix.lower() != ".csv":
        raise ConfigError(f"--out {out}: give a .csv file name for the merged manifest")
    result = merge_manifests(args.manifests, _ratios(args.ratios), args.seed)
    table = write_merge(result, out)
    width = max(len(s) for s in result.table)
    print(f"{'source':{width}s} " + " ".join(f"{c:>10s}" for c in result.dataset.classes))
    for source, row in sorted(result.table.items()):
        print(f"{source:{width}s} " + " ".join(f"{n:10d}" for n in row.values()))
    print(f"{result.shared_films} film(s) appear in two or more collections: each kept within one split")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"class x source table: {table}")
    _print_counts(result.dataset, out)
    return 0


def run_probe(args) -> int:
    from lungxray.config import default_weights
    from lungxray.probe import format_probe, probe
    from lungxray.data.records import load_dataset
    from lungxray.features import FeatureExtractor
    from lungxray.io import write_json
    from lungxray.model import build_backbone

    backbone = build_backbone(args.weights or default_weights())
    result = probe(load_dataset(args.data), args.by, FeatureExtractor(backbone, 224, cache_dir=_cache(args)))
    print(format_probe(result))
    if args.out:
        write_json(Path(args.out) / "probe.json", result)
    return 0


def run_fetch(args) -> int:
    from lungxray.data.fetch import DEFAULT_URL, describe, fetch_dataset

    layout = fetch_dataset(args.url or DEFAULT_URL, Path(args.dest) if args.dest else None)
    print(layout if args.print_path else describe(layout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
