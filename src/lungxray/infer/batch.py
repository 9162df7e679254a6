"""Scoring an archive: many files in, Parquet out, in this process or on a Ray cluster.

    OUT/part-<batch id>.parquet   one per batch of files, written whole or not at all: the answers'
                                  flat columns (file, sha256, decision, predicted, p_<class>..., set,
                                  ood_score, ood, error, model, time: `outputs.columns`)
    OUT/records/part-<batch id>.jsonl   the same answers' monitoring records (docs/monitoring.md),
                                  written before their part
    OUT/predictions.csv           all parts in one CSV (on request)

A batch's part is written atomically when the batch is done, so an interrupted job loses at most
the batches in flight, and running the same command again scores only the files no part holds yet.
Unreadable files are rows with an `error`, never a failed job. On Ray (`lungxray.cluster`), each
worker (an actor) loads the exported model once and writes the parts of the batches it is given;
the driver only lists files. Workers read the files and write OUT themselves: on a cluster both
must be on storage every node sees (docs/scale.md).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from lungxray.cluster import RayCluster
from lungxray.model.conformal import DEFAULT_COVERAGE
from lungxray.data.records import IMAGE_SUFFIXES
from lungxray.errors import ConfigError, DataError
from lungxray.io import atomic_path, file_hash
from lungxray.infer.answer import answers_for
from lungxray.infer.identity import ModelIdentity
from lungxray.infer.lite_predictor import LitePredictor
from lungxray.infer.loader import load_predictor
from lungxray.infer.monitoring_record import monitoring_record, write_records
from lungxray.infer.outputs import arrow_table
from lungxray.infer.predictor import Predictor
from lungxray.parallel import progress

PART_GLOB = "part-*.parquet"
RECORDS_FOLDER = "records"
CSV_FILE = "predictions.csv"
FILE_COLUMNS = ("file", "path")  # what a manifest or Parquet input may call its file column


def list_inputs(items: list[str | Path]) -> list[str]:
    """Image files from files, folders (searched recursively), manifest CSVs and Parquet files
    with a `file` or `path` column (relative paths are relative to the manifest)."""
    files: list[str] = []
    for item in map(Path, items):
        if item.is_dir():
            files += sorted(str(p) for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.suffix.lower() in (".csv", ".parquet"):
            files += [str(item.parent / name) for name in _listed(item)]
        else:
            files.append(str(item))
    return files


def _listed(manifest: Path) -> list[str]:
    if not manifest.is_file():
        raise DataError(f"{manifest} does not exist")
    if manifest.suffix.lower() == ".csv":
        with manifest.open(newline="") as handle:
            reader = csv.DictReader(handle)
            column = _file_column(manifest, reader.fieldnames or [])
            return [row[column] for row in reader]
    import pyarrow.parquet as pq

    column = _file_column(manifest, pq.read_schema(manifest).names)
    return [str(name) for name in pq.read_table(manifest, columns=[column]).column(column).to_pylist()]


def _file_column(manifest: Path, columns: list[str]) -> str:
    column = next((c for c in FILE_COLUMNS if c in columns), None)
    if column is None:
        raise DataError(f"{manifest} has no 'file' or 'path' column (columns: {columns})")
    return column


def scored_files(out: Path) -> set[str]:
    """Files the parts in `out` already hold. A part that cannot be read (written by something
    else, or damaged) is set aside as `.bad` and its files are scored again."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for part in sorted(out.glob(PART_GLOB)):
        try:
            done.update(pq.read_table(part, columns=["file"]).column("file").to_pylist())
        except Exception:  # any unreadable part: its files are simply scored again
            part.rename(part.with_name(part.name + ".bad"))
    return done


def score_table(predictor: Predictor, files: list[str], refuse_ood: bool = False,
                coverage: float = DEFAULT_COVERAGE):
    """The answers for `files` as a table of the flat columns (`outputs.columns`), and their
    monitoring records."""
    predictions = predictor.predict_files(list(files), desc=None)  # batches show progress
    answers = answers_for(predictor, predictions, files, refuse_ood=refuse_ood, coverage=coverage)
    observed = predictions.observed or [None] * len(answers)  # answers_for keeps the files' order
    records = [monitoring_record(answer, observed=seen) for answer, seen in zip(answers, observed, strict=True)]
    return arrow_table(answers, predictor.classes), records


