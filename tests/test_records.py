import csv

import pytest

from lungxray.data.records import DataError, assign_splits, load_dataset, write_manifest


def test_reference_layout(split_folders):
    dataset = load_dataset(split_folders)
    assert dataset.layout == "splits" and dataset.classes == ["covid", "normal", "pneumonia"]
    assert {s: sum(row.values()) for s, row in dataset.counts().items()} == {"train": 18, "val": 18, "test": 18}


def test_class_folders_get_a_stratified_seeded_split(class_folders):
    dataset = assign_splits(load_dataset(class_folders), (0.6, 0.2, 0.2), seed=3)
    counts = dataset.counts()
    assert counts["train"] == {"covid": 6, "normal": 6, "pneumonia": 6}
    assert counts["val"] == counts["test"] == {"covid": 2, "normal": 2, "pneumonia": 2}
    again = assign_splits(load_dataset(class_folders), (0.6, 0.2, 0.2), seed=3)
    assert [r.split for r in again.records] == [r.split for r in dataset.records]
    other = assign_splits(load_dataset(class_folders), (0.6, 0.2, 0.2), seed=4)
    assert [r.split for r in other.records] != [r.split for r in dataset.records]


def test_manifest_csv_keeps_extra_columns_and_round_trips(class_folders, tmp_path):
    csv_path = class_folders / "manifest.csv"
    files = sorted(class_folders.rglob("*.png"))
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "source"])
        writer.writerows([f.relative_to(class_folders).as_posix(), f.parent.name, f"site{i % 2}"]
                         for i, f in enumerate(files))
    dataset = load_dataset(csv_path)
    assert dataset.layout == "csv" and len(dataset.records) == 30
    assert dataset.records[0].path.is_file() and dataset.records[0].extra["source"] in {"site0", "site1"}
    split = assign_splits(dataset)
    write_manifest(split, tmp_path / "out.csv")
    again = load_dataset(tmp_path / "out.csv")
    assert [(r.path, r.label, r.split, r.extra) for r in again.records] == \
           [(r.path, r.label, r.split, r.extra) for r in split.records]


def test_class_names_are_not_hard_wired(tmp_path):
    from tests.conftest import write_class_folders

    root = write_class_folders(tmp_path / "two", per_class=3)
    (root / "pneumonia").rename(root / "zz_other")
    (root / "covid").rename(root / "aa_first")
    assert load_dataset(root).classes == ["aa_first", "normal", "zz_other"]


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")


def test_empty_class_folder(class_folders):
    (class_folders / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*holds no images"):
        load_dataset(class_folders)


def test_unknown_class_in_csv(class_folders):
    csv_path = class_folders / "m.csv"
    csv_path.write_text("file,label\ncovid/covid_0.png,covid\nnormal/normal_0.png,martian\n")
    with pytest.raises(DataError, match="martian"):
        load_dataset(csv_path, classes=["covid", "normal", "pneumonia"])


def test_csv_without_label_column(class_folders):
    csv_path = class_folders / "m.csv"
    csv_path.write_text("path,kind\na.png,covid\n")
    with pytest.raises(DataError, match="lacks the column"):
        load_dataset(csv_path)


def test_csv_with_bad_split(class_folders):
    csv_path = class_folders / "m.csv"
    csv_path.write_text("file,label,split\ncovid/covid_0.png,covid,holdout\n")
    with pytest.raises(DataError, match="line 2.*holdout"):
        load_dataset(csv_path)
