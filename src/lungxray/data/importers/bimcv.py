"""BIMCV-COVID19+ and BIMCV-COVID19- (de la Iglesia Vaya et al. 2020, arXiv:2006.01174; the Valencian
Region's image bank, 11 hospitals): the iteration's archives unpack to `covid19_posi/` (`covid19_neg/`
for the negative set) in the Medical Imaging Data Structure, a BIDS layout:

    participants.tsv
    derivatives/labels/labels_covid_posi.tsv        (negative set: Labels_covid_NEG_JAN21.tsv)
    sub-S03044/ses-E06386/mod-rx/sub-S03044_ses-E06386_run-1_bp-chest_vp-ap_cr.png

Files used, tab-separated as published: the labels file's PatientID, ReportID (the session) and
Labels (a Python list literal of PadChest's report-derived labels, e.g. `['COVID 19', 'pneumonia']`;
some are cut short and do not parse); participants.tsv's participant, age (a list literal, e.g.
`[71]`: the first is taken) and gender. The view is the file name's `vp-` entity (pa, ap, ll), the
modality its last one (cr, dx); the films are 16-bit PNGs. Every `mod-rx` PNG is an image; its
session's labels are its labels.

Mapping, per session. Every patient of BIMCV-COVID19+ had a positive PCR or antibody test at some
time, and every patient of BIMCV-COVID19- had none:
- 'exclude' or 'suboptimal study' anywhere -> dropped.
- 'COVID 19' -> covid in the positive set, dropped in the negative set. 'COVID 19 uncertain' follows
  `--uncertain`: positive reads it as 'COVID 19', negative as absent, drop drops the session.
- 'pneumonia' (without COVID 19) -> pneumonia in the negative set; dropped in the positive set,
  where the report names a pneumonia of a patient known to have COVID-19 without calling it that.
- exactly ['normal'] -> normal (in the positive set: a normal film of a patient who had COVID-19).
- anything else -> dropped (other findings).
The sessions are not relabelled from the test results (derivatives/EHR), as some users do: the label
is what the radiologist's report said of the film.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator

from lungxray.data.importers.base import Entry, files_under, find_file, read_rows

SOURCE = "bimcv_covid19"
LABEL_FILES = {"derivatives/labels/labels_covid_posi.tsv": "positive",
               "derivatives/labels/Labels_covid_NEG_JAN21.tsv": "negative"}
RADIOGRAPH = re.compile(r"^(sub-[^/]+)/(ses-[^/]+)/mod-rx/[^/]+\.png$", re.IGNORECASE)
VIEWS = {"pa": "PA", "ap": "AP", "ll": "LL"}


def session_labels(text: str) -> set[str] | None:
    try:
        return {str(label).strip() for label in ast.literal_eval(text or "[]")}
    except (ValueError, SyntaxError):
        return None


def labels_class(labels: set[str] | None, cohort: str, uncertain: str) -> tuple[str | None, str | None]:
    if labels is None:
        return None, "labels unreadable (cut short in the label file)"
    if labels & {"exclude", "suboptimal study"}:
        return None, "excluded or suboptimal study"
    if "COVID 19 uncertain" in labels:
        if uncertain == "drop":
            return None, "COVID 19 uncertain (--uncertain drop)"
        labels = (labels - {"COVID 19 uncertain"}) | ({"COVID 19"} if uncertain == "positive" else set())
    if "COVID 19" in labels:
        return ("covid", None) if cohort == "positive" else (None, "COVID 19 in the PCR-negative set")
    if "pneumonia" in labels:
        return ("pneumonia", None) if cohort == "negative" else (
            None, "pneumonia not called COVID 19 in a COVID-19-positive patient")
    if labels == {"normal"}:
        return "normal", None
    return None, "other findings"


def entities(file: str) -> dict[str, str]:
    """A BIDS file name's key-value entities (`vp-ap` -> {'vp': 'ap'}), and its suffix under 'suffix'."""
    parts = Path(file).stem.split("_")
    found = dict(part.split("-", 1) for part in parts if "-" in part)
    return {**found, "suffix": parts[-1] if "-" not in parts[-1] else ""}


def first_age(text: str) -> str:
    try:
        ages = ast.literal_eval(text or "[]")
    except (ValueError, SyntaxError):
        return ""
    ages = ages if isinstance(ages, (list, tuple)) else [ages]
    return str(int(ages[0])) if ages and isinstance(ages[0], (int, float)) else ""


def bare(identifier: str, prefix: str) -> str:
    return identifier.strip().removeprefix(prefix)


def entries(root: Path, uncertain: str) -> Iterator[Entry]:
    labels_path = find_file(root, *LABEL_FILES)
    cohort = LABEL_FILES[labels_path.relative_to(root).as_posix().removesuffix(".gz")]
    labels = {bare(row["ReportID"], "ses-"): row["Labels"]
              for row in read_rows(labels_path, ("PatientID", "ReportID", "Labels"), delimiter="\t")}
    participants = {bare(row["participant"], "sub-"): row
                    for row in read_rows(find_file(root, "participants.tsv"), ("participant",), delimiter="\t")}
    for file in sorted(files_under(root)):
        match = RADIOGRAPH.match(file)
        if match is None:
            continue
        subject, session = match.groups()
        native = labels.get(bare(session, "ses-"))
        label, dropped = (labels_class(session_labels(native), cohort, uncertain) if native is not None
                          else (None, "session without labels in the label file"))
        person = participants.get(bare(subject, "sub-"), {})
        named = entities(file)
        yield Entry(file=file, label=label, dropped=dropped, patient_id=subject, study_id=session,
                    age=first_age(person.get("age", "")), sex=person.get("gender", ""),
                    view=VIEWS.get(named.get("vp", "").lower(), named.get("vp", "").upper()),
                    site="BIMCV (Valencian Region)",
                    native={"labels": native or "", "cohort": cohort, "modality": named["suffix"].upper()})
