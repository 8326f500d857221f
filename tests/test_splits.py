import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.errors import ManifestError
from oncolite.cli import main as oncolite
from tests.datatrees import BREAKHIS_PATIENTS, breakhis_path, breakhis_tree, folder_tree, near_copy, noise, save, write_folds_csv
from oncolite.train.audit import audit_dataset
from oncolite.train.datasets import load_dataset
from oncolite.train.manifest import load_manifest, write_manifest
from oncolite.train.splits import build_manifest


@pytest.fixture(scope="module")
def breakhis_audit(tmp_path_factory):
    """BreakHis, 12 patients x 2 magnifications x 2 images, plus planted duplicates.

    A near copy of patient 0's first image filed under another benign patient joins the two
    patients into one group; a near copy filed under a malignant patient is a label conflict.
    """
    root = tmp_path_factory.mktemp("breakhis")
    paths = breakhis_tree(root)
    save(breakhis_path(root, *BREAKHIS_PATIENTS[1], 40, 9), near_copy(noise(10_000 + 1)))
    save(breakhis_path(root, *BREAKHIS_PATIENTS[7], 100, 9), near_copy(noise(10_000 + 100 * 2 + 1)))
    write_folds_csv(root, paths)
    return audit_dataset(load_dataset(root, layout="breakhis"), workers=1)


def _sides_of(manifest, fold):
    return [item["split"] if fold is None else item["cv"][fold] for item in manifest["items"]]


def _assert_no_group_crosses(audit, manifest):
    """Patients and audit duplicate groups (from the audit itself, not the manifest) stay on one side."""
    ds = audit.dataset
    index = {ds.relative(r.path): k for k, r in enumerate(ds.records)}
    folds = [None] + list(range(manifest["split"]["folds"]))
    for fold in folds:
        side_of_patient, side_of_dup = {}, {}
        for item, side in zip(manifest["items"], _sides_of(manifest, fold)):
            k = index[item["path"]]
            assert side_of_patient.setdefault(ds.records[k].group, side) == side, (fold, item["path"])
            assert side_of_dup.setdefault(int(audit.group[k]), side) == side, (fold, item["path"])


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), folds=st.integers(2, 4), val_fraction=st.sampled_from([0.1, 0.2, 0.0]))
def test_no_group_crosses_sides_in_any_fold(breakhis_audit, seed, folds, val_fraction):
    manifest = build_manifest(breakhis_audit, folds=folds, val_fraction=val_fraction, seed=seed)
    _assert_no_group_crosses(breakhis_audit, manifest)
    tests_per_item = [item["cv"].count("test") for item in manifest["items"]]
    assert set(tests_per_item) == {1}  # every image is tested exactly once across the folds
    assert manifest["split"]["stratify"] == ["label", "magnification"]
    assert {item["split"] for item in manifest["items"]} == ({"train", "test"} if val_fraction == 0 else {"train", "val", "test"})


def test_conflicts_excluded_by_default_and_kept_on_request(breakhis_audit):
    manifest = build_manifest(breakhis_audit)
    excluded = {Path(e["path"]).name for e in manifest["excluded"]}
    assert excluded == {"SOB_B_PT-14-21998CD-40-001.png", "SOB_M_LC-14-12204-100-009.png"}
    assert manifest["audit"]["conflict_images_excluded"] == 2 and manifest["audit"]["conflicts_excluded"]
    kept = build_manifest(breakhis_audit, keep_conflicts=True)
    assert len(kept["items"]) == len(manifest["items"]) + 2 and not kept["excluded"]
    # the planted near copy joins patients 0 and 1 into one group
    groups = {item["group"] for item in manifest["items"]}
    assert "14-22549AB+14-9133" in groups


def test_random_split_is_marked_and_leaks_patients(breakhis_audit):
    manifest = build_manifest(breakhis_audit, random=True, seed=0)
    assert manifest["split"]["kind"] == "random"
    assert len({item["group"] for item in manifest["items"]}) == len(manifest["items"])
    with pytest.raises(AssertionError):
        _assert_no_group_crosses(breakhis_audit, manifest)


