import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oncolite.benchmarks.near_duplicates import run as run_near_duplicate_benchmark
from oncolite.cli import main as oncolite
from tests.datatrees import breakhis_tree, folder_tree, idc_tree, near_copy, noise, save, write_folds_csv
from oncolite.train.audit import audit_dataset, report
from oncolite.train.datasets import load_dataset
from oncolite.train.duplicates import near_duplicate_pairs, pack_hashes

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def planted(tmp_path):
    """Class folders with an exact duplicate, a near duplicate across labels, and broken files."""
    root = folder_tree(tmp_path / "data", {"a": 4, "b": 3})
    save(root / "a" / "copy of a (2).png", noise(0 + 1))  # same pixels as a (2)
    save(root / "b" / "brighter a (1).png", near_copy(noise(0)))  # a (1) under another label
    good = (root / "a" / "a (3).png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "b" / "text.png").write_text("not a picture")
    return root


def test_planted_duplicates_conflicts_and_broken_files(planted):
    audit = audit_dataset(load_dataset(planted), threshold=6, workers=1)
    rep = report(audit)
    assert rep["images"] == 11 and rep["readable"] == 9
    assert {Path(u["path"]).name for u in rep["unreadable"]} == {"truncated.png", "text.png"}
    assert rep["exact_duplicates"]["groups"] == [["a/a (2).png", "a/copy of a (2).png"]]
    near = {(p["a"], p["b"]) for p in rep["near_duplicates"]["listed"]}
    assert ("a/a (1).png", "b/brighter a (1).png") in near
    assert rep["conflicts"]["groups"] == 1
    assert [im["path"] for im in rep["conflicts"]["list"][0]["images"]] == ["a/a (1).png", "b/brighter a (1).png"]
    assert rep["duplicate_groups"]["groups"] == 2 and rep["counts"] == {"a": 5, "b": 6}


def test_parallel_hashing_gives_the_same_groups(tmp_path):
    root = folder_tree(tmp_path, {"a": 40, "b": 40})
    save(root / "b" / "dup.png", noise(3))
    one = audit_dataset(load_dataset(root), workers=1)
    two = audit_dataset(load_dataset(root), workers=2)
    assert [f.pixel_sha256 for f in one.facts] == [f.pixel_sha256 for f in two.facts]
    assert (one.group == two.group).all() and len(two.conflicts) == 1


def test_cli_writes_json_markdown_png_and_its_command(planted, tmp_path, capsys):
    out = tmp_path / "report"
    assert oncolite(["audit", str(planted), "--out", str(out), "--hash-distance", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["conflicts"] == 1 and summary["unreadable"] == 2
    rep = json.loads((out / "audit.json").read_text())
    assert rep["settings"]["threshold"] == 4
    md = (out / "audit.md").read_text()
    assert f"oncolite audit {planted} --out {out} --hash-distance 4" in md.split("## Classes")[0]
    assert (out / "intensity.png").read_bytes()[:4] == b"\x89PNG"


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), threshold=st.integers(0, 10), bits=st.sampled_from([16, 64, 256]))
def test_near_duplicate_search_equals_brute_force(seed, threshold, bits):
    rng = np.random.default_rng(seed)
    hashes = rng.random((120, bits)) < 0.5
    for k in range(0, 60, 3):  # plant near and identical copies
        hashes[k + 60] = hashes[k]
        hashes[k + 60, rng.choice(bits, size=rng.integers(0, threshold + 2), replace=False)] ^= True
    i, j, d = near_duplicate_pairs(hashes, threshold)
    words = pack_hashes(hashes)
    dist = np.bitwise_count(words[:, None, :] ^ words[None, :, :]).sum(axis=2)
    bi, bj = np.nonzero(np.triu(dist <= threshold, 1))
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(bi.tolist(), bj.tolist()))
    assert (dist[i, j] == d).all()


def test_benchmark_finds_every_planted_pair():
    result = run_near_duplicate_benchmark(n=20_000, threshold=6, planted=200)
    assert result["recall"] == 1.0 and result["pairs_found"] >= 200


@pytest.mark.slow
def test_shipped_busi_conflict_and_near_duplicates():
    audit = audit_dataset(load_dataset(REPO / "data" / "busi"), threshold=6, workers=2)
    rep = report(audit)
    conflicts = [{im["path"] for im in g["images"]} for g in rep["conflicts"]["list"]]
    assert {"benign/benign (399).png", "malignant/malignant (93).png"} in conflicts
    assert 180 <= rep["near_duplicates"]["pairs"] <= 240


# ---------------------------------------------------------------- issue 20: histology sets

def test_a_patient_crossing_the_published_folds_is_reported(tmp_path, capfd):
    paths = breakhis_tree(tmp_path, mags=(40,))
    table = write_folds_csv(tmp_path, paths, folds=3)
    text = table.read_text().splitlines()
    # One image of patient 14-2523 moves to the other side of published fold 2.
    k = next(i for i, line in enumerate(text) if line.startswith("2,") and "14-2523-40-001" in line)
    text[k] = text[k].replace(",train,", ",test,") if ",train," in text[k] else text[k].replace(",test,", ",train,")
    table.write_text("\n".join(text) + "\n")
    out = tmp_path / "report"
    assert oncolite(["audit", str(table), "--out", str(out), "--json"]) == 0
    captured = capfd.readouterr()
    assert json.loads(captured.out)["patients_crossing_folds"] == [{"patient": "14-2523", "folds": [2]}]
    assert "warning: patient 14-2523 crosses published folds [2]\n" in captured.err
    rep = json.loads((out / "audit.json").read_text())
    assert rep["published_folds"] == {"folds": [1, 2, 3], "patients_crossing_folds": [{"patient": "14-2523", "folds": [2]}]}
    md = (out / "audit.md").read_text()
    assert "patients on both sides of a fold: 1" in md and "- patient 14-2523: folds 2" in md


def test_histology_audits_count_patients_and_magnifications(tmp_path):
    breakhis_tree(tmp_path / "breakhis", mags=(40, 100), per_mag=2)
    rep = report(audit_dataset(load_dataset(tmp_path / "breakhis"), workers=1))
    assert rep["patients"] == {"total": 12, "per_class": {"benign": 6, "malignant": 6}}
    assert rep["magnifications"] == {"40X": {"benign": 12, "malignant": 12}, "100X": {"benign": 12, "malignant": 12}}
    idc_tree(tmp_path / "idc", patients=("10253", "8863", "9036"))
    rep = report(audit_dataset(load_dataset(tmp_path / "idc"), workers=1))
    assert rep["patients"] == {"total": 3, "per_class": {"non_idc": 3, "idc": 3}} and "magnifications" not in rep
    out = tmp_path / "report"
    assert oncolite(["audit", str(tmp_path / "breakhis"), "--out", str(out), "--quiet"]) == 0
    md = (out / "audit.md").read_text()
    assert "12 patients." in md and "| benign | 24 | 6 |" in md and "| 100X | 12 | 12 | 24 |" in md


def test_an_audit_without_patients_shows_none(planted):
    rep = report(audit_dataset(load_dataset(planted), workers=1))
    assert not {"patients", "magnifications", "published_folds"} & rep.keys()
