"""The Structured Report lungxray returns for a film: an IHE AI Results (AIR) report, that is a DICOM
TID 1500 Measurement Report built with highdicom's `sr` templates, in the film's study, referencing
the film, written from its `Answer` and the model's `ModelIdentity`.

    Imaging Measurement Report (TID 1500), observer: the model as a device
      Procedure reported: Imaging procedure
      Measurement group "lungxray classification" (TID 1501), algorithm (TID 4019), source: the film
        Finding (its finding type): COVID-19 | Pneumonia | Normal, or Indeterminate (withheld) or
          Not Evaluated (not analysed)
        Differential Diagnosis/Impression: each class of the conformal set (a class given)
        Comment: why the class was withheld, or why the film was not analysed
      Measurement group per class (a class given): finding type the class, Probability (calibrated)
      Measurement group "out-of-distribution gate" (a model with a gate, a film analysed):
        finding type Outside operational limits of the device, Score, and Yes or No

Every code is SNOMED CT, DCM, UCUM or LOINC (docs/clinical-integration.md#the-report lists them and
says where each was checked); none is private. The model is named three times, as IHE AIR asks: the
observer device, the TID 4019 algorithm (name, version, fingerprint, settings and the research-use
notice as its parameters) and the Contributing Equipment Sequence, whose device UID changes with the
model's fingerprint. `report_values` reads a report back through highdicom."""

from __future__ import annotations

import datetime
import hashlib
import io
import itertools
import threading

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA, DS, DT, TM

from lungxray.infer.answer import NOT_ANALYSED, WITHHELD, Answer
from lungxray.infer.identity import ModelIdentity

SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "lungxray (research use only)"
# SNOMED CT's codes for the classes: Normal is in pydicom's code tables; COVID-19 (the disorder, FSN
# "Disease caused by severe acute respiratory syndrome coronavirus 2") and Pneumonia are not, and are
# SNOMED CT's own concept ids, given with their preferred terms.
FINDINGS = {"covid": hd.sr.CodedConcept("840539006", "SCT", "COVID-19"),
            "pneumonia": hd.sr.CodedConcept("233604007", "SCT", "Pneumonia"),
            "normal": codes.SCT.Normal}
NO_FINDING = {WITHHELD: codes.SCT.Indeterminate, NOT_ANALYSED: codes.SCT.NotEvaluated}
GATE = codes.DCM.OutsideOperationalLimitsOfTheDevice
PROCEDURE = codes.cid100.ImagingProcedure  # CID 100 as validators know it has no radiograph of the chest
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment  # CID 7005 has no "processing algorithm"
# The patient and study attributes an SR copies from its evidence (DICOM type 2: present, maybe empty),
# with the character set they are written in.
COPIED = ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
          "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
# What identifies a film's patient and place: a film sent again with any of these changed is a correction.
IDENTIFYING = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "IssuerOfPatientID", "StudyInstanceUID",
               "SeriesInstanceUID", "AccessionNumber")


def check_classes(classes: list[str]) -> None:
    """A ValueError naming the classes a report could not code."""
    unknown = sorted(set(classes) - set(FINDINGS))
    if unknown:
        raise ValueError(f"no SNOMED CT code for the class(es) {unknown}: a report codes only {sorted(FINDINGS)}")


def device_uid(model: ModelIdentity) -> str:
    """The model as a device: a UID that changes when the model's fingerprint does."""
    return generate_uid(entropy_srcs=[model.fingerprint, "lungxray device"])


def derived_uid(source: Dataset, model: ModelIdentity, what: str, *also: str) -> str:
    """The UID of something lungxray derives from the film `source` with `model` (and `also`): the same
    each time it is made again (after a crash), so that a PACS given it twice keeps it once."""
    return generate_uid(entropy_srcs=[str(source.SOPInstanceUID), model.fingerprint, what, *also])


def run_series_uid(run: str, model: ModelIdentity, source: Dataset, what: str) -> str:
    """The series in the film's study that holds what one node run (`run`) makes with `model`: its
    reports, or its heat maps."""
    return generate_uid(entropy_srcs=[run, model.fingerprint, str(source.StudyInstanceUID), what])


def algorithm(model: ModelIdentity, answer: Answer) -> hd.sr.AlgorithmIdentification:
    """TID 4019: the model's name and version, its fingerprint and settings, the research-use notice."""
    settings = [f"model SHA-256 {model.fingerprint}"]
    if answer.coverage is not None:
        settings.append(f"conformal set coverage {answer.coverage:g}")
    if answer.ood_threshold is not None:
        settings.append(f"out-of-distribution threshold {answer.ood_threshold:.6g}")
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version,
                                         parameters=[*settings, f"intended use: {model.notice}"])


