"""Training killed (SIGKILL) at several points: the run folder holds only whole artefacts, a model
file never comes without what goes with it, and `--resume` ends with the same model as a run that
was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lungxray import KerasPredictor
from lungxray.cli import main
from lungxray.errors import DataError
from lungxray.rundir import RunDir
from tests.conftest import TINY

TRAIN = ["train", "--weights", "none", "--image-size", str(TINY), "--epochs", "6", "--batch-size", "8",
         "--dense-units", "16", "--feature-runtime", "keras"]
CHILD = "import sys\nfrom lungxray.cli import main\nsys.exit(main(sys.argv[1:]))"


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(process: subprocess.Popen, path, timeout: float = 120.0) -> bool:
    """SIGKILL `process` as soon as `path` exists; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists():
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.005)
    process.kill()
    process.wait()
    return False


def check_whole(run) -> None:
    """Every JSON parses, no temporary file is visible to readers, a model loads with its sidecar."""
    for path in run.rglob("*.json"):
        json.loads(path.read_text())
    if (run / "model.keras").exists():
        assert (run / "model.json").exists() and (run / "ood.npz").exists()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from tests.conftest import write_class_folders

    root = tmp_path_factory.mktemp("crash")
    data = write_class_folders(root / "data", per_class=8, splits=["train", "val", "test"])
    assert main([*TRAIN, "--data", str(data), "--out", str(root / "clean"), "--cache", str(root / "cache")]) == 0
    images = sorted(data.rglob("*.png"))
    expected = KerasPredictor.load(root / "clean", runtime="keras", cache_dir=root / "cache").predict_files(images)
    return data, root / "cache", root / "clean", images, expected.probabilities


@pytest.mark.parametrize("kill_at", ["config.json", "checkpoints/head.weights.h5", "history.csv", "ood.npz",
                                     "model.json"])
def test_killed_run_resumes_to_the_same_model(uninterrupted, tmp_path, kill_at):
    data, cache, _, images, expected = uninterrupted
    run = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(run), "--cache", str(cache)]
    assert kill_when(start([*TRAIN, *argv]), run / kill_at), f"training ended before {kill_at} appeared"
    check_whole(run)
    if (run / "model.keras").exists():  # the kill came after the model was saved: it must load as it is
        KerasPredictor.load(run, runtime="keras", cache_dir=cache)
        return
    assert main([*TRAIN, *argv]) == 2  # an interrupted run is not silently overwritten
    assert main(["train", "--resume", *argv]) == 0
    assert not list(run.rglob(".tmp-*"))
    resumed = KerasPredictor.load(run, runtime="keras", cache_dir=cache).predict_files(images).probabilities
    np.testing.assert_allclose(resumed, expected, atol=1e-6)


def test_resume_refuses_what_it_cannot_continue(uninterrupted, tmp_path):
    data, _, clean, _, _ = uninterrupted
    with pytest.raises(DataError, match="already holds a trained model"):
        RunDir.create(clean, resume=True)
    with pytest.raises(DataError, match="holds no run to resume"):
        RunDir.create(tmp_path / "empty", resume=True)
    assert main(["train", "--resume", "--data", str(data), "--out", str(tmp_path / "x"), "--epochs", "3"]) == 2
