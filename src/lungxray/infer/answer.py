"""The answer: what lungxray says of one film, one record for every output.

A film is answered with a class, or the class is *withheld* (the out-of-distribution gate flagged
the film and the caller refuses such films), or it is *not analysed* (it could not be read, or its
header says it is no frontal chest radiograph) and the answer says why. The rule that decides
this lives here, once; the command line's table, CSV and JSON, `predict --out`'s Parquet, the API,
the DICOM SR and the audit lines are each written from `Answer`s, and monitoring reads them.

    answers = answer_files(predictor, ["a.png", "b.dcm"], refuse_ood=True)
    answers[0].decision, answers[0].probabilities, answers[0].set
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path

from lungxray.model.conformal import DEFAULT_COVERAGE, describe_set, set_members

WITHHELD = "withheld"
NOT_ANALYSED = "not analysed"
OOD_NOTE = ("unlike the chest X-rays the model was trained on (out-of-distribution score above the gate's "
            "threshold): its class is not to be trusted")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclasses.dataclass(frozen=True)
class Answer:
    """`decision`: a class name, WITHHELD or NOT_ANALYSED, with its `reason` for the last two.
    `probabilities` (calibrated) and the conformal `set` (most probable first) are what the model
    said of an analysed film, kept for monitoring even when the class is withheld; what a person or
    a PACS is shown of them is `shown_probabilities` and `shown_set`, None unless a class is given.
    `ood_score` and `ood` (the gate's flag) are None for a model without a gate and for a film not
    analysed. `model` is the model's identity id, `time` when it answered (UTC)."""

    file: str
    sha256: str | None
    model: str
    decision: str
    reason: str | None = None
    probabilities: dict[str, float] | None = None
    set: tuple[str, ...] | None = None
    coverage: float | None = None
    ood_score: float | None = None
    ood: bool | None = None
    ood_threshold: float | None = None
    time: str = dataclasses.field(default_factory=now)

    @property
    def predicted(self) -> str | None:
        """The class given, or None when it was withheld or the film not analysed."""
        return None if self.decision in (WITHHELD, NOT_ANALYSED) else self.decision

    @property
    def shown_probabilities(self) -> dict[str, float] | None:
        return self.probabilities if self.predicted is not None else None

    @property
    def shown_set(self) -> tuple[str, ...] | None:
        return self.set if self.predicted is not None else None

    @property
    def set_says(self) -> str | None:
        """What the shown set says in words ("pneumonia or covid", "cannot tell", "none fits")."""
        return describe_set(list(self.set), list(self.probabilities)) if self.shown_set is not None else None


def not_analysed(file: str, reason: str, model: str, sha256: str | None = None) -> Answer:
    return Answer(str(file), sha256, model, NOT_ANALYSED, reason)


def answer_row(predictor, predictions, row: int, file: str, sha256: str | None = None, *, refuse_ood: bool = False,
               coverage: float = DEFAULT_COVERAGE) -> Answer:
    """The answer for row `row` of `predictions` (a readable film's), by the withhold rule: a film the
    gate flags keeps its score and flag, and with `refuse_ood` its class is withheld (and with it
    what is shown of its probabilities and set)."""
    probabilities, classes = predictions.probabilities[row], predictor.classes
    flagged = bool(predictions.ood[row]) if predictions.ood is not None else None
    gate = dict(ood_score=float(predictions.ood_score[row]), ood=flagged,
                ood_threshold=float(predictor.ood.threshold)) if flagged is not None else {}
    decision, reason = (WITHHELD, OOD_NOTE) if flagged and refuse_ood else (classes[int(probabilities.argmax())], None)
    in_set = (predictor.conformal.sets(predictions.raw[row:row + 1], coverage)[0]
              if predictor.conformal is not None else None)
    return Answer(str(file), sha256, predictor.identity.id, decision, reason,
                  probabilities={c: float(p) for c, p in zip(classes, probabilities)},
                  set=tuple(set_members(in_set, probabilities, classes)) if in_set is not None else None,
                  coverage=coverage if in_set is not None else None, **gate)


def answers_for(predictor, predictions, files: list, *, refuse_ood: bool = False,
                coverage: float = DEFAULT_COVERAGE) -> list[Answer]:
    """An answer per file of `predictions` (as `predictor.predict_files(files)` returned them). Files
    are matched to errors as paths ("./a.png" is "a.png"), however each runtime spelt them."""
    reasons = {Path(error.path): error.reason for error in predictions.errors}
    return [not_analysed(str(file), reasons[Path(file)], predictor.identity.id) if Path(file) in reasons else
            answer_row(predictor, predictions, row, str(file), predictions.hashes[row], refuse_ood=refuse_ood,
                       coverage=coverage)
            for row, file in enumerate(files)]


def answer_files(predictor, files: list, *, refuse_ood: bool = False, coverage: float = DEFAULT_COVERAGE,
                 desc: str | None = "predicting") -> list[Answer]:
    """Predict `files` with `predictor` and answer each."""
    predictions = predictor.predict_files(list(files), desc=desc)
    return answers_for(predictor, predictions, files, refuse_ood=refuse_ood, coverage=coverage)

