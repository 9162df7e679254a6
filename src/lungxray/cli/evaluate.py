"""`lungxray evaluate` and `lungxray compare`: a model measured on labelled data, runs compared."""

from __future__ import annotations

from pathlib import Path

from lungxray.cli.common import cache_dir


def add_evaluate_commands(commands) -> None:
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

    compare = commands.add_parser("compare", help="compare evaluated runs on the same images (paired bootstrap)")
    compare.add_argument("runs", nargs="+", help="run folders (their evaluation/) or evaluation folders")
    compare.add_argument("--resamples", type=int, default=1000)
    compare.set_defaults(run=run_compare)


def run_evaluate(args) -> int:
    from lungxray.evaluate.evaluation import CLASSIFICATION_REPORT, HTML_REPORT, conformal_lines, evaluate
    from lungxray.infer.loader import load_predictor
    from lungxray.rundir import RunDir

    run = RunDir.open(args.model)
    predictor = load_predictor(run.model, cache_dir(args), keras=True)  # the run's own model is what is measured
    out = Path(args.out) if args.out else run.evaluation_of(args.data)
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


def run_compare(args) -> int:
    from lungxray.evaluate.compare import compare_runs, format_comparison

    print(format_comparison(compare_runs([Path(r) for r in args.runs], resamples=args.resamples)))
    return 0