def classification(answer: Answer, tracking_uid: str, common: dict) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The group that says what the model decided: the finding, the conformal set, and why not."""
    finding = FINDINGS[answer.predicted] if answer.predicted is not None else NO_FINDING[answer.decision]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier="lungxray classification"),
        finding_type=finding, qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(codes.DCM.DifferentialDiagnosisImpression, FINDINGS[name])
            for name in answer.shown_set or ()], **common)
    if answer.predicted is None:  # TID 1501 has no coded place for a free-text reason: a Comment
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=answer.reason, relationship_type="CONTAINS"))
    return group


def measurement_groups(answer: Answer, report_uid: str, common: dict) -> list:
    """TID 1501 groups: the classification, each shown probability, the gate's verdict."""
    def tracked(what: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[report_uid, what]), identifier=f"lungxray {what}")

    groups = [classification(answer, generate_uid(entropy_srcs=[report_uid, "classification"]), common)]
    groups += [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracked(f"probability of {name}"), finding_type=FINDINGS[name],
        measurements=[hd.sr.Measurement(codes.DCM.Probability, round(float(p), 6), codes.UCUM.NoUnits)], **common)
        for name, p in (answer.shown_probabilities or {}).items()]
    if answer.ood is not None:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracked("out-of-distribution gate"), finding_type=GATE,
            measurements=[hd.sr.Measurement(codes.SCT.Score, round(float(answer.ood_score), 6), codes.UCUM.NoUnits)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(GATE, codes.SCT.Yes if answer.ood else codes.SCT.No)],
            **common))
    return groups


def result_report(source: Dataset, answer: Answer, model: ModelIdentity, series_uid: str,
                  instance_number: int = 1) -> hd.sr.ComprehensiveSR:
    """The SR for `source` (the received film's dataset, pixels not needed), built by highdicom, in the
    series `series_uid`. Its UID is derived from the film's, the model's and the film's identifying
    attributes: made again after a crash it is the same instance; for a corrected resend, a new one."""
    evidence = Dataset()
    evidence.update({keyword: source.get(keyword, "") for keyword in COPIED if keyword != "SpecificCharacterSet"})
    if "SpecificCharacterSet" in source:
        evidence.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        setattr(evidence, keyword, source[keyword].value)
    report_uid = derived_uid(source, model, "report", identity_digest(source))
    common = dict(algorithm_id=algorithm(model, answer), source_images=[hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=source.SOPClassUID, referenced_sop_instance_uid=source.SOPInstanceUID)])
    observer = hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=(
        hd.sr.DeviceObserverIdentifyingAttributes(uid=device_uid(model), name="lungxray", manufacturer_name="lungxray",
                                                  model_name=model.name)))
    content = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                      procedure_reported=PROCEDURE,
                                      imaging_measurements=measurement_groups(answer, report_uid, common))
    report = hd.sr.ComprehensiveSR(
        evidence=[evidence], content=content, series_instance_uid=series_uid, series_number=SERIES_NUMBER,
        sop_instance_uid=report_uid, instance_number=instance_number, manufacturer="lungxray",
        manufacturer_model_name=model.name, software_versions=model.version, is_complete=True, is_final=False,
        is_verified=False, series_description=SERIES_DESCRIPTION)
    report.ContributingEquipmentSequence.append(contributing_equipment(model))
    return report


def contributing_equipment(model: ModelIdentity) -> Dataset:
    """The model, as the equipment that made the report's content."""
    item = Dataset()
    item.Manufacturer, item.ManufacturerModelName, item.SoftwareVersions = "lungxray", model.name, model.version
    item.DeviceUID = device_uid(model)
    item.ContributionDescription = "classification by a machine-learning model (research use only)"
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept(PROCESSING_EQUIPMENT.value,
                                                              PROCESSING_EQUIPMENT.scheme_designator,
                                                              PROCESSING_EQUIPMENT.meaning)]
    return item


def encoded(dataset: Dataset) -> bytes:
    """A DICOM file's bytes (explicit VR little endian, which every peer accepts)."""
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def identity_digest(source: Dataset) -> str:
    """What tells a corrected resend of a film from the first: its identifying attributes, hashed."""
    return hashlib.sha256(repr([str(source.get(k, "")) for k in IDENTIFYING]).encode()).hexdigest()[:16]


class ReportWriter:
    """Writes each film's SR for one model and one node run, as the bytes of a DICOM file: the SRs of
    a run share one series in each study, numbered in the order they are made.

    highdicom builds the first report of each shape (`shape`); a later one of the same shape is that
    first report read back with this film's values put in (`filled`). highdicom checks the whole
    document against the standard as it builds it, ~50-90 ms a report on two cores, which kept the
    node under 20 films a second; reading and filling take a few milliseconds. The two give the same
    report but for its creation times (tests/test_dicom_node.py)."""

    def __init__(self, model: ModelIdentity, run: str):
        self.model, self.run = model, run
        self._first: dict[tuple, bytes] = {}
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()

    def __call__(self, source: Dataset, answer: Answer) -> bytes:
        with self._lock:
            number = next(self._numbers)
        key, series = shape(answer), run_series_uid(self.run, self.model, source, "reports")
        if key not in self._first:
            self._first[key] = encoded(result_report(source, answer, self.model, series, number))
            return self._first[key]
        return encoded(filled(pydicom.dcmread(io.BytesIO(self._first[key])), source, answer, self.model, series,
                              number))


