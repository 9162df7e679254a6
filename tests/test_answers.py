"""The answer is one record and the withhold rule exists once: the command line's CSV and JSON,
`predict --out`'s Parquet, the API (one film and a batch) and its audit lines give the same
rows for the same films, a flagged one (withheld) and an unreadable one (not analysed) included."""

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from lungxray.cli import main
from lungxray.infer.answer import NOT_ANALYSED, WITHHELD, answer_files
from lungxray.infer.lite_predictor import LitePredictor, sidecar_paths
from lungxray.infer.outputs import answer_json, columns
from lungxray.model.ood import OutOfDistribution
from lungxray.serve import create_app

CLASSES = ["covid", "normal", "pneumonia"]
# What each output is compared on; `time` differs by design, and the file is compared by its name.
COMPARED = ["sha256", "decision", "predicted", *(f"p_{c}" for c in CLASSES), "set", "ood_score", "ood", "model"]


@pytest.fixture(scope="module")
def flagging_export(run, export, tmp_path_factory):
    """The shared export, its gate's threshold set between the films' scores so that exactly one
    of three films is flagged; and the films, with an unreadable file last."""
    _, data, _ = run
    folder = tmp_path_factory.mktemp("answers")
    copy = folder / export.name
    for source, target in zip((export, *sidecar_paths(export)), (copy, *sidecar_paths(copy))):
        shutil.copy(source, target)
    films = [str(p) for p in sorted((data / "test").rglob("*.png"))[:3]]
    (folder / "broken.png").write_bytes(b"not an image")
    scores = LitePredictor.load(copy).predict_files(films).ood_score
    gate = OutOfDistribution.load(sidecar_paths(copy)[1])
    gate.threshold = float(np.sort(scores)[-2] + np.sort(scores)[-1]) / 2  # the highest-scoring film is flagged
    gate.save(sidecar_paths(copy)[1])
    return copy, [*films, str(folder / "broken.png")]


def canonical(row: dict) -> tuple:
    """A row of any output in the compared columns: numbers as floats, empty as None."""
    def value(name):
        got = row.get(name)
        if got in ("", None):
            return None
        if name == "ood":
            return bool(int(got)) if isinstance(got, str) else bool(got)
        return float(got) if name.startswith("p_") or name == "ood_score" else got
    return tuple(value(name) for name in COMPARED)


def from_json(answer: dict) -> dict:
    """The JSON shape's fields under the flat columns' names."""
    shown = {**answer, **{f"p_{c}": (answer.get("probabilities") or {}).get(c) for c in CLASSES}}
    shown["set"] = "|".join(answer["set"]) if answer.get("set") else None
    if "ood" in answer:
        shown.update(ood=answer["ood"]["flag"], ood_score=answer["ood"]["score"])
    return shown


def test_every_output_gives_the_same_rows(flagging_export, tmp_path, capsys):
    export, films = flagging_export
    expected = [canonical(r) for r in csv.DictReader(io.StringIO(cli(export, films, "csv", capsys)))]
    decisions = [row[1] for row in expected]
    assert decisions.count(WITHHELD) == 1 and decisions[-1] == NOT_ANALYSED, decisions
    withheld = expected[decisions.index(WITHHELD)]
    assert withheld[2] is None and all(p is None for p in withheld[3:6]) and withheld[6] is None  # nothing shown
    assert withheld[7] is not None and withheld[8] is True  # the gate's score and flag are

    as_json = [canonical(from_json(a)) for a in json.loads(cli(export, films, "json", capsys))]
    assert main(["predict", "--model", str(export), "--refuse-ood", "--out", str(tmp_path / "parts"), *films]) == 0
    (part,) = (tmp_path / "parts").glob("part-*.parquet")
    table = pq.read_table(part)
    assert table.column_names == columns(CLASSES)
    as_parquet = [canonical(r) for r in table.to_pylist()]
    in_process = [canonical(from_json(answer_json(a)))
                  for a in answer_files(LitePredictor.load(export), films, refuse_ood=True)]
    assert as_json == expected and as_parquet == expected and in_process == expected

    audit = tmp_path / "audit.jsonl"
    client = TestClient(create_app(LitePredictor.load(export), refuse_ood=True, audit_log=audit))
    readable = [f for f in films if not f.endswith("broken.png")]
    one = [client.post("/api/predict", files={"file": (Path(f).name, Path(f).read_bytes(), "image/png")}).json()
           for f in readable]
    batch = client.post("/api/predict/batch", files=[("files", (Path(f).name, Path(f).read_bytes(), "image/png"))
                                                     for f in films]).json()["results"]
    assert [canonical(from_json(a)) for a in one] == expected[:-1]
    assert [canonical(from_json(a)) for a in batch[:-1]] == expected[:-1]
    assert "not a recognised image format" in batch[-1]["error"]
    logged = [image for line in audit.read_text().splitlines() for image in json.loads(line).get("images", [])]
    assert [(i["sha256"], i["decision"], i["ood"]) for i in logged[:len(readable)]] == \
        [(row[0], row[1], row[8]) for row in expected[:-1]]


def cli(export: Path, films: list[str], fmt: str, capsys) -> str:
    capsys.readouterr()
    assert main(["predict", "--model", str(export), "--refuse-ood", "--format", fmt, *films]) == 0
    return capsys.readouterr().out


def test_every_runtime_is_a_predictor(run, flagging_export):
    from lungxray.infer.keras_predictor import KerasPredictor
    from lungxray.infer.predictor import Predictor

    run_dir, _, cache = run
    keras_side, lite_side = KerasPredictor.load(run_dir, cache_dir=cache), LitePredictor.load(flagging_export[0])
    assert isinstance(keras_side, Predictor) and isinstance(lite_side, Predictor)
    assert keras_side.can_explain and not lite_side.can_explain
    assert keras_side.identity.fingerprint != lite_side.identity.fingerprint  # a run's model.keras, an export's file


def test_an_unreadable_file_is_not_analysed_however_its_path_is_spelt():
    """The Keras runtime names errors by normalised path, LiteRT by the path as given."""
    from lungxray.errors import ImageError
    from lungxray.infer.answer import answers_for
    from lungxray.infer.identity import ModelIdentity
    from lungxray.infer.predictions import Predictions

    class TwoClasses:
        classes, conformal, ood, identity = ["a", "b"], None, None, ModelIdentity("m", "1", "ab" * 32)

    rows = np.array([[0.2, 0.8], [np.nan, np.nan]])
    predictions = Predictions(rows, rows, np.zeros((2, 3)), None, None, [ImageError("bad.png", "broken")], ["h", None])
    good, bad = answers_for(TwoClasses(), predictions, ["./good.png", "./bad.png"])
    assert (good.decision, good.sha256) == ("b", "h")
    assert (bad.decision, bad.reason, bad.file, bad.probabilities) == (NOT_ANALYSED, "broken", "./bad.png", None)