def test_published_folds_reproduced_and_crossing_patient_reported(tmp_path):
    paths = breakhis_tree(tmp_path, mags=(40,))
    table = write_folds_csv(tmp_path, paths)
    rows = list(csv.reader(table.open()))
    fold1 = [r for r in rows[1:] if r[0] == "1"]
    patient_rows = [r for r in fold1 if "14-2523" in r[3]]  # move one of this patient's images to the other side
    patient_rows[0][2] = "test" if patient_rows[0][2] == "train" else "train"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    audit = audit_dataset(load_dataset(table), workers=1)
    manifest = build_manifest(audit, val_fraction=0.0, use_folds_csv=True)
    assert manifest["split"]["kind"] == "published"
    assert manifest["split"]["patients_crossing_folds"] == [{"patient": "14-2523", "folds": [1]}]
    assert all("14-2523" not in item["path"] for item in manifest["items"])
    published = {(int(r[0]), r[3]): r[2] for r in rows[1:]}
    for item in manifest["items"]:
        path = str(Path(item["path"]))
        assert item["cv"] == [published[(fold, Path(path).as_posix())] for fold in range(1, 6)]


def _write(tmp_path, manifest, name="manifest.json"):
    path = tmp_path / name
    write_manifest(manifest, path)
    return path


@pytest.fixture
def busi_like_manifest(tmp_path):
    root = folder_tree(tmp_path / "data", {"benign": 12, "malignant": 12})
    out = tmp_path / "out" / "manifest.json"
    assert oncolite(["split", str(root), "--out", str(out), "--folds", "3", "--quiet"]) == 0
    return out


def test_manifest_loads_with_relative_root_and_sides(busi_like_manifest):
    raw = json.loads(busi_like_manifest.read_text())
    assert raw["format"] == "oncolite-manifest/1" and raw["root"] == "../data"
    assert raw["command"].startswith("oncolite split ") and "--folds 3" in raw["command"]
    m = load_manifest(busi_like_manifest)
    assert m.sha256 == hashlib.sha256(busi_like_manifest.read_bytes()).hexdigest()
    assert m.labels == ["benign", "malignant"] and m.folds == 3
    for fold in (None, 0, 1, 2):
        sides = m.sides(fold)
        assert sum(map(len, sides.values())) == 24
        assert all(Path(item["path"]).is_file() for items in sides.values() for item in items)


def _tamper(path, change):
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def test_changed_hash_is_refused(busi_like_manifest):
    _tamper(busi_like_manifest, lambda raw: raw["items"][0].update(sha256="0" * 64))
    with pytest.raises(ManifestError, match="sha256"):
        load_manifest(busi_like_manifest)
    load_manifest(busi_like_manifest, check_hashes=False)  # the fast check skips hashes only


def test_moved_file_is_refused(busi_like_manifest):
    m = load_manifest(busi_like_manifest)
    shutil.move(m.absolute(m.items[0]), m.root / "moved.png")
    with pytest.raises(ManifestError, match="missing"):
        load_manifest(busi_like_manifest, check_hashes=False)


def test_group_on_two_sides_is_refused(busi_like_manifest):
    def leak(raw):
        by_side = {item["split"]: item for item in raw["items"]}
        by_side["test"]["group"] = by_side["train"]["group"]
    _tamper(busi_like_manifest, leak)
    with pytest.raises(ManifestError, match="two sides"):
        load_manifest(busi_like_manifest)


def test_unknown_label_is_refused(busi_like_manifest):
    _tamper(busi_like_manifest, lambda raw: raw["items"][0].update(label="cat"))
    with pytest.raises(ManifestError, match="cat"):
        load_manifest(busi_like_manifest)


def test_cli_random_makes_kind_random(tmp_path):
    root = folder_tree(tmp_path / "data", {"a": 12, "b": 12})
    out = tmp_path / "random.json"
    assert oncolite(["split", str(root), "--out", str(out), "--random", "--folds", "2", "--quiet"]) == 0
    manifest = load_manifest(out)
    assert manifest.meta["split"]["kind"] == "random"
    assert "--random" in manifest.meta["command"]


def test_too_few_images_is_a_clear_error(tmp_path):
    root = folder_tree(tmp_path / "data", {"a": 3, "b": 3})
    assert oncolite(["split", str(root), "--out", str(tmp_path / "m.json"), "--quiet"]) == 2
    assert not (tmp_path / "m.json").exists()


def test_external_csv_split_accepted_and_leaks_refused(tmp_path):
    root = folder_tree(tmp_path / "imgs", {"a": 2, "b": 2})
    table = tmp_path / "split.csv"
    table.write_text("path,label,group,split\nimgs/a/a (1).png,a,p1,train\nimgs/a/a (2).png,a,p2,test\n"
                     "imgs/b/b (1).png,b,p3,train\nimgs/b/b (2).png,b,p4,val\n")
    m = load_manifest(table)
    assert {k: len(v) for k, v in m.sides().items()} == {"train": 2, "val": 1, "test": 1}
    assert m.meta["split"]["kind"] == "given"
    table.write_text(table.read_text().replace("p2,test", "p1,test"))
    with pytest.raises(ManifestError, match="p1"):
        load_manifest(table)
    assert root.exists()


