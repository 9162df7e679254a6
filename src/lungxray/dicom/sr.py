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

Every code is SNOMED CT, DCM or UCUM (docs/clinical-integration.md#the-report lists them and
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
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
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
    """TID 1501 groups: the classification, each shown probability, the gate's verdict. Only the
    first names the algorithm and the film (`common`): a group without source images has the
    document's, and the report stays small enough to write fast."""
    def tracked(what: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[report_uid, what]), identifier=f"lungxray {what}")

    groups = [classification(answer, generate_uid(entropy_srcs=[report_uid, "classification"]), common)]
    groups += [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracked(f"probability of {name}"), finding_type=FINDINGS[name],
        measurements=[hd.sr.Measurement(codes.DCM.Probability, round(float(p), 6), codes.UCUM.NoUnits)])
        for name, p in (answer.shown_probabilities or {}).items()]
    if answer.ood is not None:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracked("out-of-distribution gate"), finding_type=GATE,
            measurements=[hd.sr.Measurement(codes.SCT.Score, round(float(answer.ood_score), 6), codes.UCUM.NoUnits)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(GATE, codes.SCT.Yes if answer.ood else codes.SCT.No)]))
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

    highdicom builds the first report of each shape (`shape`). That report, its sequences rewritten
    with undefined lengths and every value that tells one film's report from another (`slots`) made a
    marker, is encoded once; a later report of the shape is those bytes with each marker's element
    replaced by the film's (`ReportTemplate`). highdicom checks the whole document against the
    standard as it builds it, 50-90 ms a report on two cores, and pydicom takes ~10 ms to encode a
    TID 1500 report of ~430 elements; the replacements take ~1 ms. Both ways give the same report but
    for its creation times (tests/test_dicom_node.py)."""

    def __init__(self, model: ModelIdentity, run: str):
        self.model, self.run = model, run
        self._templates: dict[tuple, ReportTemplate] = {}
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()

    def __call__(self, source: Dataset, answer: Answer) -> bytes:
        key, series = shape(answer), run_series_uid(self.run, self.model, source, "reports")
        with self._lock:
            number = next(self._numbers)
            if key not in self._templates:
                data = encoded(result_report(source, answer, self.model, series, number))
                self._templates[key] = ReportTemplate(pydicom.dcmread(io.BytesIO(data)), answer)
                return data
        return self._templates[key].write(source, slots(source, answer, self.model, series, number))


def shape(answer: Answer) -> tuple:
    """What fixes a report's tree but for its numbers, UIDs and reason: reports of one shape differ in those."""
    return (answer.decision, answer.shown_set, tuple(answer.shown_probabilities or ()), answer.ood,
            answer.coverage, answer.ood_threshold)


def tracked_groups(answer: Answer) -> list[str]:
    """The tracking identifiers (less "lungxray ") of a report's measurement groups, in order."""
    return ["classification", *(f"probability of {name}" for name in answer.shown_probabilities or ()),
            *(["out-of-distribution gate"] if answer.ood is not None else [])]


def slots(source: Dataset, answer: Answer, model: ModelIdentity, series_uid: str, number: int) -> dict:
    """What tells the report of `source` from another report of its shape, by slot (`SLOTS`)."""
    report_uid = derived_uid(source, model, "report", identity_digest(source))
    now = datetime.datetime.now()  # highdicom's clock: local time
    values = {keyword: source[keyword].value if keyword in source else "" for keyword in COPIED[1:]}
    values.update({"study": source.StudyInstanceUID, "series": series_uid, "report": report_uid, "instance number": number,
                   "date": DA(now.date()), "time": TM(now.time()), "datetime": DT(now),
                   "source series": source.SeriesInstanceUID, "source class": source.SOPClassUID,
                   "source instance": source.SOPInstanceUID, "reason": answer.reason or ""})
    numbers = [*(answer.shown_probabilities or {}).values(), *([answer.ood_score] if answer.ood is not None else [])]
    values.update({f"number {index}": round(float(value), 6) for index, value in enumerate(numbers)})
    values.update({f"tracking {what}": generate_uid(entropy_srcs=[report_uid, what]) for what in tracked_groups(answer)})
    return values


# Where each slot's value goes: (the element's keyword, the slot); a slot may fill several elements.
SLOTS = [*((keyword, keyword) for keyword in COPIED[1:]), ("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series"),
         ("SeriesInstanceUID", "source series"), ("SOPInstanceUID", "report"), ("InstanceNumber", "instance number"),
         ("InstanceCreationDate", "date"), ("ContentDate", "date"), ("InstanceCreationTime", "time"),
         ("ContentTime", "time"), ("ContributionDateTime", "datetime"), ("ReferencedSOPClassUID", "source class"),
         ("ReferencedSOPInstanceUID", "source instance"), ("TextValue", "reason")]


