"""`lungxray data import` for each collection, on its label files in their published format, and
`data merge`. NIH, CheXpert, PadChest and RSNA rows are real: read from the label files the
torchxrayvision 1.5.7 wheel carries (`make test` downloads it, without torch; it is never imported).
The others follow the published layout, quoted in each test."""

import csv
import gzip
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungxray import Config, train
from lungxray.cli import main
from lungxray.data.importers import import_collection
from lungxray.errors import DataError
from tests.conftest import TINY, synthetic_image, torchxrayvision_wheel


def published_rows(member: str, keys: set[str], column: str) -> tuple[list[str], list[dict]]:
    """The header of a label file in the wheel and its rows whose `column` is among `keys`."""
    with zipfile.ZipFile(torchxrayvision_wheel()) as wheel:
        data = wheel.read(f"torchxrayvision/data/{member}")
    if member.endswith(".gz"):
        data = gzip.decompress(data)
    elif member.endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            data = inner.read(inner.namelist()[0])
    reader = csv.DictReader(io.StringIO(data.decode("utf-8")))
    rows = [row for row in reader if row[column] in keys]
    assert {row[column] for row in rows} == keys, "a chosen row is not in the published file"
    return list(reader.fieldnames), rows


def write_csv(path: Path, header: list[str], rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def tiny_image(path: Path, seed: int = 0, label_index: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_image(label_index, np.random.default_rng(seed))).save(path, format="PNG")
    return path


def manifest_rows(path: Path) -> dict[str, dict]:
    return {Path(row["file"]).name: row for row in csv.DictReader(open(path))}


def test_nih_mapping_views_and_missing_files(tmp_path):
    # No Finding PA, Pneumonia AP, pneumonia among other findings, another finding alone, a missing file.
    names = {"00000002_000.png", "00000061_015.png", "00000013_010.png", "00000011_000.png", "00000005_000.png"}
    header, rows = published_rows("Data_Entry_2017_v2020.csv.gz", names, "Image Index")
    root = tmp_path / "nih"
    write_csv(root / "Data_Entry_2017_v2020.csv", header, rows)
    for i, name in enumerate(sorted(names - {"00000005_000.png"})):
        tiny_image(root / "images_001" / "images" / name, seed=i)
    summary = import_collection("nih", root, tmp_path / "nih.csv")
    got = manifest_rows(tmp_path / "nih.csv")
    assert {n: r["label"] for n, r in got.items()} == {"00000002_000.png": "normal", "00000061_015.png": "pneumonia",
                                                       "00000013_010.png": "pneumonia"}
    normal = got["00000002_000.png"]
    assert (normal["patient_id"], normal["age"], normal["age_group"], normal["sex"], normal["view"]) == \
        ("2", "80", "adult", "M", "PA")
    assert normal["source"] == "nih_chestxray14" and normal["native_finding_labels"] == "No Finding"
    assert (tmp_path / normal["file"]).is_file()  # relative to the manifest's folder
    assert summary.dropped == {"other findings without pneumonia": 1}
    assert summary.missing == ["images/00000005_000.png"]
    assert json.loads((tmp_path / "nih.csv.summary.json").read_text())["kept"]["pneumonia"] == 2
    only_pa = import_collection("nih", root, tmp_path / "pa.csv", views=("PA",))
    assert only_pa.kept == {"covid": 0, "normal": 1, "pneumonia": 0}
    assert only_pa.dropped["view AP not among --views PA"] == 2


CHEXPERT = {
    "CheXpert-v1.0-small/train/patient00085/study1/view1_frontal.jpg": "pneumonia",  # Pneumonia 1.0
    "CheXpert-v1.0-small/train/patient00015/study1/view1_frontal.jpg": "uncertain",  # Pneumonia -1.0, No Finding blank
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg": "normal",  # No Finding 1.0
    "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg": "other",  # Lung Opacity, no pneumonia
    "CheXpert-v1.0-small/train/patient00004/study1/view2_lateral.jpg": "lateral",  # No Finding 1.0, lateral
}


@pytest.fixture
def chexpert_root(tmp_path):
    header, rows = published_rows("chexpert_train.csv.gz", set(CHEXPERT), "Path")
    root = tmp_path / "chexpert"
    write_csv(root / "CheXpert-v1.0-small" / "train.csv", header, rows)
    for i, path in enumerate(CHEXPERT):
        tiny_image(root / path, seed=i)
    return root


@pytest.mark.parametrize("policy, uncertain_becomes", [("drop", None), ("negative", None), ("positive", "pneumonia")])
def test_chexpert_uncertain_policies(chexpert_root, tmp_path, policy, uncertain_becomes):
    summary = import_collection("chexpert", chexpert_root, tmp_path / "c.csv", uncertain=policy)
    got = {row["patient_id"]: row for row in csv.DictReader(open(tmp_path / "c.csv"))}
    expected = {"patient00085": "pneumonia", "patient00001": "normal"}
    if uncertain_becomes:
        expected["patient00015"] = uncertain_becomes
    assert {p: r["label"] for p, r in got.items()} == expected
    assert got["patient00001"]["study_id"] == "patient00001/study1" and got["patient00001"]["native_pneumonia"] == ""
    assert got["patient00085"]["native_pneumonia"] == "1.0" and got["patient00085"]["view"] == "AP"
    lateral, other = "view LL not among --views PA,AP", "other findings without pneumonia"
    assert summary.dropped == {"drop": {lateral: 1, other: 1, "uncertain pneumonia (--uncertain drop)": 1},
                               "negative": {lateral: 1, other: 2}, "positive": {lateral: 1, other: 1}}[policy]


def test_all_views_keeps_the_lateral(chexpert_root, tmp_path, capsys):
    assert main(["data", "import", "chexpert", str(chexpert_root), "--out", str(tmp_path / "c.csv"),
                 "--views", "all"]) == 0
    assert {r["view"] for r in csv.DictReader(open(tmp_path / "c.csv"))} == {"AP", "LL"}
    assert "3 images kept" in capsys.readouterr().out


def test_padchest_mapping(tmp_path):
    with zipfile.ZipFile(torchxrayvision_wheel()) as wheel:
        data = gzip.decompress(wheel.read("torchxrayvision/data/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"))
    reader = csv.DictReader(io.StringIO(data.decode("utf-8")))
    picked = {}
    for row in reader:  # the first real row of each kind
        kind = ("pneumonia" if "'pneumonia'" in row["Labels"] else "normal" if row["Labels"] == "['normal']"
                else "exclude" if "exclude" in row["Labels"] else "other")
        key = (kind, row["Projection"])
        if key in {("pneumonia", "PA"), ("normal", "AP_horizontal"), ("normal", "L"), ("exclude", "PA"),
                   ("other", "PA")} and key not in picked:
            picked[key] = row
        if len(picked) == 5:
            break
    root = tmp_path / "padchest"
    write_csv(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", list(reader.fieldnames), list(picked.values()))
    for i, row in enumerate(picked.values()):
        tiny_image(root / row["ImageDir"] / row["ImageID"], seed=i)
    summary = import_collection("padchest", root, tmp_path / "p.csv")
    got = {r["native_projection"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    assert {p: r["label"] for p, r in got.items()} == {"PA": "pneumonia", "AP_horizontal": "normal"}
    assert got["AP_horizontal"]["view"] == "AP"
    pneumonia = picked[("pneumonia", "PA")]
    assert got["PA"]["age"] == str(int(pneumonia["StudyDate_DICOM"][:4]) - int(float(pneumonia["PatientBirth"])))
    assert summary.dropped == {"view LL not among --views PA,AP": 1, "excluded or suboptimal study": 1,
                               "other findings without pneumonia": 1}


def test_rsna_reads_views_and_ages_from_dicom_headers(tmp_path):
    from tests.test_dicom import make_dicom

    ids = {"0004cfab-14fd-4e49-80ba-63a80b6bddd6", "00436515-870c-4b36-a041-de91049b9ab4",
           "00322d4d-1c29-4943-afc9-b6754be640eb"}
    header, rows = published_rows("kaggle_stage_2_train_labels.csv.zip", ids, "patientId")
    _, headers = published_rows("kaggle_stage_2_train_images_dicom_headers.csv.gz", {f"{i}.dcm" for i in ids},
                                "Filename")
    root = tmp_path / "rsna"
    write_csv(root / "stage_2_train_labels.csv", header, rows)
    # stage_2_detailed_class_info.csv, as published: patientId,class (three values); not in the wheel,
    # so written here from Target: 1 is Lung Opacity, 0 either of the others.
    target = {r["patientId"]: r["Target"] for r in rows}
    assert sorted(target.values()) == ["0", "0", "1"]
    zero = sorted(i for i in ids if target[i] == "0")
    detailed = [{"patientId": i, "class": "Lung Opacity" if target[i] == "1" else
                 "Normal" if i == zero[0] else "No Lung Opacity / Not Normal"} for i in sorted(ids)]
    write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], detailed)
    (root / "stage_2_train_images").mkdir()
    for facts in headers:
        make_dicom(root / "stage_2_train_images" / facts["Filename"], np.full((16, 16), 900, np.uint16),
                   header={"PatientAge": f"{int(facts['PatientAge']):03d}Y", "PatientSex": facts["PatientSex"],
                           "ViewPosition": facts["ViewPosition"]})
    summary = import_collection("rsna", root, tmp_path / "r.csv")
    got = {r["patient_id"]: r for r in csv.DictReader(open(tmp_path / "r.csv"))}
    by_id = {h["Filename"].removesuffix(".dcm"): h for h in headers}
    assert {i: r["label"] for i, r in got.items()} == {d["patientId"]: {"Lung Opacity": "pneumonia", "Normal": "normal"}[d["class"]]
                                                       for d in detailed if d["class"] != "No Lung Opacity / Not Normal"}
    for patient, row in got.items():
        assert (row["age"], row["sex"], row["view"]) == (by_id[patient]["PatientAge"], by_id[patient]["PatientSex"],
                                                         by_id[patient]["ViewPosition"])
    assert summary.dropped == {"no lung opacity but not normal (another finding)": 1}
    (root / "stage_2_train_images" / f"{zero[0]}.dcm").write_bytes(b"DICM but not really")
    broken = import_collection("rsna", root, tmp_path / "r2.csv")
    assert broken.dropped["DICOM header unreadable"] == 1


def test_kermany_folders_and_patients(tmp_path):
    # chest_xray/{train,test}/{NORMAL,PNEUMONIA}/ with the published file names; Kaggle's copy nests it twice.
    root = tmp_path / "kermany"
    names = {"train/NORMAL/IM-0115-0001.jpeg": "normal", "train/PNEUMONIA/person1_bacteria_1.jpeg": "pneumonia",
             "test/PNEUMONIA/person1_virus_6.jpeg": "pneumonia", "test/NORMAL/NORMAL2-IM-1427-0001.jpeg": "normal"}
    for i, name in enumerate(names):
        tiny_image(root / "chest_xray" / name, seed=i)
        tiny_image(root / "chest_xray" / "chest_xray" / name, seed=i)
    tiny_image(root / "__MACOSX" / "chest_xray" / "train" / "NORMAL" / "._IM-0115-0001.jpeg")
    import_collection("kermany", root, tmp_path / "k.csv")
    got = list(csv.DictReader(open(tmp_path / "k.csv")))
    assert sorted((Path(r["file"]).name, r["label"], r["patient_id"], r["native_pathogen"]) for r in got) == [
        ("IM-0115-0001.jpeg", "normal", "IM-0115", ""), ("NORMAL2-IM-1427-0001.jpeg", "normal", "NORMAL2-IM-1427", ""),
        ("person1_bacteria_1.jpeg", "pneumonia", "person1", "bacteria"),
        ("person1_virus_6.jpeg", "pneumonia", "person1", "virus")]
    assert {r["age_group"] for r in got} == {"pediatric"}


IEEE8023_HEADER = ("patientid,offset,sex,age,finding,RT_PCR_positive,survival,intubated,intubation_present,went_icu,"
                   "in_icu,needed_supplemental_O2,extubated,temperature,pO2_saturation,leukocyte_count,"
                   "neutrophil_count,lymphocyte_count,view,modality,date,location,folder,filename,doi,url,license,"
                   "clinical_notes,other_notes,Unnamed: 29").split(",")


def test_ieee8023_findings_modalities_and_views(tmp_path):
    # metadata.csv as published in ieee8023/covid-chestxray-dataset (header above).
    root = tmp_path / "ieee8023"
    rows = [
        {"patientid": "2", "offset": "0", "sex": "M", "age": "65", "finding": "Pneumonia/Viral/COVID-19",
         "view": "PA", "modality": "X-ray", "location": "Wuhan, China", "folder": "images", "filename": "a.png"},
        {"patientid": "3", "sex": "F", "age": "40", "finding": "Pneumonia/Bacterial/Streptococcus",
         "view": "AP Supine", "modality": "X-ray", "location": "Italy", "folder": "images", "filename": "b.png"},
        {"patientid": "4", "sex": "F", "age": "12", "finding": "No Finding", "view": "PA", "modality": "X-ray",
         "folder": "images", "filename": "c.png"},
        {"patientid": "5", "finding": "Tuberculosis", "view": "PA", "modality": "X-ray", "folder": "images",
         "filename": "d.png"},
        {"patientid": "2", "finding": "Pneumonia/Viral/COVID-19", "view": "Axial", "modality": "CT",
         "folder": "volumes", "filename": "e.nii.gz"},
        {"patientid": "6", "finding": "Pneumonia/Viral/COVID-19", "view": "L", "modality": "X-ray", "folder": "images",
         "filename": "f.png"},
    ]
    write_csv(root / "metadata.csv", IEEE8023_HEADER, rows)
    for i, row in enumerate(r for r in rows if r["modality"] == "X-ray"):
        tiny_image(root / row["folder"] / row["filename"], seed=i)
    summary = import_collection("ieee8023", root, tmp_path / "i.csv")
    got = manifest_rows(tmp_path / "i.csv")
    assert {n: r["label"] for n, r in got.items()} == {"a.png": "covid", "b.png": "pneumonia", "c.png": "normal"}
    assert got["b.png"]["view"] == "AP" and got["b.png"]["native_view"] == "AP Supine" and got["b.png"]["site"] == "Italy"
    assert got["c.png"]["age_group"] == "pediatric"
    assert summary.dropped == {"other findings without pneumonia": 1, "modality CT, not a radiograph": 1,
                               "view L not among --views PA,AP": 1}


def test_mimic_applies_the_chexpert_rule_to_each_image(tmp_path):
    # mimic-cxr-2.0.0-chexpert.csv.gz and -metadata.csv.gz, as published on PhysioNet (columns used).
    root = tmp_path / "mimic"
    root.mkdir()
    observations = ["No Finding", "Pneumonia"]
    with gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "wt") as f:
        f.write("subject_id,study_id," + ",".join(observations) + "\n10000032,50414267,1.0,\n10000764,57375967,,-1.0\n")
    with gzip.open(root / "mimic-cxr-2.0.0-metadata.csv.gz", "wt") as f:
        f.write("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns\n"
                "02aa804e,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544\n"
                "174413ec,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544\n"
                "096052b7,10000764,57375967,CHEST (PORTABLE AP),AP,3056,2544\n")
    for i, (subject, study, dicom) in enumerate([("10000032", "50414267", "02aa804e"), ("10000032", "50414267", "174413ec"),
                                                 ("10000764", "57375967", "096052b7")]):
        tiny_image(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg", seed=i)
    import_collection("mimic", root, tmp_path / "m.csv", uncertain="positive")
    got = manifest_rows(tmp_path / "m.csv")
    assert {n: (r["label"], r["patient_id"], r["study_id"]) for n, r in got.items()} == {
        "02aa804e.jpg": ("normal", "10000032", "50414267"), "096052b7.jpg": ("pneumonia", "10000764", "57375967")}


def radiography_root(root: Path, per_class: int, seed: int) -> Path:
    """COVID-19_Radiography_Dataset/{COVID,Normal,Lung_Opacity,Viral Pneumonia}/images/*.png (release 4)."""
    rng = np.random.default_rng(seed)
    for index, folder in enumerate(["COVID", "Normal", "Viral Pneumonia"]):
        for i in range(per_class):
            path = root / "COVID-19_Radiography_Dataset" / folder / "images" / f"{folder}-{i + 1}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(synthetic_image(index, rng)).save(path)
    tiny_image(root / "COVID-19_Radiography_Dataset" / "COVID" / "masks" / "COVID-1.png")  # lung masks: not films
    return root


def test_radiography_classes_are_folders(tmp_path):
    summary = import_collection("radiography", radiography_root(tmp_path / "r", 2, seed=1), tmp_path / "r.csv")
    assert summary.kept == {"covid": 2, "normal": 2, "pneumonia": 2}


def test_what_import_refuses(tmp_path, capsys):
    assert main(["data", "import", "nih", str(tmp_path / "absent"), "--out", str(tmp_path / "n.csv")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["data", "import", "nih", str(tmp_path / "empty"), "--out", str(tmp_path / "n.csv")]) == 2
    assert "lacks the label file Data_Entry_2017_v2020.csv" in capsys.readouterr().err
    write_csv(tmp_path / "wrong" / "Data_Entry_2017_v2020.csv", ["a", "b"], [{"a": 1, "b": 2}])
    assert main(["data", "import", "nih", str(tmp_path / "wrong"), "--out", str(tmp_path / "n.csv")]) == 2
    assert "lacks the column(s)" in capsys.readouterr().err
    with pytest.raises(DataError, match="unknown collection"):
        import_collection("nope", tmp_path, tmp_path / "x.csv")


def kermany_root(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for index, folder in ((1, "NORMAL"), (2, "PNEUMONIA")):
        for i in range(per_class):
            name = f"IM-{i:04d}-0001.jpeg" if folder == "NORMAL" else f"person{i}_bacteria_{i}.jpeg"
            path = root / "chest_xray" / "train" / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(synthetic_image(index, rng)).save(path, format="PNG")
    return root


def test_import_merge_train_and_evaluate_a_held_out_source(tmp_path, capsys):
    radiography = radiography_root(tmp_path / "radiography", per_class=12, seed=1)
    kermany = kermany_root(tmp_path / "kermany", per_class=6, seed=2)
    # The same film in both collections (the Radiography Database re-distributes Kermany's).
    copied = radiography / "COVID-19_Radiography_Dataset" / "Normal" / "images" / "Normal-1.png"
    (kermany / "chest_xray" / "train" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(copied.read_bytes())
    for kind, root in (("radiography", radiography), ("kermany", kermany)):
        assert main(["data", "import", kind, str(root), "--out", str(tmp_path / f"{kind}.csv")]) == 0
    merged = tmp_path / "all.csv"
    assert main(["data", "merge", str(tmp_path / "radiography.csv"), str(tmp_path / "kermany.csv"),
                 "--out", str(merged)]) == 0
    out, err = capsys.readouterr()
    assert "1 film(s) appear in two or more collections" in out
    assert "every covid image comes from one source (covid19_radiography_db)" in err
    table = list(csv.DictReader(open(tmp_path / "all.csv.sources.csv")))
    assert {r["source"]: (r["covid"], r["normal"], r["pneumonia"]) for r in table} == {
        "covid19_radiography_db": ("12", "12", "12"), "kermany_pediatric": ("0", "7", "6")}
    rows = list(csv.DictReader(open(merged)))
    copies = [r for r in rows if Path(r["file"]).name in ("Normal-1.png", "IM-9999-0001.jpeg")]
    assert len({r["split"] for r in copies}) == 1  # the film and its copy in one split
    splits_of_patient: dict = {}
    for r in rows:
        splits_of_patient.setdefault(r["patient_group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of_patient.values())
    config = Config(weights="none", image_size=TINY, epochs=1, batch_size=8, dense_units=8, feature_runtime="keras",
                    holdout_source="kermany_pediatric")
    result = train(merged, tmp_path / "run", config, cache_dir=tmp_path / "cache")
    assert result.external_metrics["n"] == 13  # every Kermany film, none trained on
    trained = {Path(r["file"]).name for r in csv.DictReader(open(result.run_dir / "data.csv"))}
    assert not trained & {Path(r["file"]).name for r in rows if r["source"] == "kermany_pediatric"}
    assert main(["evaluate", "--model", str(result.run_dir), "--data", str(merged), "--split", "test", "--by", "source",
                 "--out", str(tmp_path / "by-source"), "--cache", str(tmp_path / "cache")]) == 0
    groups = json.loads((tmp_path / "by-source" / "metrics.json").read_text())["subgroups"]["source"]
    assert set(groups) == {r["source"] for r in rows if r["split"] == "test"}


def test_vindr_kaggle_majority_of_radiologists(tmp_path):
    from tests.test_dicom import make_dicom

    # Real rows: one film all three radiologists read as "No finding", one with findings.
    ids = {"000434271f63a053c4128a0ba6352c7f", "9a5094b2563a1ef3ff50dc5c7ff71345"}
    header, rows = published_rows("vinbigdata-train.csv.gz", ids, "image_id")
    root = tmp_path / "vindr"
    write_csv(root / "train.csv", header, rows)
    (root / "train").mkdir()
    for i, image in enumerate(sorted(ids)):
        make_dicom(root / "train" / f"{image}.dicom", np.full((16, 16), 500, np.uint16),
                   header={"PatientAge": f"0{40 + i}Y", "PatientSex": "F"})
    summary = import_collection("vindr", root, tmp_path / "v.csv")
    got = list(csv.DictReader(open(tmp_path / "v.csv")))
    assert [(r["patient_id"], r["label"], r["age"], r["sex"], r["view"], r["native_readers"]) for r in got] == [
        ("000434271f63a053c4128a0ba6352c7f", "normal", "40", "F", "PA", "3")]
    assert summary.dropped == {"a finding (Kaggle's labels cannot say pneumonia)": 1}


def test_vindr_physionet_global_labels(tmp_path):
    # annotations/image_labels_train.csv as on PhysioNet (a subset of its label columns), three readers each.
    root = tmp_path / "vindr"
    columns = ["image_id", "rad_id", "Lung Opacity", "Pneumonia", "Tuberculosis", "Other diseases", "No finding"]
    rows = [dict(zip(columns, values)) for values in [
        ("a", "R1", 1, 1, 0, 0, 0), ("a", "R2", 1, 1, 0, 0, 0), ("a", "R3", 0, 0, 0, 0, 1),  # 2 of 3: pneumonia
        ("b", "R1", 0, 0, 0, 0, 1), ("b", "R4", 0, 0, 0, 0, 1), ("b", "R5", 0, 1, 0, 0, 0),  # 2 of 3: no finding
        ("c", "R1", 0, 0, 1, 0, 0), ("c", "R2", 0, 0, 1, 0, 0), ("c", "R3", 0, 0, 0, 0, 1)]]  # tuberculosis
    write_csv(root / "annotations" / "image_labels_train.csv", columns, rows)
    from tests.test_dicom import make_dicom

    (root / "train").mkdir()
    for image in "ab":
        make_dicom(root / "train" / f"{image}.dicom", np.full((16, 16), 500, np.uint16), header={"PatientAge": "030Y"})
    tiny_image(root / "train" / "c.dicom")  # a PNG: its DICOM header cannot be read
    summary = import_collection("vindr", root, tmp_path / "v.csv")
    assert {r["patient_id"]: r["label"] for r in csv.DictReader(open(tmp_path / "v.csv"))} == {"a": "pneumonia",
                                                                                             "b": "normal"}
    assert summary.dropped == {"DICOM header unreadable": 1}
    make_dicom(root / "train" / "c.dicom", np.full((16, 16), 500, np.uint16), header={"PatientAge": "030Y"})
    assert import_collection("vindr", root, tmp_path / "v.csv").dropped == {"other findings without pneumonia": 1}


def test_siim_study_labels_reach_their_images(tmp_path):
    from tests.test_dicom import make_dicom

    # train_study_level.csv and train_image_level.csv as published on Kaggle (SIIM-FISABIO-RSNA 2021).
    root = tmp_path / "siim"
    study_columns = ["id", "Negative for Pneumonia", "Typical Appearance", "Indeterminate Appearance",
                     "Atypical Appearance"]
    write_csv(root / "train_study_level.csv", study_columns, [
        dict(zip(study_columns, ("s1_study", 0, 1, 0, 0))), dict(zip(study_columns, ("s2_study", 1, 0, 0, 0))),
        dict(zip(study_columns, ("s3_study", 0, 0, 0, 1)))])
    write_csv(root / "train_image_level.csv", ["id", "boxes", "label", "StudyInstanceUID"], [
        {"id": "i1_image", "label": "opacity 1 10 10 50 50", "StudyInstanceUID": "s1"},
        {"id": "i2_image", "label": "none 1 0 0 1 1", "StudyInstanceUID": "s2"},
        {"id": "i3_image", "label": "opacity 1 5 5 9 9", "StudyInstanceUID": "s3"}])
    for image, study in (("i1", "s1"), ("i2", "s2"), ("i3", "s3")):
        (root / "train" / study / "series9").mkdir(parents=True)
        make_dicom(root / "train" / study / "series9" / f"{image}.dcm", np.full((16, 16), 700, np.uint16),
                   header={"PatientAge": "", "PatientSex": "M", "ViewPosition": "AP"})
    summary = import_collection("siim", root, tmp_path / "s.csv")
    got = {r["study_id"]: r for r in csv.DictReader(open(tmp_path / "s.csv"))}
    assert {s: r["label"] for s, r in got.items()} == {"s1": "covid", "s2": "normal"}
    assert got["s1"]["file"].endswith("train/s1/series9/i1.dcm") and got["s1"]["view"] == "AP"
    assert summary.dropped == {"atypical appearance (neither COVID-19 nor named pneumonia)": 1}


def test_covidx_both_label_conventions(tmp_path):
    # train.txt / test.txt as published: "patient_id filename class data_source".
    root = tmp_path / "covidx"
    root.mkdir()
    (root / "train.txt").write_text("101 a.png positive bimcv\n102 b.png negative rsna\n")
    (root / "test.txt").write_text("7 c.jpg COVID-19 cohen\n8 d.png pneumonia rsna\n9 e.png normal rsna\n")
    for i, name in enumerate(["train/a.png", "train/b.png", "test/c.jpg", "test/d.png", "test/e.png"]):
        tiny_image(root / name, seed=i)
    summary = import_collection("covidx", root, tmp_path / "x.csv")
    got = manifest_rows(tmp_path / "x.csv")
    assert {n: (r["label"], r["site"]) for n, r in got.items()} == {
        "a.png": ("covid", "bimcv"), "c.jpg": ("covid", "cohen"), "d.png": ("pneumonia", "rsna"),
        "e.png": ("normal", "rsna")}
    assert summary.dropped == {"negative (normal or another pneumonia: not told)": 1}
    (root / "train.txt").write_text("101 a.png\n")
    with pytest.raises(DataError, match="train.txt, line 1: expected"):
        import_collection("covidx", root, tmp_path / "x.csv")


BIMCV_LABELS_HEADER = ["", "PatientID", "ReportID", "Report", "Labels", "Localizations", "LabelsLocalizationsBySentence",
                       "labelCUIS", "LocalizationsCUIS"]


def bimcv_root(root: Path, label_file: str, sessions: dict[tuple[str, str, str], str | None]) -> Path:
    """A covid19_posi/ (or covid19_neg/) folder in the published layout: participants.tsv, the labels
    TSV under derivatives/labels/, a 16-bit PNG and its JSON sidecar per session under mod-rx/."""
    rows = []
    for index, ((subject, session, view), labels) in enumerate(sessions.items()):
        stem = f"sub-{subject}_ses-{session}_run-1_bp-chest_vp-{view}_{'cr' if index % 2 else 'dx'}"
        film = root / f"sub-{subject}" / f"ses-{session}" / "mod-rx" / f"{stem}.png"
        film.parent.mkdir(parents=True, exist_ok=True)
        pixels = synthetic_image(index % 3, np.random.default_rng(index))[..., 0].astype(np.uint16) * 257
        Image.fromarray(pixels).save(film)
        film.with_suffix(".json").write_text("{}")
        if labels is not None:
            rows.append({"": str(index), "PatientID": f"sub-{subject}", "ReportID": f"ses-{session}", "Report": "...",
                         "Labels": labels, "Localizations": "[]", "LabelsLocalizationsBySentence": "[]",
                         "labelCUIS": "[]", "LocalizationsCUIS": "[]"})
    (root / "sub-S9" / "ses-E9" / "mod-ct").mkdir(parents=True)
    (root / "sub-S9" / "ses-E9" / "mod-ct" / "sub-S9_ses-E9_ct.png").write_bytes(b"not a radiograph")
    labels_path = root / "derivatives" / "labels" / label_file
    labels_path.parent.mkdir(parents=True)
    with open(labels_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, BIMCV_LABELS_HEADER, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    subjects = sorted({subject for subject, _, _ in sessions})
    (root / "participants.tsv").write_text("participant\tmodality_dicom\tage\tgender\n" + "".join(
        f"sub-{s}\t['CR', 'DX']\t[{60 + i}]\t{'MF'[i % 2]}\n" for i, s in enumerate(subjects)))
    return root


def test_bimcv_sessions_cohorts_and_uncertain_covid(tmp_path):
    from lungxray.data.images import read_image

    positive = bimcv_root(tmp_path / "covid19_posi", "labels_covid_posi.tsv", {
        ("S1", "E1", "pa"): "['COVID 19', 'pneumonia']", ("S1", "E2", "ap"): "[' normal']",
        ("S2", "E3", "pa"): "['COVID 19 uncertain', 'infiltrates']", ("S2", "E4", "pa"): "['pneumonia']",
        ("S3", "E5", "pa"): "['exclude']", ("S3", "E6", "ap"): "['COVID 19', 'pneu",
        ("S3", "E7", "ll"): "['COVID 19']", ("S4", "E8", "pa"): None})
    summary = import_collection("bimcv", positive, tmp_path / "b.csv")
    got = {r["study_id"]: r for r in csv.DictReader(open(tmp_path / "b.csv"))}
    assert {s: r["label"] for s, r in got.items()} == {"ses-E1": "covid", "ses-E2": "normal"}
    assert (got["ses-E1"]["patient_id"], got["ses-E1"]["age"], got["ses-E1"]["sex"], got["ses-E1"]["view"],
            got["ses-E1"]["native_cohort"], got["ses-E1"]["native_modality"]) == ("sub-S1", "60", "M", "PA", "positive", "DX")
    assert got["ses-E2"]["view"] == "AP" and got["ses-E2"]["age_group"] == "adult"
    assert summary.dropped == {"COVID 19 uncertain (--uncertain drop)": 1,
                               "pneumonia not called COVID 19 in a COVID-19-positive patient": 1,
                               "excluded or suboptimal study": 1, "labels unreadable (cut short in the label file)": 1,
                               "view LL not among --views PA,AP": 1, "session without labels in the label file": 1}
    assert read_image(tmp_path / got["ses-E1"]["file"]).shape[2] == 3  # the 16-bit PNG the manifest names
    import_collection("bimcv", positive, tmp_path / "u.csv", uncertain="positive")
    assert {r["study_id"]: r["label"] for r in csv.DictReader(open(tmp_path / "u.csv"))}["ses-E3"] == "covid"
    summary = import_collection("bimcv", positive, tmp_path / "n.csv", uncertain="negative")
    assert summary.dropped["other findings"] == 1  # infiltrates, once the uncertain COVID-19 is read as absent

    negative = bimcv_root(tmp_path / "covid19_neg", "Labels_covid_NEG_JAN21.tsv", {
        ("N1", "E1", "pa"): "['pneumonia', 'infiltrates']", ("N1", "E2", "pa"): "['normal']",
        ("N2", "E3", "ap"): "['COVID 19']"})
    summary = import_collection("bimcv", negative, tmp_path / "neg.csv")
    assert summary.kept == {"covid": 0, "normal": 1, "pneumonia": 1}
    assert summary.dropped == {"COVID 19 in the PCR-negative set": 1}


def test_dicom_ages_are_whole_years():
    from lungxray.data.importers.base import dicom_age_years

    assert [dicom_age_years(a) for a in ("065Y", "43", "006M", "010D", "", "abcY")] == ["65", "43", "0", "0", "", ""]
