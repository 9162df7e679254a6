"""The run's report.md: what was trained, how, on what, and how well, linking every artefact.

Everything in it comes from the run itself (its Config, history and metrics), never from what the
reference recipe would have been."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lungxray.config import Config
from lungxray.data.records import Dataset
from lungxray.evaluate.evaluation import CLASSIFICATION_REPORT, HTML_REPORT, PREDICTIONS
from lungxray.evaluate.schema import METRICS_FILE, Metrics
from lungxray.io import write_text
from lungxray.rundir import RunDir



@dataclasses.dataclass
class TrainResult:
    """What `train()` returns and the report summarises."""

    run_dir: Path
    engine: str
    engine_reason: str  # why that engine (`engines.choose_engine`)
    history: dict[str, list[float]]
    best_epoch: int  # the (0-based) epoch whose weights were restored
    test_metrics: Metrics | None
    timings: dict[str, float]
    external_metrics: Metrics | None = None


def write_run_report(run: RunDir, result: TrainResult, dataset: Dataset, config: Config) -> None:
    lines = ["# lungxray run report", "", *_summary(run, result, dataset, config), "",
             *_counts_table(dataset), "", "## Training curves", "",
             f"![loss]({run.plot('loss').name}) ![accuracy]({run.plot('accuracy').name})", "",
             f"Per-epoch values: [{run.HISTORY}]({run.HISTORY}). Model: [{run.MODEL}]({run.MODEL}).", ""]
    evaluations = [(name, folder, m) for name, folder, m in (
        ("Internal test split", run.EVALUATION, result.test_metrics),
        (f"External test: source `{config.holdout_source}` (never seen in training)", run.EXTERNAL_EVALUATION,
         result.external_metrics)) if m]
    if evaluations:
        lines += _evaluation_table(evaluations, dataset.classes)
        for name, folder, metrics in evaluations:
            lines += _evaluation_section(name, folder, metrics)
    write_text(run.path(run.REPORT), "\n".join(lines))


def _summary(run: RunDir, result: TrainResult, dataset: Dataset, config: Config) -> list[str]:
    history, monitor, best = result.history, config.monitor, result.best_epoch
    return [
        f"- Data: `{dataset.origin}` ({dataset.layout} layout), classes: {', '.join(dataset.classes)}",
        f"- Model: {config.describe_model()}",
        f"- Engine: **{result.engine}** ({result.engine_reason})",
        f"- Configuration: [{run.CONFIG}]({run.CONFIG}); data and splits: [{run.DATA}]({run.DATA})",
        f"- Epochs run: {len(history['loss'])}; best {monitor} {history[monitor][best]:.4f} "
        f"at epoch {best + 1} (weights restored from it)",
        f"- Wall time: {result.timings['total']:.1f} s ([{run.TIMINGS}]({run.TIMINGS}))",
    ]


def _counts_table(dataset: Dataset) -> list[str]:
    lines = ["| split | " + " | ".join(dataset.classes) + " |", "|---|" + "---|" * len(dataset.classes)]
    for split, row in dataset.counts().items():
        lines.append(f"| {split} | " + " | ".join(str(row[c]) for c in dataset.classes) + " |")
    return lines


def _cell(metrics: Metrics, key: str) -> str:
    entry = metrics.get("intervals", {}).get(key)
    if not entry or entry["value"] is None:
        return "n/a"
    low, high = entry["ci95"] or (float("nan"), float("nan"))
    return f"{entry['value']:.3f} ({low:.3f}–{high:.3f})"


def _evaluation_table(evaluations: list[tuple[str, str, Metrics]], classes: list[str]) -> list[str]:
    rows = [("images", lambda m: str(m["n"])), ("accuracy (95% CI)", lambda m: _cell(m, "accuracy")),
            ("macro F1", lambda m: _cell(m, "macro_f1")), ("macro AUROC", lambda m: _cell(m, "macro_auroc"))]
    rows += [(f"sensitivity {c}", lambda m, c=c: _cell(m, f"sensitivity/{c}")) for c in classes]
    rows += [("ECE after temperature scaling", lambda m: f"{m['calibration']['ece']:.3f}")]
    lines = ["## Test evaluation", "", "| | " + " | ".join(name for name, _, _ in evaluations) + " |",
             "|---|" + "---|" * len(evaluations)]
    lines += [f"| {label} | " + " | ".join(value(m) for _, _, m in evaluations) + " |" for label, value in rows]
    return lines


def _evaluation_section(name: str, folder: str, metrics: Metrics) -> list[str]:
    lines = ["", f"### {name}", "",
             f"[report.html]({folder}/{HTML_REPORT}) (curves, calibration, subgroups, model card), "
             f"[metrics.json]({folder}/{METRICS_FILE}), [classification report]({folder}/{CLASSIFICATION_REPORT}), "
             f"[predictions]({folder}/{PREDICTIONS}).", "",
             "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
              for c, v in metrics["per_class"].items()]
    lines += ["", f"![confusion matrix]({folder}/confusion_matrix.png) "
              f"![normalised confusion matrix]({folder}/confusion_matrix_normalized.png)"]
    return lines
