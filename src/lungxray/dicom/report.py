"""The Structured Report lungxray returns for a film: a Comprehensive SR in the film's study, in a
series of its own, referencing the film, with the calibrated probability of each class, the decision
(the class, "withheld" when the out-of-distribution gate flags the film, or "not analysed" and why),
the gate's score and flag, the model's name, version and fingerprint, and the research-use notice.

Concepts without a standard code carry the private coding scheme 99LUNGXRAY (DICOM PS3.16 8.2 allows
local schemes whose designator starts with 99)."""

from __future__ import annotations

import dataclasses

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

SCHEME = "99LUNGXRAY"
NOTICE = "Research use only: not a medical device, not a diagnosis. Not for clinical decisions."
SERIES_NUMBER = 9901
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")


def concept(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)


@dataclasses.dataclass
class Outcome:
    """What the model said of one film: probabilities per class and the gate's verdict, or why it
    was not analysed."""

    probabilities: dict[str, float] | None = None
    ood_score: float | None = None
    ood: bool | None = None
    not_analysed: str | None = None

    @property
    def decision(self) -> str:
        if self.not_analysed is not None:
            return "not analysed"
        if self.ood:
            return "withheld"
        return max(self.probabilities, key=self.probabilities.get)


@dataclasses.dataclass
class ModelIdentity:
    name: str
    version: str
    fingerprint: str  # SHA-256 of the model file


# The patient and study attributes an SR copies from its evidence (DICOM type 2: present, maybe empty).
COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def derived_uid(source: Dataset, model: ModelIdentity, what: str) -> str:
    """The UID of something lungxray derives from the film `source` with `model`: the same each time
    it is made again (after a crash), so that a PACS given it twice keeps it once."""
    return generate_uid(entropy_srcs=[str(source.SOPInstanceUID), model.fingerprint, what])


def result_report(source: Dataset, outcome: Outcome, model: ModelIdentity) -> hd.sr.ComprehensiveSR:
    """The SR for `source` (the received film's dataset, pixels not needed)."""
    evidence = Dataset()
    evidence.update({keyword: source.get(keyword, "") for keyword in COPIED})
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        setattr(evidence, keyword, source[keyword].value)
    def text(code: str, meaning: str, value: str) -> hd.sr.TextContentItem:
        return hd.sr.TextContentItem(name=concept(code, meaning), value=value, relationship_type="CONTAINS")

    def number(code: str, meaning: str, value: float) -> hd.sr.NumContentItem:
        return hd.sr.NumContentItem(name=concept(code, meaning), value=float(value), unit=NO_UNITS,
                                    relationship_type="CONTAINS")

    items = [text("decision", "lungxray decision", outcome.decision)]
    if outcome.not_analysed is not None:
        items.append(text("reason", "Reason not analysed", outcome.not_analysed))
    else:
        items += [number(f"p-{name}", f"Calibrated probability of {name}", round(p, 6))
                  for name, p in outcome.probabilities.items()]
        if outcome.ood is not None:
            items += [number("ood-score", "Out-of-distribution score", round(outcome.ood_score, 6)),
                      text("ood-flag", "Out-of-distribution flag", "flagged" if outcome.ood else "not flagged")]
    items += [text("model-name", "Model name", model.name), text("model-version", "Model version", model.version),
              text("model-sha256", "Model fingerprint (SHA-256)", model.fingerprint),
              text("notice", "Intended use", NOTICE),
              hd.sr.ImageContentItem(name=concept("source", "Source image"),
                                     referenced_sop_class_uid=source.SOPClassUID,
                                     referenced_sop_instance_uid=source.SOPInstanceUID, relationship_type="CONTAINS")]
    root = hd.sr.ContainerContentItem(name=concept("report", "lungxray chest X-ray classification"))
    root.ContentSequence = hd.sr.ContentSequence(items)
    return hd.sr.ComprehensiveSR(
        evidence=[evidence], content=root, series_instance_uid=derived_uid(source, model, "report series"),
        series_number=SERIES_NUMBER, sop_instance_uid=derived_uid(source, model, "report"), instance_number=1,
        manufacturer="lungxray", is_complete=True, is_final=False, is_verified=False,
        series_description="lungxray (research use only)")


def report_values(report: Dataset) -> dict[str, str | float]:
    """The report's items by concept code (numbers as floats): for tests, evaluation and audits."""
    values: dict[str, str | float] = {}
    for item in report.ContentSequence:
        code = item.ConceptNameCodeSequence[0].CodeValue
        if item.ValueType == "NUM":
            values[code] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "TEXT":
            values[code] = str(item.TextValue)
        elif item.ValueType == "IMAGE":
            values[code] = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return values
