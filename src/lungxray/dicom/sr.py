"""The Structured Report lungxray returns for a film, written from its `Answer`: a Comprehensive SR
in the film's study, in a series of its own, referencing the film, with the decision (the class,
"withheld" and why, or "not analysed" and why), the calibrated probability of each class when a
class is given, the gate's score and flag, the model's name, version and fingerprint, and its
research-use notice (all from the model's `ModelIdentity`).

Concepts without a standard code carry the private coding scheme 99LUNGXRAY (DICOM PS3.16 8.2 allows
local schemes whose designator starts with 99)."""

from __future__ import annotations

import datetime
import io

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA, DS, DT, TM

from lungxray.infer.answer import NOT_ANALYSED, WITHHELD, Answer
from lungxray.infer.identity import ModelIdentity

SCHEME = "99LUNGXRAY"
SERIES_NUMBER = 9901
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")


def concept(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)


# The patient and study attributes an SR copies from its evidence (DICOM type 2: present, maybe empty).
COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def derived_uid(source: Dataset, model: ModelIdentity, what: str) -> str:
    """The UID of something lungxray derives from the film `source` with `model`: the same each time
    it is made again (after a crash), so that a PACS given it twice keeps it once."""
    return generate_uid(entropy_srcs=[str(source.SOPInstanceUID), model.fingerprint, what])


def report_items(answer: Answer, model: ModelIdentity) -> list[tuple[str, str, str | float]]:
    """(code, meaning, value) of each item the report's root holds before the source image's
    reference, in order: a str is a text item, a float a number."""
    items: list[tuple[str, str, str | float]] = [("decision", "lungxray decision", answer.decision)]
    if answer.decision == NOT_ANALYSED:
        items.append(("reason", "Reason not analysed", answer.reason))
    if answer.decision == WITHHELD:
        items.append(("withheld", "Reason withheld", answer.reason))
    items += [(f"p-{name}", f"Calibrated probability of {name}", round(float(p), 6))
              for name, p in (answer.shown_probabilities or {}).items()]
    if answer.ood is not None:
        items += [("ood-score", "Out-of-distribution score", round(float(answer.ood_score), 6)),
                  ("ood-flag", "Out-of-distribution flag", "flagged" if answer.ood else "not flagged")]
    return items + [("model-name", "Model name", model.name), ("model-version", "Model version", model.version),
                    ("model-sha256", "Model fingerprint (SHA-256)", model.fingerprint),
                    ("notice", "Intended use", model.notice)]


def result_report(source: Dataset, answer: Answer, model: ModelIdentity) -> hd.sr.ComprehensiveSR:
    """The SR for `source` (the received film's dataset, pixels not needed), built by highdicom."""
    evidence = Dataset()
    evidence.update({keyword: source.get(keyword, "") for keyword in COPIED})
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        setattr(evidence, keyword, source[keyword].value)

    def item(code: str, meaning: str, value: str | float) -> hd.sr.ContentItem:
        if isinstance(value, str):
            return hd.sr.TextContentItem(name=concept(code, meaning), value=value, relationship_type="CONTAINS")
        return hd.sr.NumContentItem(name=concept(code, meaning), value=value, unit=NO_UNITS,
                                    relationship_type="CONTAINS")

    items = [item(*fields) for fields in report_items(answer, model)]
    items.append(hd.sr.ImageContentItem(name=concept("source", "Source image"),
                                        referenced_sop_class_uid=source.SOPClassUID,
                                        referenced_sop_instance_uid=source.SOPInstanceUID, relationship_type="CONTAINS"))
    root = hd.sr.ContainerContentItem(name=concept("report", "lungxray chest X-ray classification"))
    root.ContentSequence = hd.sr.ContentSequence(items)
    return hd.sr.ComprehensiveSR(
        evidence=[evidence], content=root, series_instance_uid=derived_uid(source, model, "report series"),
        series_number=SERIES_NUMBER, sop_instance_uid=derived_uid(source, model, "report"), instance_number=1,
        manufacturer="lungxray", is_complete=True, is_final=False, is_verified=False,
        series_description="lungxray (research use only)")


class ReportWriter:
    """Writes each film's SR for one model, as the bytes of a DICOM file.

    highdicom builds the first report of each shape (the items `report_items` lists); a later one of
    the same shape is that first report read back with this film's values put in. highdicom checks
    the whole document against the standard as it builds it, ~40 ms a report on two cores, which
    kept the node under 20 films a second; reading and filling take ~2.5 ms. The two give the same
    report but for its creation times (tests/test_dicom_node.py)."""

    def __init__(self, model: ModelIdentity):
        self.model = model
        self._first: dict[tuple[str, ...], bytes] = {}

    def __call__(self, source: Dataset, answer: Answer) -> bytes:
        items = report_items(answer, self.model)
        shape = tuple(code for code, _, _ in items)
        if shape not in self._first:
            self._first[shape] = encoded(result_report(source, answer, self.model))
            return self._first[shape]
        report = pydicom.dcmread(io.BytesIO(self._first[shape]))
        for keyword in COPIED:
            setattr(report, keyword, source.get(keyword, ""))
        report.StudyInstanceUID = source.StudyInstanceUID
        report.SeriesInstanceUID = derived_uid(source, self.model, "report series")
        report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = derived_uid(source, self.model, "report")
        now = datetime.datetime.now()  # highdicom's clock: local time
        report.InstanceCreationDate = report.ContentDate = DA(now.date())
        report.InstanceCreationTime = report.ContentTime = TM(now.time())
        report.ContributingEquipmentSequence[-1].ContributionDateTime = DT(now)  # highdicom's own entry
        (evidence,) = report.CurrentRequestedProcedureEvidenceSequence
        evidence.StudyInstanceUID = source.StudyInstanceUID
        (series,) = evidence.ReferencedSeriesSequence
        series.SeriesInstanceUID = source.SeriesInstanceUID
        *values, image = report.ContentSequence
        for reference in (series.ReferencedSOPSequence[0], image.ReferencedSOPSequence[0]):
            reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
        for item, (_, _, value) in zip(values, items, strict=True):
            if isinstance(value, str):
                item.TextValue = value
            else:
                item.MeasuredValueSequence[0].NumericValue = DS(value, auto_format=True)
                item.MeasuredValueSequence[0].FloatingPointValue = value
        return encoded(report)


def encoded(dataset: Dataset) -> bytes:
    """A DICOM file's bytes (explicit VR little endian, which every peer accepts)."""
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