# ---------------------------------------------------------------- issue 20: what a new user trips over

def test_a_one_image_group_moved_across_sides_is_refused(busi_like_manifest):
    # `split` is fold 0 (the fold a run without --fold trains on): moving a one-image group in
    # `split` alone puts it on two sides of fold 0, like moving one image of a larger group.
    def move(raw):
        item = next(item for item in raw["items"]
                    if item["split"] == "train" and sum(i["group"] == item["group"] for i in raw["items"]) == 1)
        item["split"] = "test"
    _tamper(busi_like_manifest, move)
    with pytest.raises(ManifestError, match=r"is on two sides in fold 0 \(the manifest's split\)"):
        load_manifest(busi_like_manifest)


def test_too_few_groups_names_the_option_that_asked_for_the_folds(tmp_path, capsys):
    root = folder_tree(tmp_path / "data", {"a": 8, "b": 8})
    # 2 outer folds leave 8 training images; --val-fraction 0.1 asks for 5 inner folds of them.
    assert oncolite(["split", str(root), "--out", str(tmp_path / "m.json"), "--folds", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "(--val-fraction 0.1 makes the val side 1 of 5 parts of the training side)" in err
    assert "use --val-fraction 0.13 or more, or add data" in err and err.count("\n") == 1
    assert oncolite(["split", str(root), "--out", str(tmp_path / "m.json"), "--folds", "20", "--quiet"]) == 2
    assert "16 groups cannot make 20 folds (--folds 20); use --folds 16 or fewer" in capsys.readouterr().err
    assert oncolite(["split", str(root), "--out", str(tmp_path / "m.json"), "--folds", "2", "--val-fraction", "0.13",
                     "--quiet"]) == 0


def test_a_subtype_split_warns_which_fold_and_side_lack_which_labels(tmp_path, capfd):
    # 12 patients, 8 subtypes, 5 of them with a single patient: a patient-grouped split cannot
    # give every fold's training side every subtype.
    breakhis_tree(tmp_path / "data", mags=(40,))
    out = tmp_path / "subtype.json"
    assert oncolite(["split", str(tmp_path / "data"), "--label-scheme", "subtype", "--folds", "3",
                     "--val-fraction", "0.25", "--out", str(out), "--quiet"]) == 0
    err = capfd.readouterr().err
    manifest = json.loads(out.read_text())
    lacking = {(fold, side): [label for label, n in counts.items() if not n]
               for fold, sides in enumerate(manifest["summary"]) for side, counts in sides.items()}
    assert any(lacking[(fold, "train")] for fold in range(3))
    for (fold, side), missing in lacking.items():
        line = f"warning: fold {fold}: the {side} side has no images of {', '.join(missing)}; "
        assert (line in err) == bool(missing), (line, err)
    assert "`oncolite train` refuses it (fewer --folds or another --seed, or more data)" in err


def test_a_published_fold_with_no_malignant_training_image_is_warned_at_split_and_refused_at_train(tmp_path, capfd):
    from oncolite.train.train import check_training_labels

    paths = breakhis_tree(tmp_path, mags=(40,))
    table = write_folds_csv(tmp_path, paths, folds=2)
    rows = list(csv.reader(table.open()))
    for row in rows[1:]:
        if row[0] == "2":  # published fold 2: every malignant patient on the test side
            row[2] = "test" if "SOB_M_" in row[3] else "train"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = tmp_path / "published.json"
    assert oncolite(["split", str(table), "--use-folds-csv", "--out", str(out), "--json"]) == 0
    captured = capfd.readouterr()
    line = ("fold 1 (Folds.csv fold 2): the train side has no images of malignant; `oncolite train` refuses it "
            "(as Folds.csv assigns it, or more data)")
    assert f"warning: {line}\n" in captured.err and line in json.loads(captured.out)["warnings"]
    manifest = load_manifest(out)
    check_training_labels(manifest, 0)
    with pytest.raises(ManifestError, match="^" + re.escape(f"{out}: fold 1 has no training images of malignant; ")):
        check_training_labels(manifest, 1)
