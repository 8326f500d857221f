import os
from pathlib import Path

import pytest

from edge_runtime.idc import parse_idc_name
from tests.datatrees import (BREAKHIS_PATIENTS, breakhis_path, breakhis_tree, busi_tree, folder_tree, idc_tree, noise,
                             save, write_folds_csv)
from oncolite.train.datasets import LAYOUTS, DatasetError, detect_layout, load_dataset, parse_breakhis_name


def test_class_folders_at_any_depth(tmp_path):
    folder_tree(tmp_path / "deep" / "er", {"cats": 2, "dogs": 3})
    (tmp_path / "README.md").write_text("not data")
    save(tmp_path / "stray.png", noise(1))
    (tmp_path / "deep" / "er" / "cats" / "notes.txt").write_text("x")
    ds = load_dataset(tmp_path)
    assert ds.layout == "folders"
    assert ds.labels == ["cats", "dogs"]
    assert [r.label for r in ds.records].count("dogs") == 3
    assert all(os.path.isabs(r.path) for r in ds.records)
    reasons = {Path(s.path).name: s.reason for s in ds.skipped}
    assert "class folder" in reasons["stray.png"] and "extension" in reasons["notes.txt"]
    assert "README.md" not in reasons


def test_busi_masks_are_remembered_not_inputs(tmp_path):
    ds = load_dataset(busi_tree(tmp_path))
    assert ds.layout == detect_layout(tmp_path) == "busi"
    assert len(ds.records) == 9 and not any("_mask" in Path(r.path).name for r in ds.records)
    assert len(ds.masks) == 10
    first = next(r for r in ds.records if r.path.endswith("benign (1).png"))
    assert sorted(Path(m).name for m in first.meta["masks"]) == ["benign (1)_mask.png", "benign (1)_mask_1.png"]


def test_breakhis_names_parse():
    facts = parse_breakhis_name("SOB_B_A-14-22549AB-40-001.png")
    assert facts == {"tumor": "benign", "subtype": "adenosis", "patient": "14-22549AB", "magnification": 40, "seq": 1}
    facts = parse_breakhis_name("/x/400X/SOB_M_DC-14-2523-400-012.png")
    assert (facts["tumor"], facts["subtype"], facts["patient"], facts["magnification"]) == ("malignant", "ductal_carcinoma", "14-2523", 400)
    for bad in ("SOB_B_DC-14-2523-40-001.png", "SOB_X_A-14-1-40-001.png", "SOB_B_A-14-1-50-001.png", "SOB_B_A-14-40-001.png"):
        assert parse_breakhis_name(bad) is None, bad


def test_breakhis_release_layout(tmp_path):
    breakhis_tree(tmp_path)
    # malformed: a stray name, and a file whose name disagrees with its folder
    save(breakhis_path(tmp_path, "B", "A", "adenosis", "14-22549AB", 40, 9).with_name("SOB_B_A-14-22549AB-40.png"), noise(1))
    save(breakhis_path(tmp_path, "B", "A", "adenosis", "14-22549AB", 100, 9).with_name("SOB_B_A-14-22549AB-40-009.png"), noise(2))
    ds = load_dataset(tmp_path)
    assert ds.layout == "breakhis"
    assert ds.labels == ["benign", "malignant"]
    assert len(ds.records) == len(BREAKHIS_PATIENTS) * 2 * 2
    assert {r.group for r in ds.records} == {p[3] for p in BREAKHIS_PATIENTS}
    assert len(ds.skipped) == 2 and any("folder says" in s.reason for s in ds.skipped)
    sub = load_dataset(tmp_path, label_scheme="subtype", magnification="100")
    assert len(sub.labels) == 8 and "phyllodes_tumor" in sub.labels
    assert {r.meta["magnification"] for r in sub.records} == {100}


def test_breakhis_folds_csv(tmp_path):
    paths = breakhis_tree(tmp_path, mags=(40,))
    write_folds_csv(tmp_path, paths)
    ds = load_dataset(tmp_path / "Folds.csv")
    assert ds.layout == "breakhis-folds"
    assert len(ds.records) == len(paths)
    assert all(sorted(r.meta["folds"]) == [1, 2, 3, 4, 5] for r in ds.records)
    assert load_dataset(tmp_path).layout == detect_layout(tmp_path) == "breakhis-folds"  # a folder holding Folds.csv
    assert load_dataset(tmp_path, layout="breakhis").layout == "breakhis"  # the release layout, forced


def test_idc_positions_and_malformed_names(tmp_path):
    planted = idc_tree(tmp_path)
    save(tmp_path / "10253" / "0" / "10253_idx5_x1_y1_class1.png", noise(5, 50))  # class disagrees with folder
    save(tmp_path / "10253" / "1" / "garbage.png", noise(6, 50))
    ds = load_dataset(tmp_path)
    assert ds.layout == "idc"
    assert ds.labels == ["non_idc", "idc"]  # class<0|1> order, not alphabetical
    got = {(r.group, r.meta["x"], r.meta["y"], ["non_idc", "idc"].index(r.label)) for r in ds.records}
    assert got == set(planted)
    assert len(ds.skipped) == 2
    assert parse_idc_name("a/b/10253_idx5_x1001_y1051_class0.png") == ("10253", 1001, 1051, 0)
    assert parse_idc_name("10253_idx5_x1001_y1051_class2.png") is None


def test_csv_layout(tmp_path):
    folder_tree(tmp_path / "imgs", {"a": 2, "b": 2})
    table = tmp_path / "list.csv"
    table.write_text("path,label,group,split\n"
                     "imgs/a/a (1).png,a,p1,train\nimgs/a/a (2).png,a,p1,train\n"
                     "imgs/b/b (1).png,b,p2,test\nimgs/b/b (2).png,b,,validation\n"
                     "imgs/missing.png,b,,test\nimgs/a/a (1).png,,,train\n")
    ds = load_dataset(table)
    assert ds.layout == "csv" and ds.labels == ["a", "b"]
    assert [r.group for r in ds.records] == ["p1", "p1", "p2", None]
    assert ds.records[-1].meta["split"] == "val"
    assert sorted(s.reason.split(": ")[1] for s in ds.skipped) == ["file not found", "no label"]


def test_unknown_layout_lists_the_layouts(tmp_path):
    folder_tree(tmp_path, {"a": 1})
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path, layout="pascal")
    assert all(name in str(err.value) for name in LAYOUTS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no image"):
        load_dataset(tmp_path / "empty")


def test_symlink_loops_and_unreadable_folders_do_not_hang(tmp_path, monkeypatch):
    folder_tree(tmp_path, {"a": 2, "b": 2})
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    locked = tmp_path / "b" / "locked"
    save(locked / "x.png", noise(3))
    # A folder this process may not list. Root lists a mode-0 folder anyway (CI runs as root), so
    # the refusal is the operating system's answer itself, made by the scandir the walk calls.
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    ds = load_dataset(tmp_path)
    assert len(ds.records) == 4
    assert any("symlink loop" in s.reason for s in ds.skipped)
    assert any(s.path == str(locked) and "Permission denied" in s.reason for s in ds.skipped)


def test_a_self_looping_symlink_is_skipped_and_its_folder_kept(tmp_path):
    folder_tree(tmp_path, {"a": 2, "b": 3})
    os.symlink("self.png", tmp_path / "b" / "self.png")  # stat() on it fails with ELOOP
    ds = load_dataset(tmp_path)
    assert sum(r.label == "b" for r in ds.records) == 3
    assert [(os.path.basename(s.path), s.reason) for s in ds.skipped] == [("self.png", "symlink loop; fix or remove it")]
