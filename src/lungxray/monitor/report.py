"""The monitoring report a person reads: time series of the drift score against its threshold, the
estimated (and, with reads, realised) accuracy against the reference's, and the rates of flags and
films not analysed, then a table per window with its alarms and the features that moved most."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lungxray.io import atomic_path  # noqa: E402

TOP_FEATURES = 4  # per window, the features with the highest standardised scores


def figure_png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def plots(result: dict) -> list[str]:
    """Three panels over the windows, as base64 PNGs."""
    windows, reference = result["windows"], result["reference"]["estimated"]
    x = range(1, len(windows) + 1)
    figure, axis = plt.subplots(figsize=(8, 2.6))
    axis.plot(x, [w["drift"]["combined"] for w in windows], marker="o", label="combined drift score")
    axis.plot(x, [w["drift"]["threshold"] for w in windows], linestyle="--", color="red", label="alarm threshold")
    axis.set(xlabel="window", ylabel="score", title="Drift against the reference")
    axis.legend(loc="upper left")
    drift = figure_png(figure)
    figure, axis = plt.subplots(figsize=(8, 2.6))
    axis.plot(x, [w["estimated"]["accuracy"] if w["estimated"] else None for w in windows], marker="o",
              label="estimated accuracy (no labels)")
    realised = [w["realised"] for w in windows]
    if any(realised):
        axis.errorbar(x, [r["accuracy"] if r else float("nan") for r in realised], marker="s", linestyle=":",
                      yerr=[[r["accuracy"] - r["accuracy_ci95"][0] if r else 0 for r in realised],
                            [r["accuracy_ci95"][1] - r["accuracy"] if r else 0 for r in realised]],
                      label="realised accuracy (reads, 95% CI)")
    axis.axhline(reference["accuracy"], color="grey", linestyle="--", label="reference (estimated)")
    axis.axhline(reference["accuracy"] - result["accuracy_drop"], color="red", linestyle="--", label="alarm below")
    axis.set(xlabel="window", ylabel="accuracy", title="Performance")
    axis.legend(loc="lower left", fontsize="small")
    performance = figure_png(figure)
    figure, axis = plt.subplots(figsize=(8, 2.6))
    for key, label in (("ood_rate", "out-of-distribution rate"), ("not_analysed_rate", "not analysed"),
                       ("withheld_rate", "withheld")):
        axis.plot(x, [w[key] for w in windows], marker=".", label=label)
    axis.set(xlabel="window", ylabel="share of films", title="Flags")
    axis.legend(loc="upper left", fontsize="small")
    return [drift, performance, figure_png(figure)]


def window_rows(result: dict) -> str:
    rows = []
    for index, window in enumerate(result["windows"], 1):
        moved = sorted(window["drift"]["features"].items(), key=lambda item: -item[1]["score"])[:TOP_FEATURES]
        estimated = window["estimated"]["accuracy"] if window["estimated"] else ""
        realised = window["realised"]["accuracy"] if window["realised"] else ""
        cells = [index, window["n"], window["start"], window["drift"]["combined"], estimated, realised,
                 window["ood_rate"], ", ".join(window["alarms"]) or "none",
                 "; ".join(f"{name} {v['score']:+.1f}" for name, v in moved)]
        style = ' class="alarm"' if window["alarms"] else ""
        rows.append(f"<tr{style}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "\n".join(rows)


def write_report(result: dict, path: Path) -> None:
    alarmed = sum(bool(w["alarms"]) for w in result["windows"])
    images = "".join(f'<img alt="monitoring plot" src="data:image/png;base64,{png}">' for png in plots(result)) \
        if result["windows"] else "<p>No window held enough records to score.</p>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>lungxray monitoring</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:.2em .6em;text-align:left}}
tr.alarm{{background:#fdd}}img{{display:block;margin:1em 0}}</style></head><body>
<h1>Monitoring: {html.escape(result["model"])}</h1>
<p>{len(result["windows"])} windows of {html.escape(result["window"])}; {alarmed} alarmed. Reference: the run's
validation split ({result["reference"]["n"]} films, estimated accuracy {result["reference"]["estimated"]["accuracy"]}).
A drift alarm says the films or the answers differ from what the model was fitted on; it does not say the
answers are wrong. Research use only.</p>
{images}
<table><tr><th>window</th><th>films</th><th>from</th><th>drift</th><th>est. accuracy</th><th>realised</th>
<th>OOD rate</th><th>alarms</th><th>features that moved most (score)</th></tr>
{window_rows(result)}
</table></body></html>"""
    with atomic_path(path) as temporary:
        temporary.write_text(page, encoding="utf-8")
