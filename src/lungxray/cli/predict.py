"""`lungxray predict`: answers for films, printed (table, CSV, JSON) or scored into Parquet."""

from __future__ import annotations

import sys
from pathlib import Path

from lungxray.cli.common import cache_dir, cluster
from lungxray.errors import ConfigError
from lungxray.infer.loader import RUNTIMES

FORMATS = ("table", "csv", "json")


def add_predict_command(commands) -> None:
    predict = commands.add_parser("predict", help="class probabilities for images")
    predict.add_argument("--model", required=True, help="run folder, .keras file, or an export from `lungxray "
                                                        "export` (.tflite, .onnx: no TensorFlow needed; .savedmodel)")
    predict.add_argument("images", nargs="+", help="image files, folders, or manifests (.csv or .parquet with a "
                                                   "'file' or 'path' column)")
    predict.add_argument("--format", choices=FORMATS, default="table",
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
                         help="for a run folder: keras, or its LiteRT or ONNX export (made and checked by "
                              "`lungxray export`); auto: the fastest of the run's checked exports, else Keras with the backbone "
                              "in LiteRT; an export runs in its own (default: auto)")
    predict.add_argument("--cache", help="feature cache folder")
    predict.set_defaults(run=run_predict)


def run_predict(args) -> int:
    from lungxray.infer.answer import NOT_ANALYSED, OOD_NOTE, WITHHELD, answer_files
    from lungxray.infer.batch import list_inputs
    from lungxray.infer.loader import load_predictor
    from lungxray.infer.outputs import as_csv, as_json, as_table
    from lungxray.model.conformal import check_coverage

    if args.out:
        return run_scoring(args)
    if args.engine == "ray":
        raise ConfigError("--engine ray writes its results as Parquet: give --out DIR")
    files = list_inputs(args.images)
    predictor = load_predictor(args.model, cache_dir(args), args.runtime)
    if args.explain and not predictor.can_explain:
        raise ConfigError("--explain needs the Keras model (a run folder or .keras file), not an exported one")
    answers = answer_files(predictor, files, refuse_ood=args.refuse_ood, coverage=check_coverage(args.coverage))
    print(as_json(answers) if args.format == "json" else
          as_csv(answers, predictor.classes) if args.format == "csv" else as_table(answers, predictor.classes))
    flagged = sum(bool(a.ood) for a in answers)
    if flagged and args.format == "table":
        withheld = f"; its class is {WITHHELD} (--refuse-ood)" if args.refuse_ood else ""
        print(f"ood = yes ({flagged} of {len(answers)}): {OOD_NOTE}{withheld}", file=sys.stderr)
    if args.explain:
        from lungxray.infer.explain import explain_files

        written = explain_files(predictor, answers, Path(args.explain))
        print(f"{len(written)} Grad-CAM overlays written to {args.explain}", file=sys.stderr)
    return 1 if answers and all(a.decision == NOT_ANALYSED for a in answers) else 0


def run_scoring(args) -> int:
    from lungxray.infer.batch import score
    from lungxray.model.conformal import check_coverage

    if args.explain or args.runtime == "keras":
        raise ConfigError("scoring into --out runs an exported model: --explain and --runtime keras need a "
                          "terminal table; leave out --out")
    result = score(args.model, args.images, Path(args.out), cluster(args, args.engine), args.batch_size,
                   write_csv=args.format == "csv", refuse_ood=args.refuse_ood, coverage=check_coverage(args.coverage),
                   runtime=args.runtime)
    print(f"scored {result.scored} files ({result.errors} unreadable: rows with their error), "
          f"{result.skipped} already scored; {result.csv or result.out}")
    return 0
