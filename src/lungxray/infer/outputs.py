"""Answers written out: one JSON shape (the command line's `--format json` and the API), one set
of flat columns (`--format csv`, `predict --out`'s Parquet, monitoring), the terminal's table and
the audit line. Each is a view of `Answer`; none decides anything.

    file, sha256, decision, predicted, p_<class>..., set, ood_score, ood, error, model, time
"""

from __future__ import annotations

import csv
import io
import json

from lungxray.infer.answer import NOT_ANALYSED, WITHHELD, Answer


def columns(classes: list[str]) -> list[str]:
    """The flat columns, in order."""
    return ["file", "sha256", "decision", "predicted", *(f"p_{c}" for c in classes), "set", "ood_score", "ood",
            "error", "model", "time"]


def flat_row(answer: Answer, classes: list[str]) -> dict:
    """The answer as one row of `columns(classes)`: the set's classes joined by "|", None where empty."""
    probabilities, shown_set = answer.shown_probabilities or {}, answer.shown_set
    return {"file": answer.file, "sha256": answer.sha256, "decision": answer.decision, "predicted": answer.predicted,
            **{f"p_{c}": probabilities.get(c) for c in classes},
            "set": "|".join(shown_set) if shown_set is not None else None, "ood_score": answer.ood_score,
            "ood": answer.ood, "error": answer.reason if answer.decision == NOT_ANALYSED else None,
            "model": answer.model, "time": answer.time}


def answer_json(answer: Answer) -> dict:
    """The answer as the API and `predict --format json` give it: a film not analysed has its
    `error`; an analysed one its class (`predicted`, null when `withheld` says why), probabilities,
    conformal set and the gate's verdict (`ood`: flag, score, threshold)."""
    shown = {"file": answer.file, "sha256": answer.sha256, "decision": answer.decision}
    if answer.decision == NOT_ANALYSED:
        return {**shown, "error": answer.reason, "model": answer.model, "time": answer.time}
    shown.update(predicted=answer.predicted, probabilities=answer.shown_probabilities)
    if answer.shown_set is not None:
        shown.update(set=list(answer.shown_set), set_says=answer.set_says, coverage=answer.coverage)
    elif answer.set is not None:  # withheld: the set's fields are there, and empty
        shown.update(set=None, set_says=None, coverage=answer.coverage)
    if answer.ood is not None:
        shown["ood"] = {"flag": answer.ood, "score": answer.ood_score, "threshold": answer.ood_threshold}
    if answer.decision == WITHHELD:
        shown["withheld"] = answer.reason
    return {**shown, "model": answer.model, "time": answer.time}


def audit_fields(answer: Answer) -> dict:
    """What an audit line keeps of an answer: no file name, only the image's hash."""
    fields = {"sha256": answer.sha256, "decision": answer.decision}
    if answer.ood is not None:
        fields["ood"] = answer.ood
    if answer.set is not None:
        fields["set"] = list(answer.shown_set) if answer.shown_set is not None else None
    return fields


def as_json(answers: list[Answer]) -> str:
    return json.dumps([answer_json(a) for a in answers], indent=2)


def as_csv(answers: list[Answer], classes: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns(classes), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else int(v) if isinstance(v, bool) else v
                      for k, v in flat_row(a, classes).items()} for a in answers)
    return buffer.getvalue().rstrip("\n")


def as_table(answers: list[Answer], classes: list[str]) -> str:
    """Aligned columns for a terminal: the class (or "withheld"), probabilities to 4 places, what
    the set says, the gate's flag, the error."""
    coverage = next((a.coverage for a in answers if a.coverage is not None), None)
    header = ["file", "predicted", *classes, f"{coverage:.0%} set" if coverage else "set", "ood", "error"]
    table = [[a.file, a.predicted or (WITHHELD if a.decision == WITHHELD else ""),
              *(f"{a.shown_probabilities[c]:.4f}" if a.shown_probabilities else "" for c in classes), a.set_says or "",
              "yes" if a.ood else "", a.reason if a.decision == NOT_ANALYSED else ""] for a in answers]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *table)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *table])


def arrow_table(answers: list[Answer], classes: list[str]):
    """The flat rows as a pyarrow Table (probabilities and scores float64, `ood` boolean)."""
    import pyarrow as pa

    types = {"ood_score": pa.float64(), "ood": pa.bool_(), **{f"p_{c}": pa.float64() for c in classes}}
    rows = [flat_row(a, classes) for a in answers]
    return pa.table({name: pa.array([row[name] for row in rows], types.get(name, pa.string()))
                     for name in columns(classes)})