def write_part(out: Path, files: list[str], table, records: list[dict]) -> Path:
    """The batch's part, named after its files (the same batch always lands in the same part), and
    before it, its records: a batch scored again after a crash writes both again, once."""
    import pyarrow.parquet as pq

    name = f"part-{file_hash(chr(10).join(files).encode())[:16]}"
    (out / RECORDS_FOLDER).mkdir(exist_ok=True)
    write_records(out / RECORDS_FOLDER / f"{name}.jsonl", records)
    part = out / f"{name}.parquet"
    with atomic_path(part) as temporary:
        pq.write_table(table, temporary)
    return part


@dataclasses.dataclass
class ScoringResult:
    out: Path
    scored: int  # files scored by this call
    skipped: int  # files earlier calls had scored
    errors: int  # of the files scored, how many could not be read
    csv: Path | None = None


def score(model: str | Path, items: list[str | Path], out: Path, cluster: RayCluster | None = None,
          batch_size: int = 512, write_csv: bool = False, refuse_ood: bool = False, coverage: float = DEFAULT_COVERAGE,
          runtime: str = "auto") -> ScoringResult:
    """Answer every image `items` name into `out`, skipping files already there, with `model` (an
    export, or a run folder's export in `runtime`, as `load_predictor` chooses it): in this process
    (one thread per core), or on `cluster`'s Ray workers."""
    if batch_size < 1:
        raise DataError(f"'batch_size' must be at least 1. Got {batch_size} instead.")
    predictor = load_predictor(model, runtime=runtime)
    if predictor.runtime == "keras":
        raise ConfigError(f"scoring into a folder runs an exported model, and {model} has no checked export: make "
                          f"one with `lungxray export --model {model}`")
    files = list(dict.fromkeys(list_inputs(items)))
    out.mkdir(parents=True, exist_ok=True)
    done = scored_files(out)
    todo = [f for f in files if f not in done]
    if cluster is not None:
        counts = cluster.map_files(todo, PartWriter, batch_size, export=str(predictor.model_path.resolve()),
                                   out=str(out.resolve()), refuse_ood=refuse_ood, coverage=coverage,
                                   identity=predictor.identity)
        errors = int(sum(batch["errors"].sum() for batch in counts))
    else:
        errors = 0
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        for batch in progress(batches, len(batches), "batches", unit="batch"):
            table, records = score_table(predictor, batch, refuse_ood, coverage)
            write_part(out, batch, table, records)
            errors += unreadable(table)
    result = ScoringResult(out, len(todo), len(files) - len(todo), errors)
    if write_csv:
        result.csv = write_combined_csv(out)
    return result


class PartWriter:
    """A Ray actor: the model, loaded once; each batch of file names in, its part written, a count out."""

    def __init__(self, export: str, out: str, refuse_ood: bool, coverage: float, identity: ModelIdentity):
        # One thread and one interpreter per actor: Ray gives each actor a core.
        self.predictor = LitePredictor.load(export, threads=1, identity=identity)
        self.out, self.refuse_ood, self.coverage = Path(out), refuse_ood, coverage

    def __call__(self, batch: dict) -> dict:
        files = [str(f) for f in batch["file"]]
        table, records = score_table(self.predictor, files, self.refuse_ood, self.coverage)
        write_part(self.out, files, table, records)
        return {"errors": np.array([unreadable(table)])}


def unreadable(table) -> int:
    return table.num_rows - table.column("error").null_count


def write_combined_csv(out: Path) -> Path:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    parts = [pq.read_table(part) for part in sorted(out.glob(PART_GLOB))]
    path = out / CSV_FILE
    with atomic_path(path) as temporary:
        pacsv.write_csv(pa.concat_tables(parts) if parts else pa.table({"file": pa.array([], pa.string())}), temporary)
    return path
