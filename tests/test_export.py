"""`lungxray export`: one LiteRT or ONNX file (or a SavedModel folder) with its sidecar and gate,
checked against Keras at export, prediction from it in a process where TensorFlow cannot be
imported, and `--runtime` choosing an export for a run folder."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lungxray import KerasPredictor
from lungxray.cli import main
from lungxray.errors import WeightsError
from lungxray.infer.export import FLOAT_TOLERANCE, export_model
from lungxray.infer.loader import load_predictor
from lungxray.infer.lite_predictor import LitePredictor, sidecar_paths

# Importing TensorFlow or Keras fails in this child, as in an install without them.
WITHOUT_TENSORFLOW = """
import sys
for name in ("tensorflow", "keras", "tf_keras"):
    sys.modules[name] = None
from lungxray.cli import main
code = main(sys.argv[1:])
assert not any(m.startswith(("tensorflow", "keras")) for m in sys.modules if sys.modules[m] is not None)
sys.exit(code)
"""


@pytest.fixture(scope="module", params=["litert", "onnx"])
def exported(run, tmp_path_factory, request):
    run_dir, _, cache = run
    suffix = {"litert": ".tflite", "onnx": ".onnx"}[request.param]
    return export_model(run_dir, tmp_path_factory.mktemp("export") / f"model{suffix}", cache_dir=cache,
                        fmt=request.param)


def test_export_writes_the_model_its_sidecar_and_gate_and_checks_them(exported):
    info_path, gate_path = sidecar_paths(exported.path)
    assert exported.path.is_file() and gate_path.is_file() and info_path.name == exported.path.name + ".json"
    info = json.loads(info_path.read_text())
    assert info["format"] == {".tflite": "litert", ".onnx": "onnx"}[exported.path.suffix]
    assert info["classes"] == ["covid", "normal", "pneumonia"] and info["input"]["size"] == 32
    assert info["parity"]["images"] == 24 and info["parity"]["label_agreement"] == 1.0
    assert info["parity"]["max_abs_difference"] <= FLOAT_TOLERANCE and info["training_data_fingerprint"]


def test_exported_predictions_match_keras(run, exported):
    run_dir, data, cache = run
    files = sorted(data.rglob("*.png"))
    keras_side = KerasPredictor.load(run_dir, runtime="keras", cache_dir=cache).predict_files(files)
    lite_side = LitePredictor.load(exported.path).predict_files(files)
    np.testing.assert_allclose(lite_side.probabilities, keras_side.probabilities, atol=FLOAT_TOLERANCE)
    np.testing.assert_allclose(lite_side.ood_score, keras_side.ood_score, rtol=1e-3)
    assert np.array_equal(lite_side.ood, keras_side.ood)


def test_predict_from_an_export_without_tensorflow(run, exported, tmp_path):
    _, data, _ = run
    images = sorted((data / "test" / "covid").iterdir())[:3]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW, "predict", "--model", str(exported.path),
                             "--format", "json", *map(str, images), str(tmp_path / "broken.png")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout)
    assert all(r["predicted"] in {"covid", "normal", "pneumonia"} and "ood" in r for r in rows[:3])
    assert "not a recognised image format" in rows[3]["error"]


def test_export_cli_and_what_it_refuses(run, tmp_path, capsys):
    run_dir, _, cache = run
    out = tmp_path / "cli" / "model.tflite"
    assert main(["export", "--model", str(run_dir), "--out", str(out), "--cache", str(cache), "--sample", "6"]) == 0
    assert "checked on 6 images" in capsys.readouterr().out
    assert main(["predict", "--model", str(out), "--explain", str(tmp_path / "x"), str(out)]) == 2
    assert "needs the Keras model" in capsys.readouterr().err
    with pytest.raises(WeightsError, match="not an exported model"):
        LitePredictor.load(run_dir / "model.keras")


def test_serve_from_an_export(run, exported):
    from fastapi.testclient import TestClient

    from lungxray.serve import create_app

    _, data, _ = run
    client = TestClient(create_app(LitePredictor.load(exported.path)))
    image = sorted((data / "test" / "normal").iterdir())[0].read_bytes()
    answer = client.post("/api/predict?explain=true", files={"file": ("x.png", image, "image/png")}).json()
    assert answer["predicted"] in {"covid", "normal", "pneumonia"} and "ood" in answer
    assert answer["image"].startswith("data:image/png") and "gradcam" not in answer
    assert len(client.get("/api/model").json()["sha256"]) == 64


SERVE_WITHOUT_TENSORFLOW = """
import sys
for name in ("tensorflow", "keras", "tf_keras"):
    sys.modules[name] = None
