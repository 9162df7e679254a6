"""The DICOM node: a Storage SCP (with C-ECHO) that keeps each received radiograph in the spool
before it answers success, a worker that predicts each film with the same predictor as
`lungxray predict` and writes its report, and a sender that C-STOREs the reports (and, with a
heat-map maker, Grad-CAM captures) to the PACS, retrying with back-off while it is away; a report
the PACS refuses is set aside and the others go on. Started again after a crash, it resumes the spool.

    node = DicomNode(load_predictor("runs/mine"), send_to=Peer.parse("ORTHANC@127.0.0.1:4242"), spool=Path("spool"))
    node.start(); ...; node.stop()
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import (ComprehensiveSRStorage, ComputedRadiographyImageStorage,
                                  DigitalXRayImageStorageForPresentation, DigitalXRayImageStorageForProcessing,
                                  SecondaryCaptureImageStorage, Verification)

from lungxray.data.images import DICOM_SYNTAXES, read_dicom
from lungxray.dicom.metrics import NodeMetrics
from lungxray.dicom.sr import ReportWriter, check_classes, encoded, identity_digest, run_series_uid
from lungxray.dicom.send import Connection, Peer
from lungxray.dicom.spool import Spool
from lungxray.errors import ConfigError, DataError, ImageError
from lungxray.infer.answer import NOT_ANALYSED, Answer, answer_row, not_analysed
from lungxray.infer.monitoring_record import RecordWriter, hashed_uid, monitoring_record
from lungxray.io import file_hash
from lungxray.parallel import bounded_map

log = logging.getLogger(__name__)

RADIOGRAPHS = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
               DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage)
# What lungxray's DICOM reader decodes, and nothing else (deflate is refused there).
TRANSFER_SYNTAXES = sorted(DICOM_SYNTAXES)
WHEN_NOT_ANALYSED = ("report", "nothing")  # what a film it must not classify gets
# What the node sends: its reports and heat maps, always written explicit VR little endian (`encoded`).
RESULTS = [(ComprehensiveSRStorage, ExplicitVRLittleEndian), (SecondaryCaptureImageStorage, ExplicitVRLittleEndian)]
IDLE_SECONDS = 2.0  # the association to the PACS is released after this long with nothing to send
PREDICT_TOGETHER = 16  # films waiting that are answered together, in the predictor's threads
OUT_OF_RESOURCES = 0xA700  # C-STORE failure: refused, not lost; the PACS keeps the film and may retry
CANNOT_UNDERSTAND = 0xC000
REFERENCED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")  # what a report cites
PRUNE_EVERY = 3600.0  # seconds between prunings of the spool's old sent/ markers


@dataclasses.dataclass
class Limits:
    max_associations: int = 8
    max_pdu: int = 64 * 1024  # bytes a PDU may carry
    max_instance_mb: float = 64.0  # a received film larger than this is refused
    max_spool_mb: float = 2048.0  # films and reports waiting together; past it new films are refused


hashed = hashed_uid  # a UID as logs and monitoring records carry it: one rule for both


def film_name(uid: str) -> str:
    """What errors and answers call a received film: never its file or a UID a log could reveal."""
    return f"instance {hashed(uid)}"


class DicomNode:
    """`send_to`: a `Peer` (C-STORE) or a `lungxray.dicom.web.WebPeer` (STOW-RS). `records`: a file
    that gets each answer's monitoring record; `metrics_port`: /metrics served there, on `host`, with
    the drift of every `monitor_window` answers against `reference` (the run's reference.jsonl).
    `refuse_ood`: a film the out-of-distribution gate flags gets "withheld" and no class (the answer's
    rule); on by default here, where no person sees the film beside the report."""

    def __init__(self, predictor, send_to, spool: Path, aet: str = "LUNGXRAY",
                 host: str = "127.0.0.1", port: int = 11112, allow: list[str] | None = None,
                 limits: Limits | None = None, audit_log: Path | None = None, retry_seconds: float = 1.0,
                 max_retry_seconds: float = 60.0, tls=None, send_tls=None, heatmap=None,
                 not_analysed: str = "report", refuse_ood: bool = True, keep_sent_days: float = 30.0,
                 records: Path | str | None = None, metrics_port: int | None = None,
                 monitor_window: int | None = None, reference: Path | None = None):
        if not_analysed not in WHEN_NOT_ANALYSED:
            raise ConfigError(f"'not_analysed' must be one of {list(WHEN_NOT_ANALYSED)}. Got {not_analysed!r} instead.")
        try:
            check_classes(predictor.classes)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.predictor, self.model, self.send_to, self.refuse_ood = predictor, predictor.identity, send_to, refuse_ood
        # One run of the node: its reports (and heat maps) share one series in each study.
        self.run = uuid.uuid4().hex
        self._reports = ReportWriter(self.model, self.run)
        self.keep_sent_days = keep_sent_days
        self.limits = limits or Limits()
        self.spool = Spool(spool, int(self.limits.max_spool_mb * 2**20))
        self._watch_answers(records, metrics_port, monitor_window, reference)
        self.aet, self.host, self.port, self.allow = aet, host, port, allow
        self.audit_log = audit_log or Path(spool) / "audit.jsonl"
        self.retry_seconds, self.max_retry_seconds = retry_seconds, max_retry_seconds
        self.tls = tls  # an ssl.SSLContext (lungxray.dicom.tls.server_context) for incoming associations
        self.heatmap = heatmap  # a lungxray.dicom.heatmap.HeatmapMaker, or None: no heat maps
        self.not_analysed = not_analysed  # "report" (say why) or "nothing" (send nothing)
        # send_tls: an ssl.SSLContext from lungxray.dicom.tls.client_context, for the association to the PACS
        self._connection = (Connection(send_to, aet, RESULTS, send_tls) if isinstance(send_to, Peer) else
                            web_connection(send_to))
        self._work = threading.Event()
        self._stopping = threading.Event()
        self._audit_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._server = None

    def _watch_answers(self, records, metrics_port: int | None, monitor_window: int | None, reference) -> None:
        """Where each answer's monitoring record goes (a file, the live monitor), and the /metrics."""
        self.records = RecordWriter(records) if records else None
        self.metrics_port, self.metrics, self.live = metrics_port, NodeMetrics(self.spool.size), None
        if monitor_window:
            from lungxray.monitor.live import LiveMonitor  # SciPy: lungxray[full]
            from lungxray.monitor.records import read_jsonl

            self.live = LiveMonitor(read_jsonl(Path(reference)), monitor_window, self.metrics.registry)

    # -- the SCP -------------------------------------------------------------------------------
    def start(self, listen: bool = True) -> None:
        """Start the worker and the sender and, with `listen`, the Storage SCP (without: films come
        through `receive`, from `lungxray.dicom.web.Watcher`)."""
        # pydicom checks each UID it makes against the standard's pattern, and on reading a check only
        # ever warns. A PACS that proposes every storage class in each association (Debian's Orthanc 1.10,
        # DCMTK's storescu: 126 presentation contexts) makes pynetdicom build thousands of UIDs per film;
        # their checks were a quarter of the node's time for each association (docs/clinical-integration.md#speed).
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        # A report goes from the outbox as its file's bytes: parsing a TID 1500 report and encoding it
        # again cost the sender more than the node spent making it.
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
        if listen:
            self._listen()
        if self.metrics_port:
            try:
                self.metrics.serve(self.host, self.metrics_port)
            except OSError as error:
                raise ConfigError(f"cannot serve /metrics on {self.host}:{self.metrics_port} "
                                  f"({error.strerror or error}); choose another --metrics-port") from None
        self._threads = [threading.Thread(target=self._predict_loop, name="lungxray-dicom-worker", daemon=True),
                         threading.Thread(target=self._send_loop, name="lungxray-dicom-sender", daemon=True)]
        for thread in self._threads:
            thread.start()
        self._work.set()  # resume what the spool holds from before
        log.info("DICOM node %s %s, reports to %s", self.aet,
                 f"listening on {self.host}:{self.port}" if listen else "not listening", self.send_to)

    def _listen(self) -> None:
        ae = AE(ae_title=self.aet)
        for sop_class in RADIOGRAPHS:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        if self.allow:
            ae.require_calling_aet = list(self.allow)
        ae.require_called_aet = True  # a caller addressing another AE title is refused at association
        ae.maximum_associations = self.limits.max_associations
        ae.maximum_pdu_size = self.limits.max_pdu
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: 0x0000),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_REQUESTED, in_the_callers_order)]
        try:
            self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers,
                                           ssl_context=self.tls)
        except OSError as error:
            raise ConfigError(f"cannot listen on {self.host}:{self.port} ({error.strerror or error}); "
                              "choose another --port or --host") from None

    def stop(self) -> None:
        self._stopping.set()
        self._work.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.metrics.stop()
        for thread in self._threads:
            thread.join(timeout=30)

    def _on_rejected(self, event) -> None:
        log.warning("association from %s to %s refused (calling AE title not in --allow, called AE title not %s, "
                    "or a limit reached)", event.assoc.requestor.ae_title, event.assoc.acceptor.ae_title, self.aet)

    def _on_store(self, event) -> int:
        return self.receive(str(event.request.AffectedSOPInstanceUID), event.encoded_dataset(include_meta=True),
                            event.dataset, calling_aet=event.assoc.requestor.ae_title)

    def receive(self, uid: str, data: bytes, dataset: pydicom.Dataset, **origin) -> int:
        """Keep the film `uid` (its file's bytes `data`, parsed as `dataset`) to be answered; the
        C-STORE status to give whoever sent it. `origin` goes to the audit line."""
        if len(data) > self.limits.max_instance_mb * 2**20:
            log.warning("refused an instance of %.0f MB (limit %.0f MB)", len(data) / 2**20, self.limits.max_instance_mb)
            return OUT_OF_RESOURCES
        identity = identity_digest(dataset)
        key, kind = self.spool.key_for(uid, identity)
        if kind == "duplicate":  # the PACS retried, or sent it again: it is kept and answered once
            log.info("instance %s sent again unchanged: kept once", hashed(uid))
            return 0x0000
        if kind == "correction":
            log.warning("instance %s sent again with changed identifying attributes (patient, study, series or "
                        "accession): reported again, as a new report; the earlier report stays in the PACS", hashed(uid))
        refused = self.spool.accept(key, data)
        if refused is not None:
            log.warning("refused instance %s: %s", hashed(uid), refused)
            return OUT_OF_RESOURCES if refused.startswith("spool full") else CANNOT_UNDERSTAND
        self.spool.remember(uid, identity)
        self._audit("received" if kind == "new" else "received a correction", key, **origin)
        self._work.set()
        return 0x0000

    # -- the worker: films to reports ----------------------------------------------------------
    def _predict_loop(self) -> None:
        while not self._stopping.is_set():
            self._work.wait(timeout=1.0)
            self._work.clear()
            waiting = self.spool.waiting()
            for start in range(0, len(waiting), PREDICT_TOGETHER):
                if self._stopping.is_set():
                    return
                self.report(waiting[start:start + PREDICT_TOGETHER])

    def report(self, uids: list[str]) -> None:
        """Answer the spool's films `uids` and put each one's report (and heat map) in the outbox. A
        film no report can be made for is set aside; the others go on."""
        films = {}
        for uid in uids:
            try:  # each film is read and parsed once: its header and pixels come from this data set
                data = self.spool.incoming(uid).read_bytes()
                films[uid] = (reportable(read_dicom(data, film_name(uid)), film_name(uid)), file_hash(data))
            except Exception as error:
                self._set_aside(uid, error)
        answered = bounded_map(lambda uid: (uid, self._answer_film(uid, *films[uid])), list(films))
        for uid, outcome in answered:
            try:
                if isinstance(outcome, Exception):
                    raise outcome
                self._report(uid, films[uid][0], *outcome)
            except Exception as error:
                self._set_aside(uid, error)
        self._work.set()

    def _answer_film(self, uid: str, source: pydicom.Dataset, digest: str):
        """(the film's answer, the image the model saw or None), or the exception that stopped it."""
        name = film_name(uid)
        if source.get("Manufacturer") == "lungxray":  # routed back
            return not_analysed(name, "made by lungxray (a heat map), not a film", self.model.id, digest), None
        try:
            image = self.predictor.read(source, name)
            predictions = self.predictor.predict_images(image[None])
        except ImageError as error:
            return not_analysed(name, error.reason, self.model.id, digest), None
        except Exception as error:  # this film alone is set aside
            return error
        return answer_row(self.predictor, predictions, 0, name, digest, refuse_ood=self.refuse_ood), image

    def _set_aside(self, uid: str, error: Exception) -> None:
        """A film no report can be made for must not stop the node: it is kept aside, and logged in one
        line when the film is at fault (no header to answer it in), with one traceback when lungxray is."""
        kept = self.spool.set_aside(uid).parent  # the folder: a file name would reveal the UID
        if isinstance(error, ImageError):
            log.warning("no report could be made for instance %s (%s); it is kept in %s", hashed(uid), error.reason, kept)
        else:
            log.error("no report could be made for instance %s; it is kept in %s", hashed(uid), kept, exc_info=error)

    def _report(self, uid: str, source: pydicom.Dataset, answer: Answer, image) -> None:
        facts = dict(study=str(source.get("StudyInstanceUID", "")), decision=answer.decision, ood=answer.ood,
                     probabilities=answer.probabilities, reason=answer.reason)
        if self.records is not None or self.live is not None:
            record = monitoring_record(answer, image, source)
            if self.records is not None:
                self.records.write(record)
            if self.live is not None:
                self.live.add(record)
        if answer.decision == NOT_ANALYSED and self.not_analysed == "nothing":
            self.spool.answered_with_nothing(uid)
            self._audit("not analysed, nothing sent", uid, **facts)
            return
        heatmap = None
        if self.heatmap is not None and answer.predicted is not None:
            heatmap = encoded(self.heatmap(source, image, answer.predicted, answer.probabilities[answer.predicted],
                                           run_series_uid(self.run, self.model, source, "heat maps")))
        self.spool.reported(uid, self._reports(source, answer), heatmap)
        self._audit("reported", uid, heatmap=(heatmap is not None) if self.heatmap else None, **facts)

    # -- the sender: reports to the PACS -------------------------------------------------------
    def _send_loop(self) -> None:
        delay, idle_since, pruned_at = self.retry_seconds, None, 0.0
        while not self._stopping.is_set():
            if time.monotonic() - pruned_at > PRUNE_EVERY:
                pruned_at = time.monotonic()
                log.info("pruned %d sent/ marker(s) older than %g days", self.spool.prune_sent(self.keep_sent_days),
                         self.keep_sent_days)
            pending = self.spool.undelivered()
            if not pending:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > IDLE_SECONDS:
                    self._connection.close()
                self._stopping.wait(timeout=0.05)
                continue
            idle_since = None
            try:
                delivered = self._deliver(pending)
            except Exception:  # a network or file error must not stop the sender: it tries again
                log.exception("sending reports failed")
                delivered = False
            if delivered:
                delay = self.retry_seconds
            else:
                self._connection.close()
                log.warning("%s unreachable or not answering; %d report(s) wait in the outbox, next try in %.0f s",
                            self.send_to, len(pending), delay)
                self._stopping.wait(timeout=delay)
                delay = min(delay * 2, self.max_retry_seconds)
        self._connection.close()

    def _deliver(self, keys: list[str]) -> bool:
        """Send the outbox's reports, each marked delivered as the PACS takes it; one the PACS refuses
        is moved aside, and the others go on. False if the PACS could not be reached or did not answer."""
        for key in keys:
            try:
                outcome = self._connection.store(self.spool.outbox(key))
            except DataError:  # no association
                return False
            uid, heatmap, _ = key.partition(".heatmap")
            what = "heat map" if heatmap else "report"
            if refused_for_good(outcome):
                log.warning("%s refused the %s for instance %s: %s; it is kept in %s, not to be sent again",
                            self.send_to, what, hashed(uid), outcome,
                            self.spool.refused(key).parent)
                self._audit("refused by the PACS", uid, object=what, status=outcome)
                continue
            if outcome != "sent":
                return False
            self.spool.delivered(key)
            self._audit("delivered", uid, object=what)
        return True

    def _audit(self, event: str, uid: str, study: str = "", **facts) -> None:
        """One JSON line per event (and a count of it on /metrics): hashed UIDs, never a patient's
        name, id or birth date."""
        self.metrics.events.labels(event).inc()
        line = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event,
                "instance": hashed(uid), "model": self.model.id,
                **({"study": hashed(study)} if study else {}), **{k: v for k, v in facts.items() if v is not None}}
        with self._audit_lock, open(self.audit_log, "a") as handle:
            handle.write(json.dumps(line, default=lambda v: float(v) if isinstance(v, np.floating) else str(v)) + "\n")



