"""A self-contained report.html (images embedded) that a person reads top to bottom."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from lungxray.io import write_text

def _image(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    ci = entry.get("ci95")
    return f"{entry['value']:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html_report(path: Path, metrics: dict, model_info: dict, title: str) -> None:
    """The report: data, headline metrics, curves, confusion matrices, calibration, subgroups and
    the model card, each section written from metrics.json's values and the plots beside `path`."""
    folder = Path(path).parent
    parts = [f"<h1>{html.escape(title)}</h1>",
             '<p class="warning">Research use only. This model is not a medical device and its output is not a '
             "diagnosis.</p>",
             *_data_section(metrics), *_headline_section(metrics), *_figure_sections(folder),
             *_calibration_section(metrics, folder), *_subgroup_section(metrics), *_model_card(metrics, model_info)]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:48%;margin:4px}"
             ".warning{background:#fff3cd;padding:8px;border:1px solid #e0c060}")
    document = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    write_text(path, document)


def _data_section(metrics: dict) -> list[str]:
    classes, data, overlap = metrics["classes"], metrics["data"], metrics["overlap_with_training"]
    parts = ["<h2>Data</h2>",
             f"<p>Source: <code>{html.escape(str(data['source']))}</code>, split: {data['split'] or 'all'}; "
             f"{data['images']} images, {data['scored']} scored, {len(data['unreadable'])} unreadable.</p>",
             _table(["class", "images"], [[html.escape(c), str(data["counts"][c])] for c in classes])]
    if overlap.get("known"):
        parts.append(f"<p>Overlap with the training images (identical files): <b>{overlap['images']}</b> "
                     f"({overlap['share']:.1%}). {html.escape(overlap['method'])}.</p>")
    else:
        parts.append(f"<p>Overlap with training data: unknown ({html.escape(overlap['note'])}).</p>")
    return parts


def _headline_section(metrics: dict) -> list[str]:
    classes, intervals, boot = metrics["classes"], metrics.get("intervals", {}), metrics.get("bootstrap", {})
    per_class = metrics["per_class"]
    return ["<h2>Headline metrics</h2>",
            f"<p>95% intervals: {boot.get('resamples', 0)} bootstrap resamples, {html.escape(boot.get('method', ''))}.</p>",
            _table(["metric", "value (95% CI)"], [
                ["accuracy", _interval(intervals.get("accuracy"))],
                ["balanced accuracy", _number(metrics["balanced_accuracy"])],
                ["macro F1", _interval(intervals.get("macro_f1"))],
                ["macro AUROC", _interval(intervals.get("macro_auroc"))]]),
            _table(["class", "sensitivity (95% CI)", "specificity", "PPV", "NPV", "F1", "AUROC (95% CI)",
                    "average precision", "support"],
                   [[html.escape(c), _interval(intervals.get(f"sensitivity/{c}")), _number(per_class[c]["specificity"]),
                     _number(per_class[c]["ppv"]), _number(per_class[c]["npv"]), _number(per_class[c]["f1"]),
                     _interval(intervals.get(f"auroc/{c}")), _number(per_class[c]["average_precision"]),
                     str(per_class[c]["support"])] for c in classes])]


def _figure_sections(folder: Path) -> list[str]:
    return ["<h2>Curves</h2>",
            _image(folder / "roc_curves.png", "ROC curves") + _image(folder / "pr_curves.png", "PR curves"),
            "<h2>Confusion matrices</h2><p>Rows: true class; columns: predicted class.</p>",
            _image(folder / "confusion_matrix.png", "confusion matrix")
            + _image(folder / "confusion_matrix_normalized.png", "row-normalised confusion matrix")]


def _calibration_section(metrics: dict, folder: Path) -> list[str]:
    calibration, before = metrics["calibration"], metrics["calibration_before_scaling"]
    return ["<h2>Calibration</h2>",
            f"<p>Temperature scaling fitted on the validation split: T = {calibration['temperature']:.3f}. "
            f"ECE uses {calibration['ece_bins']} {html.escape(calibration['ece_binning'])}.</p>",
            _table(["", "ECE", "Brier", "NLL"], [
                ["before scaling", _number(before["ece"]), _number(before["brier"]), _number(before["nll"])],
                ["after scaling", _number(calibration["ece"]), _number(calibration["brier"]),
                 _number(calibration["nll"])]]),
            _image(folder / "reliability.png", "reliability diagram")]


def _subgroup_section(metrics: dict) -> list[str]:
    classes, parts = metrics["classes"], ["<h2>Subgroups</h2>"]
    if not metrics["subgroups"]:
        parts.append("<p>No grouping column was given (use <code>--by COLUMN</code> with a manifest CSV).</p>")
    for column, groups in metrics["subgroups"].items():
        parts.append(f"<h3>By {html.escape(column)}</h3>")
        rows = []
        for value, group in groups.items():
            counts = ", ".join(f"{c}: {n}" for c, n in group["counts"].items() if n)
            flag = " ⚠ too small" if group["too_small"] else ""
            sens = "; ".join(f"{c} {_number(group['per_class'][c]['sensitivity'], 2)}"
                             for c in classes if group["counts"][c])
            flagged = f"{group['ood_flag_rate']:.1%}" if "ood_flag_rate" in group else "n/a"
            rows.append([html.escape(value) + flag, str(group["n"]), html.escape(counts),
                         _interval(group.get("intervals", {}).get("accuracy")), html.escape(sens),
                         _number(group["macro_auroc"]), flagged])
        parts.append(_table(["group", "n", "classes", "accuracy (95% CI)", "sensitivity", "macro AUROC",
                             "flagged out of distribution"], rows))
    return parts


def _model_card(metrics: dict, model_info: dict) -> list[str]:
    classes, counts = metrics["classes"], model_info.get("counts", {})
    training = "; ".join(f"{split}: " + ", ".join(f"{c} {n}" for c, n in row.items()) for split, row in counts.items())
    return ["<h2>Model card</h2>",
            "<ul>"
            "<li><b>Intended use</b>: research on chest X-ray classification methods and their failure modes. "
            "Not for diagnosis, triage or any clinical decision.</li>"
            f"<li><b>Model</b>: {html.escape(str(model_info.get('architecture', 'not recorded')))}; "
            f"classes {', '.join(map(html.escape, classes))}; trained by the {html.escape(str(model_info.get('engine', '?')))} "
            f"engine on {html.escape(str(model_info.get('trained', '?')))}.</li>"
            f"<li><b>Training data</b>: <code>{html.escape(str(model_info.get('data', 'unknown')))}</code> ({html.escape(training)})"
            f"{'; source held out: ' + html.escape(model_info['holdout_source']) if model_info.get('holdout_source') else ''}.</li>"
            "<li><b>Limitations</b>: public COVID-era collections confound the label with age (pediatric pneumonia, adult "
            "covid) and with the hospital; a high score on a random split can reflect those shortcuts rather than disease "
            "(DeGrave et al. 2021; Roberts et al. 2021). Check the subgroup table, a held-out source and Grad-CAM before "
            "believing a number. Probabilities are calibrated on the validation split only.</li></ul>"]
