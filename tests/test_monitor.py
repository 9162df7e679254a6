"""`lungxray monitor`: windows by count and by time; drift that stays quiet on windows drawn like the
reference and alarms on a shifted one, naming the feature that moved; the label-free estimate against
the truth on calibrated probabilities; realised metrics as computed by hand; the command's files and
exit codes on a real run's records."""

import collections
import csv
import hashlib
import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import stats

from lungxray.cli import main
from lungxray.errors import ConfigError, DataError
from lungxray.infer.batch import PART_GLOB, score
from lungxray.monitor.drift import DriftScorer, kolmogorov_smirnov
from lungxray.monitor.monitoring import Alarms, monitor as monitor_records, windows_of
from lungxray.monitor.performance import realised, window_summary
from lungxray.monitor.records import reference_of

CLASSES = ["covid", "normal", "pneumonia"]


def synthetic_records(n: int, rng: np.random.Generator, brightness: float = 120.0, start: datetime | None = None) -> list[dict]:
    """Records of a calibrated model: probabilities from a Dirichlet, image statistics around `brightness`."""
    start = start or datetime(2026, 12, 1, tzinfo=timezone.utc)
    records = []
    for i in range(n):
        p = rng.dirichlet([0.6, 0.6, 0.6])
        mean = rng.normal(brightness, 12)
        records.append({"time": (start + timedelta(minutes=i)).isoformat(), "decision": CLASSES[int(p.argmax())],
                        **{f"p_{c}": float(v) for c, v in zip(CLASSES, p)}, "set_size": int((p > 0.2).sum()),
                        "ood_score": float(rng.gamma(2, 0.1)), "ood": False, "image_mean": mean,
                        "image_std": float(rng.normal(50, 5)), "image_p50": mean + float(rng.normal(0, 3)),
                        "sha256": f"{i:064x}"})
    return records


def test_windows_by_count_and_by_time():
    records = synthetic_records(250, np.random.default_rng(0))
    assert [len(w) for w in windows_of(iter(records), "100")] == [100, 100, 50]
    assert [len(w) for w in windows_of(iter(records), "1h")] == [60, 60, 60, 60]  # the last 10 minutes: too few
    for bad in ("10", "1w", "abc"):
        with pytest.raises(ConfigError):
            windows_of(records, bad)


def test_drift_is_quiet_on_the_references_likeness_and_alarms_on_a_shift():
    rng = np.random.default_rng(1)
    scorer = DriftScorer(synthetic_records(2000, rng), CLASSES)
    quiet = [scorer.score(synthetic_records(100, rng)) for _ in range(20)]
    assert sum(window["alarm"] for window in quiet) <= 1
    shifted = scorer.score(synthetic_records(100, rng, brightness=132.0))  # one spread brighter: a new scanner
    assert shifted["alarm"]
    moved = max(shifted["features"].items(), key=lambda item: item[1]["score"])[0]
    assert moved in ("image_mean", "image_p50") and shifted["features"]["image_mean"]["p_value"] < 0.001


def test_a_window_alarms_when_the_gate_flags_more_films_than_the_reference_allows():
    rng = np.random.default_rng(4)
    reference = synthetic_records(2000, rng)
    for index, record in enumerate(reference):
        record["ood"] = index % 100 == 0  # the gate's 1% on the validation films
    alarms = Alarms(reference, CLASSES)

    def window(flagged: int) -> dict:
        records = synthetic_records(100, rng)
        for index, record in enumerate(records):
            record["ood"] = index < flagged
        return {**window_summary(records, CLASSES), "drift": {"alarm": False}}

    assert alarms.of(window(1)) == [] and alarms.of(window(3)) == []  # P(>= 3 | 1%) = 0.08
    assert alarms.of(window(20)) == ["out of distribution"]  # one film in five another kind of image