def web_connection(send_to):
    """The sender's connection to a DICOMweb service (imported here: DICOMweb is optional)."""
    from lungxray.dicom.web import StowConnection

    return StowConnection(send_to)


def reportable(dataset: pydicom.Dataset, name: str) -> pydicom.Dataset:
    """`dataset`, or an ImageError when its header lacks what a report is filed by."""
    missing = [keyword for keyword in REFERENCED if not dataset.get(keyword)]
    if missing:
        raise ImageError(name, f"the header lacks {', '.join(missing)}: there is no study to report in")
    return dataset


def refused_for_good(outcome: str) -> bool:
    """A PACS's refusal that sending again would not change: a failure status other than "out of
    resources" (A7xx, which passes), or no presentation context for the object's class."""
    return outcome.startswith("refused") and not outcome.startswith("refused (status 0xA7")


def in_the_callers_order(event) -> None:
    """EVT_REQUESTED: each SOP class's transfer syntaxes put in the order the caller proposed them
    (pynetdicom accepts the first of its own list that the caller proposes; the caller knows its
    data best: Implicit VR first would lose the value representations of private elements)."""
    proposed: dict[str, list[str]] = {}
    for context in event.assoc.requestor.primitive.presentation_context_definition_list:
        order = proposed.setdefault(context.abstract_syntax, [])
        order += [syntax for syntax in context.transfer_syntax if syntax not in order]
    for context in event.assoc.acceptor.supported_contexts:
        ours = list(context.transfer_syntax)
        theirs = [syntax for syntax in proposed.get(context.abstract_syntax, []) if syntax in ours]
        context.transfer_syntax = theirs + [syntax for syntax in ours if syntax not in theirs]
