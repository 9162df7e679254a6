import contextlib
import csv
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungxray.config import CONVERSIONS_ENV, environment_path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED = Path(__file__).resolve().parents[2] / "shared"
# The README exports LUNGXRAY_DATA=../shared/cxr; resolved here, once, from where the tests start.
CXR = environment_path("LUNGXRAY_DATA") or SHARED / "cxr"
WEIGHTS = SHARED / "weights" / "mobilenet_v3_small_imagenet_tv_no_top.weights.h5"
CLASSES = ("covid", "normal", "pneumonia")
TINY = 32  # the smallest input MobileNetV3Small accepts: keeps unit tests fast
# The files that take longest (2026-12-06, AMD EPYC: 257 s alone, and about 240, 234 and 95 s), which `make test`
# hands to its workers first: under --dist loadfile a long file begun last keeps one worker busy while
# the other waits (longest first is the classic way to share jobs among machines).
LONGEST_FIRST = ("test_federation_deployment.py", "test_federated.py", "test_train.py", "test_crash.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
               else len(LONGEST_FIRST))


def synthetic_image(label_index: int, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """A grey image whose bright blob sits left, centre or right by class, plus noise."""
    image = rng.integers(0, 60, (size, size), dtype=np.uint8)
    centre = int(size * (0.2 + 0.3 * label_index))
    image[size // 3: 2 * size // 3, max(0, centre - 4): centre + 4] = 230
    return image


def write_class_folders(root: Path, per_class: int, seed: int = 0, splits=None) -> Path:
    rng = np.random.default_rng(seed)
    for split in splits or [None]:
        for index, name in enumerate(CLASSES):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(synthetic_image(index, rng)).save(folder / f"{name}_{i}.png")
    return root


@pytest.fixture(scope="session", autouse=True)
def shared_conversions(tmp_path_factory):
    """Models converted to LiteRT (and ONNX) once a session, for every test's cache, every child process
    and every pytest-xdist worker (a conversion is a function of the model alone and takes ~10 s; the
    parity tests still convert). Workers share the folder above their own temporary folders."""
    before = os.environ.get(CONVERSIONS_ENV)
    shared = os.environ.get("PYTEST_XDIST_WORKER") and tmp_path_factory.getbasetemp().parent / "conversions"
    os.environ[CONVERSIONS_ENV] = str(shared or tmp_path_factory.mktemp("conversions"))
    yield
    if before is None:
        del os.environ[CONVERSIONS_ENV]
    else:
        os.environ[CONVERSIONS_ENV] = before


@pytest.fixture
def ray_lock(tmp_path_factory):
    """`with ray_lock():` around the part of a test that starts a local Ray instance or needs none
    running: Ray does not support two local instances on one machine, and the suite runs in parallel
    workers (`make test`), which share the folder above their own temporary folders."""
    import fcntl

    @contextlib.contextmanager
    def held():
        with open(tmp_path_factory.getbasetemp().parent / "ray.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    return held


@pytest.fixture
def ray_alone(ray_lock):
    """`ray_lock` held for a whole test."""
    with ray_lock():
        yield


@pytest.fixture
def class_folders(tmp_path) -> Path:
    return write_class_folders(tmp_path / "classes", per_class=10)


@pytest.fixture
def split_folders(tmp_path) -> Path:
    return write_class_folders(tmp_path / "dataset", per_class=6, splits=["train", "val", "test"])


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """One tiny trained run for the tests of what a trained model does (serve, export, batch scoring,
    the page, hostile input, overload), trained once a session: (run folder, data, cache). Tests copy
    it before changing it."""
    from lungxray import Config, train

    root = tmp_path_factory.mktemp("serve")
    data = write_class_folders(root / "data", per_class=8, splits=["train", "val", "test"])
    config = Config(weights="none", image_size=TINY, epochs=2, batch_size=8, dense_units=16)
    result = train(data, root / "run", config, cache_dir=root / "cache")
    return result.run_dir, data, root / "cache"


@pytest.fixture(scope="session")
def export(run, tmp_path_factory) -> Path:
    """The shared run exported to LiteRT (checked on 8 images), for what runs without TensorFlow."""
    from lungxray.infer.export import export_model

    run_dir, _, cache = run
    return export_model(run_dir, tmp_path_factory.mktemp("export") / "model.tflite", cache_dir=cache, sample_size=8).path


@pytest.fixture(scope="module")
def client(run):
    """FastAPI's test client on the shared run, uploads limited to 1 MB."""
    from fastapi.testclient import TestClient

    from lungxray import KerasPredictor, RunDir
    from lungxray.serve import create_app

    run_dir, _, cache = run
    predictor = KerasPredictor.load(run_dir, cache_dir=cache)
    return TestClient(create_app(predictor, RunDir.open(run_dir), max_upload_mb=1))


def torchxrayvision_wheel() -> Path:
    """The torchxrayvision wheel `make test` downloads: its published label files (read without torch)
    and its own DenseNet (the conversion's reference)."""
    folder = Path(sys.prefix) / "published-labels"
    found = sorted(folder.glob("torchxrayvision-*.whl"))
    if not found:
        pytest.fail(f"the torchxrayvision wheel is not in {folder}: run make test, which downloads it, or "
                    f"pip download --no-deps torchxrayvision==1.5.7 -d {folder}")
    return found[-1]


def require_shared():
    if not CXR.is_dir() or not WEIGHTS.is_file():
        pytest.fail(f"integration tests need {CXR} and {WEIGHTS} (the project's ../shared folder)")


@pytest.fixture(scope="session")
def cxr_subset(tmp_path_factory) -> Path:
    """A manifest CSV of a small, class-balanced subset of ../shared/cxr with its extra columns."""
    require_shared()
    rows = list(csv.DictReader(open(CXR / "manifest.csv")))
    rng = random.Random(0)
    chosen = []
    for split, n in (("train", 80), ("val", 15), ("test", 15)):
        for label in CLASSES:
            pool = [r for r in rows if r["split"] == split and r["label"] == label]
            chosen += rng.sample(pool, n)
    path = tmp_path_factory.mktemp("cxr") / "subset.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "split", "source", "age_group"])
        writer.writerows([str(CXR / r["file"]), r["label"], r["split"], r["source"], r["age_group"]] for r in chosen)
    return path