def test_a_silent_trials_records_can_be_the_reference(tmp_path):
    """A deployment whose films are brighter than the run's: every window alarms against the run's
    reference, and none against a silent trial recorded at the deployment itself."""
    rng = np.random.default_rng(5)
    run, trial, deployment = tmp_path / "run", tmp_path / "trial.jsonl", tmp_path / "deployment.jsonl"
    run.mkdir()
    (run / "model.keras").touch()  # what RunDir.open asks of a run folder
    (run / "reference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(2000, rng)))
    start = datetime(2026, 12, 2, tzinfo=timezone.utc)
    trial.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(2000, rng, 140.0)))
    deployment.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(600, rng, 140.0, start)))
    against_run = monitor_records([deployment], run, "100", out=tmp_path / "m-run")
    against_trial = monitor_records([deployment], run, "100", out=tmp_path / "m-trial", reference=[trial])
    assert all("drift" in w["alarms"] for w in against_run.windows)
    assert sum(bool(w["alarms"]) for w in against_trial.windows) <= 1
    assert json.loads((tmp_path / "m-trial" / "monitoring.json").read_text())["reference"]["n"] == 2000
    (tmp_path / "short.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(50, rng)))
    with pytest.raises(DataError, match="200 or more"):
        monitor_records([deployment], run, "100", out=tmp_path / "m-short", reference=[tmp_path / "short.jsonl"])


@pytest.mark.parametrize("shift", [0.0, 0.1, 0.3])
def test_the_drift_tests_kolmogorov_smirnov_is_scipys(shift):
    rng = np.random.default_rng(3)
    window, reference = rng.normal(shift, 1, 500), rng.normal(0, 1, 3000)
    d, p = kolmogorov_smirnov(window, reference)
    scipys = stats.ks_2samp(window, reference, method="asymp")
    assert d == pytest.approx(scipys.statistic, abs=1e-12) and p == pytest.approx(scipys.pvalue, rel=0.15, abs=1e-6)


def test_the_estimate_follows_the_truth_of_a_calibrated_model():
    rng = np.random.default_rng(2)
    records = synthetic_records(2000, rng)
    labels = {r["sha256"]: CLASSES[rng.choice(3, p=[r[f"p_{c}"] for c in CLASSES])] for r in records}
    summary, truth = window_summary(records, CLASSES), realised(records, CLASSES, labels)
    assert abs(summary["estimated"]["accuracy"] - truth["accuracy"]) <= 0.03
    assert truth["estimate_error"] == pytest.approx(summary["estimated"]["accuracy"] - truth["accuracy"], abs=1e-4)
    top = [max(CLASSES, key=lambda c: r[f"p_{c}"]) for r in records]
    assert truth["accuracy"] == pytest.approx(np.mean([t == labels[r["sha256"]] for t, r in zip(top, records)]), abs=1e-4)
    low, high = truth["accuracy_ci95"]
    assert low < truth["accuracy"] < high and high - low < 0.05
    for c in CLASSES:
        estimated, real = summary["estimated"]["sensitivity"][c], truth["sensitivity"][c]["value"]
        assert abs(estimated - real) <= 0.05, c


def inverted_copy(folders: list[Path], out: Path) -> Path:
    """The folders' films, inverted: another kind of picture than the model was fitted on."""
    for folder in folders:
        for path in folder.rglob("*.png"):
            target = out / folder.name / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(255 - np.asarray(Image.open(path))).save(target)
    return out


def test_the_command_reports_and_exits_3_on_a_shift(run, export, tmp_path):
    run_dir, data, _ = run
    folders = [data / "test", data / "train"]  # 48 films like the run's own
    score(export, folders, tmp_path / "like")
    score(export, [inverted_copy(folders, tmp_path / "inverted")], tmp_path / "shifted")
    reads = tmp_path / "reads.csv"
    with open(reads, "w", newline="") as handle:
        csv.writer(handle).writerows([["sha256", "label"]] + [[hashlib.sha256(path.read_bytes()).hexdigest(),
                                                               path.parent.name]
                                                              for folder in folders for path in folder.rglob("*.png")])
    like_code = main(["monitor", str(tmp_path / "like"), str(tmp_path / "like"), "--model", str(run_dir), "--window",
                      "48", "--labels", str(reads), "--out", str(tmp_path / "m-like")])  # named twice: read once
    assert main(["monitor", str(tmp_path / "shifted"), "--model", str(run_dir), "--window", "48",
                 "--out", str(tmp_path / "m-shifted")]) == 3
    (like,) = json.loads((tmp_path / "m-like" / "monitoring.json").read_text())["windows"]
    (shifted,) = json.loads((tmp_path / "m-shifted" / "monitoring.json").read_text())["windows"]
    assert like_code == (3 if like["alarms"] else 0) and like["n"] == shifted["n"] == 48
    assert "drift" in shifted["alarms"] and shifted["drift"]["combined"] > like["drift"]["combined"]
    assert shifted["drift"]["features"]["image_mean"]["p_value"] < 0.001
    table = pa.concat_tables([pq.read_table(part) for part in sorted((tmp_path / "like").glob(PART_GLOB))])
    probabilities = np.stack([table.column(f"p_{c}").to_numpy() for c in CLASSES], axis=1)
    truth = [Path(file).parent.name for file in table.column("file").to_pylist()]
    by_hand = np.mean([CLASSES[int(row.argmax())] == label for row, label in zip(probabilities, truth)])
    assert like["realised"]["n"] == 48 and like["realised"]["accuracy"] == pytest.approx(by_hand, abs=1e-4)
    assert (tmp_path / "m-shifted" / "report.html").read_text().count("<img") == 3


def test_serve_shows_the_latest_windows_drift_as_gauges(run, tmp_path):
    from tests.servers import lungxray_serve

    run_dir, data, _ = run
    films = sorted((data / "test").rglob("*.png")) + sorted((data / "train").rglob("*.png"))
    with lungxray_serve(run_dir, "--monitor-window", "30", "--audit-log", "off") as (url, _, _):
        import httpx

        for film in films[:30]:
            assert httpx.post(f"{url}/api/predict", files={"file": (film.name, film.read_bytes(), "image/png")},
                              timeout=30).status_code == 200
        deadline = time.monotonic() + 60
        while "lungxray_monitor_windows 1.0" not in (scraped := httpx.get(f"{url}/metrics").text):
            assert time.monotonic() < deadline, scraped[-2000:]
            time.sleep(0.2)
    gauges = {line.split(" ")[0]: float(line.split(" ")[1]) for line in scraped.splitlines()
              if line.startswith("lungxray_monitor_") and "{" not in line}
    assert {"lungxray_monitor_drift_score", "lungxray_monitor_drift_threshold", "lungxray_monitor_alarm",
            "lungxray_monitor_estimated_accuracy"} <= set(gauges)
    assert 0 <= gauges["lungxray_monitor_estimated_accuracy"] <= 1 and gauges["lungxray_monitor_alarm"] in (0, 1)
    assert 'lungxray_monitor_feature_score{feature="image_mean",group="image"}' in scraped


def test_serve_workers_show_the_windows_of_every_worker(run, export, tmp_path):
    """`serve --workers 2 --monitor-window 30`: each worker scores windows of its own answers, and a
    scrape, whichever worker takes it, counts the windows of both (one worker's collector alone would
    show only its own)."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from tests.servers import lungxray_serve

    run_dir, data, _ = run
    shutil.copytree(run_dir, tmp_path / "run")  # the export served beside its run's reference
    shutil.copytree(export.parent, tmp_path / "run" / "export")
    films = [(film.name, film.read_bytes()) for film in sorted((data / "test").rglob("*.png"))]
    audit = tmp_path / "audit.jsonl"

    def answered_by_worker() -> dict:
        lines = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
        return collections.Counter(line["worker"] for line in lines
                                   if line["path"] == "/api/predict" and line["status"] == 200)

    def predict(index: int) -> int:  # a connection of its own, which either worker may take
        name, content = films[index % len(films)]
        return httpx.post(f"{url}/api/predict", files={"file": (name, content, "image/png")},
                          headers={"Connection": "close"}, timeout=30).status_code

    with lungxray_serve(tmp_path / "run" / "export" / "model.tflite", "--workers", "2", "--monitor-window", "30",
                        "--audit-log", str(audit)) as (url, _, _):
        sent = 0
        with ThreadPoolExecutor(4) as pool:
            while len(counts := answered_by_worker()) < 2 or min(counts.values()) < 30:
                assert sent < 600, f"one worker took nearly every film: {counts}"
                assert set(pool.map(predict, range(sent, sent + 20))) == {200}
                sent += 20
        deadline = time.monotonic() + 30
        while sum((counts := answered_by_worker()).values()) < sent:  # a request is audited after its answer
            assert time.monotonic() < deadline, (sent, counts)
            time.sleep(0.1)
        expected = sum(count // 30 for count in counts.values())
        deadline = time.monotonic() + 60
        while f"lungxray_monitor_windows {expected:.1f}" not in (scraped := httpx.get(f"{url}/metrics").text):
            assert time.monotonic() < deadline, (expected, counts, [line for line in scraped.splitlines()
                                                                     if "monitor_windows" in line])
            time.sleep(0.2)
    assert expected >= 2 and "lungxray_monitor_drift_score " in scraped
    assert 'lungxray_monitor_feature_score{feature="image_mean",group="image"}' in scraped


def test_monitoring_a_server_needs_its_runs_reference(export, tmp_path):
    with pytest.raises(ConfigError, match="monitoring reference"):
        reference_of(export)