def put(report: Dataset, values: dict) -> Dataset:
    """`values` (`slots`) put in `report`, a report of their shape, in place."""
    for keyword in COPIED[1:]:
        setattr(report, keyword, values[keyword])
    report.StudyInstanceUID, report.SeriesInstanceUID = values["study"], values["series"]
    report.SOPInstanceUID, report.InstanceNumber = values["report"], values["instance number"]
    report.InstanceCreationDate = report.ContentDate = values["date"]
    report.InstanceCreationTime = report.ContentTime = values["time"]
    report.ContributingEquipmentSequence[0].ContributionDateTime = values["datetime"]  # highdicom's own entry
    (evidence,) = report.CurrentRequestedProcedureEvidenceSequence
    evidence.StudyInstanceUID = values["study"]
    (series,) = evidence.ReferencedSeriesSequence
    series.SeriesInstanceUID = values["source series"]
    references, numbers = [series.ReferencedSOPSequence[0]], itertools.count()
    for item in content_items(report):
        if item.ValueType == "IMAGE":
            references.append(item.ReferencedSOPSequence[0])
        elif item.ValueType == "NUM":
            value = values[f"number {next(numbers)}"]
            item.MeasuredValueSequence[0].NumericValue = DS(value, auto_format=True)
            item.MeasuredValueSequence[0].FloatingPointValue = value
        elif item.ValueType == "TEXT" and concept_code(item) == codes.DCM.Comment.value:
            item.TextValue = values["reason"]
        elif item.ValueType == "CONTAINER" and concept_code(item) == codes.DCM.MeasurementGroup.value:
            tracking = {concept_code(i): i for i in item.ContentSequence}
            what = str(tracking[codes.DCM.TrackingIdentifier.value].TextValue).removeprefix("lungxray ")
            tracking[codes.DCM.TrackingUniqueIdentifier.value].UID = values[f"tracking {what}"]
    for reference in references:
        reference.ReferencedSOPClassUID = values["source class"]
        reference.ReferencedSOPInstanceUID = values["source instance"]
    return report


class ReportTemplate:
    """A report of one shape as bytes in which each slot's elements hold markers (`marker`)."""

    def __init__(self, report: Dataset, answer: Answer):
        self.meta = report.file_meta
        report.pop("SpecificCharacterSet", None)  # written per film, ahead of the body
        for element in report.iterall():
            if element.VR == "SQ":
                element.is_undefined_length = True
                for item in element.value:
                    item.is_undefined_length_sequence_item = True
        groups = tracked_groups(answer)
        self.slots = [*SLOTS, *(("UID", f"tracking {what}") for what in groups),
                      *((keyword, f"number {index}") for index in range(len(groups) - 1)  # one number a group but the first
                        for keyword in ("NumericValue", "FloatingPointValue"))]
        first_keyword = dict(reversed(list((slot, keyword) for keyword, slot in self.slots)))
        self.markers = {slot: marker(dictionary_VR(keyword), index) for index, (slot, keyword) in
                        enumerate(first_keyword.items())}
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, put(report, self.markers))
        self.body = buffer.getvalue()

    def write(self, source: Dataset, values: dict) -> bytes:
        """The report's file, `values` (`slots`) put in; its text in the film's character set."""
        charset = source.get("SpecificCharacterSet")
        encodings = convert_encodings(charset) if charset else ASCII
        body = self.body
        for keyword, slot in self.slots:
            body = body.replace(element_bytes(keyword, self.markers[slot], ASCII),
                                element_bytes(keyword, values[slot], encodings))
        meta = FileMetaDataset(self.meta)
        meta.MediaStorageSOPInstanceUID = values["report"]
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        buffer.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(buffer, meta)
        if charset is not None:
            buffer.write(element_bytes("SpecificCharacterSet", charset, encodings))
        return buffer.getvalue() + body


ASCII = convert_encodings(None)  # DICOM's default repertoire


def marker(vr: str, index: int):
    """A value of `vr` that no report holds, unique to the slot numbered `index`."""
    if vr == "UI":
        return f"2.25.{987654321000 + index}"
    if vr in ("DA", "DT"):
        return f"{1900 + index:04d}0101" + ("000000" if vr == "DT" else "")
    if vr == "TM":
        return f"00{index:02d}01"
    if vr == "IS":
        return str(900000 + index)
    if vr in ("DS", "FD"):
        return 90000.25 + index
    return f"QZX{index:04d}"


def element_bytes(keyword: str, value, encodings: list[str]) -> bytes:
    """One data element as written in explicit VR little endian."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_data_element(buffer, DataElement(tag_for_keyword(keyword), dictionary_VR(keyword), value), encodings)
    return buffer.getvalue()


def content_items(dataset: Dataset):
    """Every content item under `dataset`, depth first, in document order."""
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def concept_code(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


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