from fastapi.testclient import TestClient
from lungxray.infer.lite_predictor import LitePredictor, sidecar_paths
from lungxray.serve import create_app
client = TestClient(create_app(LitePredictor.load(sys.argv[1])))
response = client.post("/api/predict", files={"file": ("x.png", open(sys.argv[2], "rb").read(), "image/png")})
assert response.status_code == 200, response.text
print(response.json()["predicted"])
"""


def test_serve_an_export_without_tensorflow(run, exported):
    image = sorted((run[1] / "test" / "covid").iterdir())[0]
    result = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_TENSORFLOW, str(exported.path), str(image)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() in {"covid", "normal", "pneumonia"}, result.stderr[-3000:]


@pytest.mark.parametrize("name", ["model.tflite", "model.savedmodel"])
def test_a_failed_export_leaves_nothing(run, tmp_path, monkeypatch, name):
    import lungxray.infer.export as export

    run_dir, _, cache = run
    monkeypatch.setattr(export, "FLOAT_TOLERANCE", -1.0)  # no export can pass
    out = tmp_path / name
    with pytest.raises(WeightsError, match="nothing was written"):
        export_model(run_dir, out, cache_dir=cache, sample_size=4, fmt="savedmodel" if name.endswith("savedmodel") else "litert")
    assert not list(tmp_path.iterdir())


def test_savedmodel_export_matches_keras(run, tmp_path):
    run_dir, data, cache = run
    result = export_model(run_dir, tmp_path / "model.savedmodel", cache_dir=cache, fmt="savedmodel", sample_size=8)
    assert (result.path / "saved_model.pb").is_file() and result.parity["label_agreement"] == 1.0
    info_path, gate_path = sidecar_paths(result.path)
    assert json.loads(info_path.read_text())["format"] == "savedmodel" and gate_path.is_file()
    files = sorted(data.rglob("*.png"))[:10]
    keras_side = KerasPredictor.load(run_dir, runtime="keras", cache_dir=cache).predict_files(files)
    np.testing.assert_allclose(LitePredictor.load(result.path).predict_files(files).probabilities,
                               keras_side.probabilities, atol=FLOAT_TOLERANCE)


def test_runtime_takes_the_runs_export_that_lungxray_export_made(run, tmp_path, capsys):
    """Loading never writes: --runtime litert on a run without a fresh export says which command
    makes it; after `lungxray export`, it runs that export, until the model is newer again."""
    run_dir, data, cache = run
    copy = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("export"))
    images = [str(p) for p in sorted((data / "test").rglob("*.png"))[:4]]

    def predicted(runtime: str) -> list[dict]:
        assert main(["predict", "--model", str(copy), "--runtime", runtime, "--format", "json",
                     "--cache", str(cache), *images]) == 0
        return json.loads(capsys.readouterr().out)

    keras_rows = predicted("keras")
    exported = copy / "export" / "model.tflite"
    assert main(["predict", "--model", str(copy), "--runtime", "litert", *images]) == 2
    assert "lungxray export --model" in capsys.readouterr().err and not exported.exists()
    assert main(["export", "--model", str(copy), "--cache", str(cache), "--sample", "8"]) == 0
    capsys.readouterr()
    lite_rows = predicted("litert")
    assert exported.is_file() and (copy / "export" / "model.tflite.json").is_file()
    for keras_row, lite_row in zip(keras_rows, lite_rows):
        assert lite_row["predicted"] == keras_row["predicted"] and lite_row["model"] == keras_row["model"]
        assert all(abs(lite_row["probabilities"][c] - keras_row["probabilities"][c]) <= FLOAT_TOLERANCE
                   for c in ("covid", "normal", "pneumonia"))
    made = exported.stat().st_mtime_ns
    predicted("litert")
    assert exported.stat().st_mtime_ns == made  # reused, not exported again
    os.utime(copy / "model.keras", ns=(made + 10**9, made + 10**9))  # a newer model: the export is stale
    assert main(["predict", "--model", str(copy), "--runtime", "litert", *images]) == 2
    assert "is older than its model" in capsys.readouterr().err and exported.stat().st_mtime_ns == made
    assert main(["predict", "--model", str(exported), "--runtime", "onnx", *images]) == 2
    assert "runs in its own runtime" in capsys.readouterr().err


# In a child where TensorFlow cannot be imported: predict from an export and build its server, then
# print the distributions whose modules were imported.
IMPORTED_DISTRIBUTIONS = "import sys; startup = set(sys.modules)\n" + WITHOUT_TENSORFLOW.split("code = main")[0] + """
import importlib.metadata, json
code = main(sys.argv[2:])
from lungxray.infer.lite_predictor import LitePredictor
from lungxray.serve import create_app
import uvicorn
create_app(LitePredictor.load(sys.argv[1]))
owners = importlib.metadata.packages_distributions()
tops = {name.split(".")[0] for name, module in list(sys.modules.items()) if module is not None and name not in startup}
print(json.dumps(sorted({owner for top in tops for owner in owners.get(top, [])})))
sys.exit(code)
"""


def base_install() -> set[str]:
    """lungxray's distributions without extras, and everything they require, transitively."""
    from importlib.metadata import PackageNotFoundError, requires
    from packaging.requirements import Requirement

    def canonical(name: str) -> str:
        return name.lower().replace("_", "-")

    found, todo = set(), ["lungxray"]
    while todo:
        name = todo.pop()
        if canonical(name) in found:
            continue
        found.add(canonical(name))
        try:
            requirements = [Requirement(text) for text in requires(name) or []]
        except PackageNotFoundError:  # an optional requirement of some package, not installed here
            continue
        todo += [r.name for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    return found


def test_an_export_needs_only_the_base_install(run, exported):
    image = sorted((run[1] / "test" / "covid").iterdir())[0]
    result = subprocess.run([sys.executable, "-c", IMPORTED_DISTRIBUTIONS, str(exported.path), "predict", "--model",
                             str(exported.path), str(image)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {name.lower().replace("_", "-") for name in json.loads(result.stdout.splitlines()[-1])}
    extra = "onnxruntime" if exported.path.suffix == ".onnx" else None  # the [onnx] extra's runtime
    # Imported when they happen to be installed, and not required: sniffio by anyio, watchfiles by
    # uvicorn (installed with Flower's uvicorn[standard], `lungxray[federated]`).
    optional = {"sniffio", "watchfiles"}
    assert imported - base_install() - {extra} - optional == set()
    assert {"tensorflow", "keras", "scikit-learn", "matplotlib", "scipy"}.isdisjoint(base_install())


def test_the_base_install_says_what_training_needs(tmp_path):
    result = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW, "train", "--data", str(tmp_path),
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "pip install 'lungxray[full]'" in result.stderr and "Traceback" not in result.stderr


def test_load_predictor_opens_an_export_with_or_without_tensorflow(run, exported):
    image = sorted((run[1] / "test" / "covid").iterdir())[0]
    assert isinstance(load_predictor(exported.path), LitePredictor)
    code = WITHOUT_TENSORFLOW.split("from lungxray.cli")[0] + """
import lungxray
predictor = lungxray.load_predictor(sys.argv[1])
print(type(predictor).__name__, predictor.predict_files([sys.argv[2]]).probabilities.shape)
"""
    result = subprocess.run([sys.executable, "-c", code, str(exported.path), str(image)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["LitePredictor", "(1,", "3)"]
