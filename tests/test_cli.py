import json

import pytest

from lungxray.cli import main
from tests.conftest import TINY


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from tests.conftest import write_class_folders

    root = tmp_path_factory.mktemp("cli")
    data = write_class_folders(root / "data", per_class=6, splits=["train", "val", "test"])
    cache = root / "cache"
    code = main(["train", "--data", str(data), "--out", str(root / "run"), "--weights", "none", "--epochs", "2",
                 "--batch-size", "8", "--image-size", str(TINY), "--cache", str(cache)])
    assert code == 0
    return root / "run", data, cache


def test_predict_json_with_an_unreadable_file(trained_run, capsys, tmp_path):
    run, data, cache = trained_run
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    good = sorted((data / "test" / "covid").iterdir())[:2]
    capsys.readouterr()
    assert main(["predict", "--model", str(run), "--cache", str(cache), "--format", "json", *map(str, good), str(bad)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in rows] == [*map(str, good), str(bad)]
    for row in rows[:2]:
        assert row["predicted"] in {"covid", "normal", "pneumonia"}
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-4
    assert "error" in rows[2] and "not a recognised image" in rows[2]["error"]


def test_predict_table_and_csv_on_a_folder(trained_run, capsys):
    run, data, cache = trained_run
    capsys.readouterr()
    main(["predict", "--model", str(run), "--cache", str(cache), "--format", "csv", str(data / "test")])
    lines = capsys.readouterr().out.strip().splitlines()
    header = "file,sha256,decision,predicted,p_covid,p_normal,p_pneumonia,set,ood_score,ood,error,model,time"
    assert lines[0] == header and len(lines) == 1 + 18  # the same columns as predict --out's Parquet
    assert all(set(line.split(",")[7].split("|")) <= {"covid", "normal", "pneumonia", ""} for line in lines[1:])
    main(["predict", "--model", str(run), "--cache", str(cache), str(data / "test" / "normal")])
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 6


def test_evaluate_class_folders_and_split(trained_run, tmp_path):
    run, data, cache = trained_run
    assert main(["evaluate", "--model", str(run), "--data", str(data / "val"), "--out", str(tmp_path / "a"),
                 "--cache", str(cache)]) == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["n"] == 18 and sum(map(sum, metrics["confusion_matrix"])) == 18
    assert main(["evaluate", "--model", str(run), "--data", str(data), "--split", "train", "--out", str(tmp_path / "b"),
                 "--cache", str(cache)]) == 0
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["data"]["split"] == "train"
    assert (tmp_path / "b" / "confusion_matrix_normalized.png").stat().st_size > 1000


@pytest.mark.parametrize("argv,message", [
    (["train", "--data", "/nonexistent/data", "--weights", "none"], "does not exist"),
    (["train", "--data", "{data}", "--weights", "/nonexistent/w.h5"], "weights file /nonexistent/w.h5 does not exist"),
    (["train", "--data", "{data}", "--epochs", "0"], "'epochs' must be an int in the range [1, inf). Got 0 instead."),
    (["evaluate", "--model", "/nonexistent/run", "--data", "{data}"], "no model at"),
])
def test_bad_input_gives_one_line_error(argv, message, capsys, trained_run, tmp_path):
    data = trained_run[1]
    argv = [a.format(data=data) for a in argv] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_file_that_is_not_a_model(tmp_path, capsys):
    fake = tmp_path / "model.keras"
    fake.write_text("hello")
    assert main(["predict", "--model", str(fake), str(fake)]) == 2
    assert "is not a loadable Keras model" in capsys.readouterr().err


def test_empty_class_folder_is_an_error(tmp_path, capsys):
    from tests.conftest import write_class_folders

    data = write_class_folders(tmp_path / "d", per_class=3)
    (data / "empty").mkdir()
    assert main(["train", "--data", str(data), "--weights", "none", "--out", str(tmp_path / "r")]) == 2
    assert "holds no images" in capsys.readouterr().err


@pytest.fixture
def flagging_run(trained_run, tmp_path):
    """A copy of the trained run whose out-of-distribution gate flags every image."""
    import shutil

    from lungxray.model.ood import OutOfDistribution

    run = tmp_path / "flagging"
    shutil.copytree(trained_run[0], run)
    gate = OutOfDistribution.load(run / "ood.npz")
    gate.threshold = -1.0
    gate.save(run / "ood.npz")
    return run


def test_every_output_format_shows_the_gate(trained_run, flagging_run, capsys):
    _, data, cache = trained_run
    image = str(sorted((data / "test" / "covid").iterdir())[0])
    capsys.readouterr()
    main(["predict", "--model", str(flagging_run), "--cache", str(cache), image])
    out, err = capsys.readouterr()
    header, row = out.strip().splitlines()
    assert header.split()[-2:] == ["ood", "error"] and row.split()[-1] == "yes" and "not to be trusted" in err
    main(["predict", "--model", str(flagging_run), "--cache", str(cache), "--format", "csv", image])
    row = dict(zip(*[line.split(",") for line in capsys.readouterr().out.strip().splitlines()]))
    assert row["ood"] == "1" and float(row["ood_score"]) > -1.0 and row["predicted"] in {"covid", "normal", "pneumonia"}
    main(["predict", "--model", str(flagging_run), "--cache", str(cache), "--format", "json", image])
    (answer,) = json.loads(capsys.readouterr().out)
    assert answer["ood"]["flag"] is True and answer["ood"]["score"] > -1.0 and answer["predicted"]


def test_refuse_ood_withholds_the_class(trained_run, flagging_run, capsys):
    _, data, cache = trained_run
    image = str(sorted((data / "test" / "covid").iterdir())[0])
    capsys.readouterr()
    main(["predict", "--model", str(flagging_run), "--cache", str(cache), "--refuse-ood", "--format", "json", image])
    (answer,) = json.loads(capsys.readouterr().out)
    assert answer["predicted"] is None and answer["probabilities"] is None and answer["ood"]["flag"] is True
    main(["predict", "--model", str(flagging_run), "--cache", str(cache), "--refuse-ood", image])
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[1].split()[1] == "withheld" and "withheld (--refuse-ood)" in err


def test_non_radiographs_are_named_and_nothing_prints_a_traceback(trained_run, capsys, tmp_path):
    import numpy as np

    from tests.test_dicom import make_dicom

    run, _, cache = trained_run
    pixels = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (64, 1))
    make_dicom(tmp_path / "mr.dcm", pixels, header={"Modality": "MR"})
    make_dicom(tmp_path / "ct.dcm", pixels, header={"Modality": "CT"})
    broken = make_dicom(tmp_path / "broken.dcm", pixels).read_bytes()
    (tmp_path / "broken.dcm").write_bytes(broken[:-3000])  # pixel data cut short
    capsys.readouterr()
    assert main(["predict", "--model", str(run), "--cache", str(cache), "--format", "json", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    errors = {row["file"].rsplit("/", 1)[-1]: row["error"] for row in json.loads(out)}
    assert errors["mr.dcm"].startswith("MR image (DICOM Modality MR), not a chest radiograph")
    assert errors["ct.dcm"].startswith("CT image") and "DICOM" in errors["broken.dcm"]
    assert "Traceback" not in err


@pytest.mark.parametrize("ratios", ["0.5,0.5", "a,b,c", "0.5,0.4,0.4"])
def test_bad_split_ratios_give_one_line(trained_run, capsys, tmp_path, ratios):
    _, data, _ = trained_run
    assert main(["data", "split", str(data), "--out", str(tmp_path / "s.csv"), "--ratios", ratios]) == 2
    err = capsys.readouterr().err.strip()
    assert "--ratios" in err and len(err.splitlines()) == 1