def shape(answer: Answer) -> tuple:
    """What fixes a report's tree but for its numbers, UIDs and reason: reports of one shape differ in those."""
    return (answer.decision, answer.shown_set, tuple(answer.shown_probabilities or ()), answer.ood,
            answer.coverage, answer.ood_threshold)


def filled(report: Dataset, source: Dataset, answer: Answer, model: ModelIdentity, series_uid: str,
           number: int) -> Dataset:
    """`report` (another film's, of the same shape) made the report of `source`."""
    for keyword in COPIED:
        if keyword in source:
            setattr(report, keyword, source[keyword].value)
        elif keyword == "SpecificCharacterSet":
            report.pop(keyword, None)
        else:
            setattr(report, keyword, "")
    report_uid = derived_uid(source, model, "report", identity_digest(source))
    report.StudyInstanceUID, report.SeriesInstanceUID, report.InstanceNumber = source.StudyInstanceUID, series_uid, number
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = report_uid
    now = datetime.datetime.now()  # highdicom's clock: local time
    report.InstanceCreationDate = report.ContentDate = DA(now.date())
    report.InstanceCreationTime = report.ContentTime = TM(now.time())
    report.ContributingEquipmentSequence[0].ContributionDateTime = DT(now)  # highdicom's own entry
    (evidence,) = report.CurrentRequestedProcedureEvidenceSequence
    evidence.StudyInstanceUID = source.StudyInstanceUID
    (series,) = evidence.ReferencedSeriesSequence
    series.SeriesInstanceUID = source.SeriesInstanceUID
    references = [series.ReferencedSOPSequence[0]]
    numbers = iter([*(answer.shown_probabilities or {}).values(), *([answer.ood_score] if answer.ood is not None else [])])
    for item in content_items(report):
        if item.ValueType == "IMAGE":
            references.append(item.ReferencedSOPSequence[0])
        elif item.ValueType == "NUM":
            value = round(float(next(numbers)), 6)
            item.MeasuredValueSequence[0].NumericValue = DS(value, auto_format=True)
            item.MeasuredValueSequence[0].FloatingPointValue = value
        elif item.ValueType == "TEXT" and concept_code(item) == codes.DCM.Comment.value:
            item.TextValue = answer.reason
        elif item.ValueType == "CONTAINER" and concept_code(item) == codes.DCM.MeasurementGroup.value:
            retracked(item, report_uid)
    for reference in references:
        reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    return report


def content_items(dataset: Dataset):
    """Every content item under `dataset`, depth first, in document order."""
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def concept_code(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def retracked(group: Dataset, report_uid: str) -> None:
    """A measurement group's tracking UID made anew from its identifier and the report's UID (`tracked`)."""
    items = {concept_code(item): item for item in group.ContentSequence}
    identifier = str(items[codes.DCM.TrackingIdentifier.value].TextValue).removeprefix("lungxray ")
    items[codes.DCM.TrackingUniqueIdentifier.value].UID = generate_uid(entropy_srcs=[report_uid, identifier])


def report_values(dataset: Dataset) -> dict:
    """What a lungxray SR says, read back through highdicom: `source` (the film's SOP Instance UID),
    `decision` (a class, "withheld" or "not analysed"), `reason`, `probabilities`, `set`, `ood_score`,
    `ood`, and `algorithm` (name, version, parameters). ValueError if it is no lungxray report."""
    document = hd.sr.ComprehensiveSR.from_dataset(dataset)
    groups = {str(g.tracking_identifier): g for g in document.content.get_image_measurement_groups()}
    if "lungxray classification" not in groups:
        raise ValueError("not a lungxray report: no measurement group 'lungxray classification'")
    decided = groups.pop("lungxray classification")
    meaning = {(c.value, c.scheme_designator): name for name, c in [*FINDINGS.items(), *NO_FINDING.items()]}
    finding = decided.finding_type
    items = list(content_items(decided[0]))
    texts = {concept_code(i): [] for i in items if i.ValueType == "TEXT"}
    for item in items:
        if item.ValueType == "TEXT":
            texts[concept_code(item)].append(str(item.TextValue))
    values = {"source": decided.source_images[0].referenced_sop_instance_uid,
              "decision": meaning[(finding.value, finding.scheme_designator)],
              "reason": texts.get(codes.DCM.Comment.value, [None])[0],
              "set": [meaning[(e.value.value, e.value.scheme_designator)] for e in decided.get_qualitative_evaluations()],
              "algorithm": {"name": texts[codes.DCM.AlgorithmName.value][0],
                            "version": texts[codes.DCM.AlgorithmVersion.value][0],
                            "parameters": texts.get(codes.DCM.AlgorithmParameters.value, [])},
              "probabilities": {}, "ood_score": None, "ood": None}
    for group in groups.values():
        (measurement,) = group.get_measurements()
        if group.finding_type == GATE:
            (verdict,) = group.get_qualitative_evaluations()
            values["ood_score"], values["ood"] = float(measurement.value), verdict.value == codes.SCT.Yes
        else:
            values["probabilities"][meaning[(group.finding_type.value, group.finding_type.scheme_designator)]] = float(
                measurement.value)
    return values
