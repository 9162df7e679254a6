"""The run folder: the one place that knows what a run writes, where, and how to find it again.

```
RUN/
  config.json           the Config (rerun with --config RUN/config.json)
  data.csv              every image with its label and split, as trained
  unreadable.csv        images left out, with the reason (only if there were any)
  train_hashes.txt      SHA-256 of each training image (overlap checks at evaluation)
  history.csv           per-epoch loss and metrics; loss.png, accuracy.png
  checkpoints/          best weights so far of each training phase (head.weights.h5: the head
                        alone; model.weights.h5: the whole model), kept through an interruption
  model.keras           the trained network (safe-mode loadable)
  model.json            what is needed to use it: classes, input size, temperature, provenance
  ood.npz               the out-of-distribution gate
  lungs.keras           the lung segmenter whose box the model sees (crop=lungs only)
  timings.json          wall time of each step
  evaluation/           metrics.json (see evaluate.schema), plots, predictions.csv, report.html
  evaluation-external/  the same for a held-out source (--holdout-source)
  report.md             the run's summary, linking all of the above
  export/               `lungxray export`: model.tflite, model.onnx or model.savedmodel/, each with
                        its sidecar (FILE.json) and gate (FILE.ood.npz)
```
A model can also be used from a bare `.keras` file with its `.json` beside it.
"""

from __future__ import annotations

import csv
import datetime
from pathlib import Path

from lungxray.errors import DataError, WeightsError
from lungxray.io import atomic_path, read_json, remove, write_json, write_text


class RunDir:
    CONFIG = "config.json"
    DATA = "data.csv"
    UNREADABLE = "unreadable.csv"
    TRAIN_HASHES = "train_hashes.txt"
    HISTORY = "history.csv"
    CHECKPOINTS = "checkpoints"
    MODEL = "model.keras"
    LUNGS = "lungs.keras"
    OOD = "ood.npz"
    TIMINGS = "timings.json"
    EVALUATION = "evaluation"
    EXTERNAL_EVALUATION = "evaluation-external"
    REPORT = "report.md"
    EXPORT = "export"
    REFERENCE = "reference.jsonl"  # the validation split's monitoring records (docs/monitoring.md)

    def __init__(self, folder: str | Path, model_file: str | Path | None = None):
        self.folder = Path(folder)
        self.model = Path(model_file) if model_file else self.folder / self.MODEL
        self.name = self.folder.name  # what the run's model is called in answers and reports

    @classmethod
    def create(cls, out: str | Path | None = None, resume: bool = False) -> "RunDir":
        """A folder for a new run (default `runs/<timestamp>`), or, with `resume`, the folder of an
        interrupted one. A finished run (it has its model) is never overwritten; temporary files
        an interruption left behind are removed."""
        if out is None:
            out = Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run = cls(out)
        if run.model.exists():
            raise DataError(f"{run.folder} already holds a trained model; choose another --out or remove it")
        started = run.path(run.CONFIG).exists()
        if started and not resume:
            raise DataError(f"{run.folder} holds an interrupted run; add --resume to continue it, or choose another --out")
        if resume and not started:
            raise DataError(f"{run.folder} holds no run to resume (no {run.CONFIG})")
        run.folder.mkdir(parents=True, exist_ok=True)
        for leftover in run.folder.rglob(".tmp-*"):
            remove(leftover)
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """The run of a folder or of a `.keras` file, which must exist."""
        path = Path(path)
        run = cls(path) if path.is_dir() else cls(path.parent, path)
        if not run.model.is_file():
            raise WeightsError(f"no model at {run.model}; give a run folder (with {cls.MODEL}) or a .keras file")
        if run.model.suffix != ".keras":
            raise WeightsError(f"{run.model} is not a .keras file; lungxray saves and loads only .keras models")
        return run

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def model_info(self) -> Path:
        """The sidecar that travels with the model file: `model.keras` → `model.json`."""
        return self.model.with_suffix(".json")

    def export(self, suffix: str) -> Path:
        """Where `lungxray export` puts the model in the format with this suffix (".tflite"...)."""
        return self.folder / self.EXPORT / f"model{suffix}"

    def checkpoint(self, holds: str) -> Path:
        """Where the best weights of a phase are kept: `holds` is "head", "blocks" (the head and the
        blocks above `train_from`) or "model"."""
        return self.folder / self.CHECKPOINTS / f"{holds}.weights.h5"

    def evaluation_of(self, data: str | Path) -> Path:
        """Where `lungxray evaluate` writes its evaluation of `data` by default: evaluation-<data's name>."""
        return self.folder / f"{self.EVALUATION}-{Path(data).stem}"

    def evaluation(self, external: bool = False) -> Path:
        return self.folder / (self.EXTERNAL_EVALUATION if external else self.EVALUATION)

    def plot(self, name: str) -> Path:
        return self.folder / f"{name}.png"

    def write_json(self, name: str, value) -> None:
        write_json(self.path(name), value)

    def read_model_info(self) -> dict:
        return read_json(self.model_info, WeightsError,
                         f"is missing: it holds the class names that go with {self.model}")

    def write_train_hashes(self, hashes) -> None:
        write_text(self.path(self.TRAIN_HASHES), "".join(f"{h}\n" for h in hashes if h))

    def read_train_hashes(self) -> set[str] | None:
        path = self.path(self.TRAIN_HASHES)
        return set(path.read_text().split()) if path.is_file() else None

    def write_unreadable(self, errors) -> Path:
        path = self.path(self.UNREADABLE)
        with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "reason"])
            writer.writerows([e.path, e.reason] for e in errors)
        return path
