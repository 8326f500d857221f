"""Histopathology end to end, through the real commands, on generated trees with the real naming.

BreakHis: `oncolite split` groups by patient -> `oncolite train` -> `oncolite evaluate
--target-sensitivity` chooses the threshold on the validation side and reports per magnification
and per patient -> `oncolite export` stores the threshold in the models -> `python -m edge_runtime
predict` decides with it. IDC: split by patient -> a tiny int8 model -> `oncolite slidemap`.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from datatrees import breakhis_tree, idc_tree
from edge_runtime.idc import IDC_POSITIVE, parse_idc_name
from edge_runtime.metadata import read_metadata
from edge_runtime.model import EdgeModel
from edge_runtime.slidemap import HEADER, PATCH_SIZE
from oncolite.train.metrics import choose_threshold

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
TARGET_SENSITIVITY = 0.9
# A backbone from scratch gives the same output for every image (its signal fades to ~1e-11
# through the untrained blocks), which would let any side choose the same threshold. The
# threshold checks need image-dependent outputs: the shipped ImageNet weights at 32 px, head only.
BREAKHIS_MODEL = ["alpha=1.0", "weights=imagenet", "input_size=32", "head_epochs=1", "finetune_epochs=0",
                  "head_lr=0.01", "batch_size=16"]
# The slide map only needs a working int8 model: the tiniest one.
IDC_MODEL = ["alpha=0.35", "weights=null", "input_size=32", "head_epochs=1", "finetune_epochs=0", "batch_size=16"]
IDC_PATIENTS = ("10253", "8863", "9036", "12241", "13916", "16165")
SLIDEMAP_GAP = 10  # px between the predicted and the ground-truth panels


def run(module: str, *argv, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", module, *map(str, argv)], env=ENV, cwd=cwd,
                            capture_output=True, text=True)
    assert result.returncode == 0, f"{module} {' '.join(map(str, argv))} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def oncolite(*argv, cwd: Path) -> subprocess.CompletedProcess:
    return run("oncolite", *argv, cwd=cwd)


def with_sets(pairs) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def breakhis_patient(path) -> str:
    """`SOB_B_A-14-22549AB-40-001.png` -> `14-22549AB`, read here independently of the loader."""
    return "-".join(Path(path).stem.split("-")[1:3])


def breakhis_magnification(path) -> str:
    return Path(path).stem.split("-")[3]


def sides_per_group(manifest: dict, group_of) -> list[dict[str, set]]:
    """For each fold: group -> the sides its images are on."""
    folds = manifest["split"]["folds"]
    out = []
    for fold in range(folds):
        sides = defaultdict(set)
        for item in manifest["items"]:
            sides[group_of(item["path"])].add(item["cv"][fold] if folds > 1 else item["split"])
        out.append(dict(sides))
    return out


def read_predictions(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- BreakHis

@pytest.fixture(scope="module")
def breakhis(tmp_path_factory):
    """One BreakHis run through split, train, evaluate and export (the slow part, done once)."""
    work = tmp_path_factory.mktemp("breakhis")
    paths = breakhis_tree(work / "data", mags=(40, 100), per_mag=2)
    oncolite("split", work / "data", "--folds", 3, "--val-fraction", 0.25, "--out", work / "manifest.json",
             "--quiet", cwd=work)
    oncolite("train", "--manifest", work / "manifest.json", "--run", work / "run", "--dataset", "breakhis",
             *with_sets(BREAKHIS_MODEL), "--quiet", cwd=work)
    evaluated = oncolite("evaluate", work / "run", "--target-sensitivity", TARGET_SENSITIVITY, "--bootstrap", 0,
                         "--json", cwd=work)
    oncolite("export", work / "run", "--variants", "fp32,int8_ptq", "--quiet", cwd=work)
    return SimpleNamespace(work=work, paths=paths, run=work / "run",
                           manifest=json.loads((work / "manifest.json").read_text()),
                           report=json.loads(evaluated.stdout),
                           threshold=json.loads((work / "run" / "threshold.json").read_text()))


def side_items(manifest: dict, side: str) -> list[dict]:
    return [item for item in manifest["items"] if item["split"] == side]


def test_breakhis_split_keeps_every_patient_on_one_side_of_every_fold(breakhis):
    manifest = breakhis.manifest
    assert manifest["dataset"]["layout"] == "breakhis"
    assert manifest["labels"] == ["benign", "malignant"]
    assert len(manifest["items"]) == len(breakhis.paths)
    assert manifest["split"]["folds"] == 3
    for fold, sides in enumerate(sides_per_group(manifest, breakhis_patient)):
        crossing = {patient: s for patient, s in sides.items() if len(s) > 1}
        assert not crossing, f"fold {fold}: patients on two sides {crossing}"
        assert {side for s in sides.values() for side in s} == {"train", "val", "test"}
    for item in manifest["items"]:
        assert item["meta"]["patient"] == breakhis_patient(item["path"])
        assert str(item["meta"]["magnification"]) == breakhis_magnification(item["path"])


def test_threshold_is_chosen_on_the_validation_side_and_applied_unchanged_on_test(breakhis):
    threshold, report = breakhis.threshold, breakhis.report
    assert threshold["positive"] == "malignant" and threshold["chosen_on"] == "val"
    assert threshold["target_sensitivity"] == TARGET_SENSITIVITY
    assert report["side"] == "test"
    assert report["operating_point"]["value"] == threshold["value"]

    # Our own choice from the validation predictions (the exported fp32 model: the float model's
    # weights, outputs within 1e-7 of it), against the one the test side would have given.
    model = EdgeModel.load(breakhis.run / "models" / "fp32.tflite")
    pos = model.labels.index("malignant")
    root = breakhis.work / "data"

    def choice(side):
        items = side_items(breakhis.manifest, side)
        p = np.array([model.predict_file(root / item["path"])[pos] for item in items])
        return choose_threshold([item["label"] == "malignant" for item in items], p, TARGET_SENSITIVITY)

    on_val, on_test = choice("val"), choice("test")
    assert abs(on_val - on_test) > 1e-3, "val and test would choose the same threshold: the check cannot tell them apart"
    assert threshold["value"] == pytest.approx(on_val, abs=1e-5)
    assert report["operating_point"]["val"]["sensitivity"] >= TARGET_SENSITIVITY

    # Applied unchanged on test: every test prediction is `malignant iff p >= threshold`.
    rows = read_predictions(Path(report["out"]) / "predictions.csv")
    assert len(rows) == len(side_items(breakhis.manifest, "test")) == report["image_level"]["n"]
    for row in rows:
        expected = "malignant" if float(row["p_malignant"]) >= threshold["value"] else "benign"
        if abs(float(row["p_malignant"]) - threshold["value"]) > 1e-6:  # the CSV rounds to 6 decimals
            assert row["pred"] == expected, row


def test_breakhis_report_has_per_magnification_and_patient_level_sections(breakhis):
    report, threshold = breakhis.report, breakhis.threshold["value"]
    test = side_items(breakhis.manifest, "test")
    assert set(report["by_magnification"]) == {"40", "100"}
    for mag, sub in report["by_magnification"].items():
        at_mag = [item for item in test if breakhis_magnification(item["path"]) == mag]
        assert sub["image_level"]["n"] == len(at_mag)
        assert sub["patient_level"]["patients"] == len({breakhis_patient(item["path"]) for item in at_mag})

    # Patient level: each patient's mean image probability, decided at the same threshold.
    rows = read_predictions(Path(report["out"]) / "predictions.csv")
    by_patient = defaultdict(list)
    for row in rows:
        by_patient[breakhis_patient(row["path"])].append((float(row["p_malignant"]), row["true"]))
    correct = [(np.mean([p for p, _ in v]) >= threshold) == (v[0][1] == "malignant") for v in by_patient.values()]
    patients = report["patient_level"]
    assert patients["patients"] == len(by_patient) == len({breakhis_patient(item["path"]) for item in test})
    assert patients["metrics"]["accuracy"]["value"] == pytest.approx(np.mean(correct))

    markdown = (Path(report["out"]) / "metrics.md").read_text()
    assert "## Patient level" in markdown and "## Per magnification" in markdown
    assert "chosen on val" in markdown


def test_export_stores_the_threshold_in_every_variant(breakhis):
    expected = {"positive": breakhis.threshold["positive"], "value": breakhis.threshold["value"]}
    for variant in ("fp32", "int8_ptq"):
        path = breakhis.run / "models" / f"{variant}.tflite"
        assert read_metadata(path.read_bytes())["extra"]["threshold"] == expected
        assert json.loads(path.with_suffix(".json").read_text())["threshold"] == expected
        assert EdgeModel.load(path).threshold == expected


def image_between(model: EdgeModel, threshold: dict, candidates: list[Path], work: Path) -> tuple[Path, float]:
    """An image whose positive probability lies strictly between the threshold and 0.5, where the
    threshold's decision and argmax's differ: a dataset image if one is there, else a blend of two
    images whose probabilities lie on either side (the probability moves continuously along it)."""
    pos = model.labels.index(threshold["positive"])
    low, high = sorted((threshold["value"], 0.5))
    margin = min(1e-4, (high - low) / 4)
    scored = sorted((float(model.predict_file(path)[pos]), path) for path in candidates)
    inside = [(p, path) for p, path in scored if low + margin < p < high - margin]
    if inside:  # the one farthest from both ends
        p, path = min(inside, key=lambda pair: abs(pair[0] - (low + high) / 2))
        return path, p
    below = [path for p, path in scored if p <= low + margin]
    above = [path for p, path in scored if p >= high - margin]
    assert below and above, f"no image falls near [{low}, {high}]: probabilities {[p for p, _ in scored]}"
    a, b = (np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) for path in (below[-1], above[0]))
    t_low, t_high = 0.0, 1.0
    blend = work / "between.png"
    for _ in range(30):
        t = (t_low + t_high) / 2
        Image.fromarray(np.round((1 - t) * a + t * b).astype(np.uint8)).save(blend)
        p = float(model.predict_file(blend)[pos])
        if low + margin < p < high - margin:
            return blend, p
        t_low, t_high = (t, t_high) if p <= low + margin else (t_low, t)
    raise AssertionError(f"no blend lands between {low} and {high}")


def json_lines(text: str) -> list[dict]:
    """`predict --json` output: one JSON record per line (model, then one per file, then a summary)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_edge_predict_applies_the_stored_threshold_where_argmax_would_not(breakhis):
    model_path = breakhis.run / "models" / "fp32.tflite"
    model = EdgeModel.load(model_path)
    threshold = model.threshold
    image, p = image_between(model, threshold, sorted(breakhis.paths), breakhis.work)
    by_threshold = threshold["positive"] if p >= threshold["value"] else "benign"
    by_argmax = "malignant" if p > 0.5 else "benign"
    assert by_threshold != by_argmax  # the image was chosen so that the two rules disagree

    out = json_lines(run("edge_runtime", "predict", model_path, image, "--json", cwd=breakhis.work).stdout)
    assert out[0]["type"] == "model" and out[0]["threshold"] == threshold
    (result,) = [r for r in out if r["type"] == "result"]
    assert result["probabilities"]["malignant"] == pytest.approx(p, abs=1e-6)
    assert result["label"] == by_threshold

    # The int8 model carries the same operating point and decides by it too.
    int8 = json_lines(run("edge_runtime", "predict", breakhis.run / "models" / "int8_ptq.tflite",
                          *sorted(breakhis.paths)[:8], "--json", cwd=breakhis.work).stdout)
    assert int8[0]["threshold"] == threshold
    for result in [r for r in int8 if r["type"] == "result"]:
        p8 = result["probabilities"]["malignant"]
        assert result["label"] == ("malignant" if p8 >= threshold["value"] else "benign"), result


# --------------------------------------------------------------------------- IDC

def test_idc_patient_tree_splits_by_patient_and_gets_a_slide_map(tmp_path):
    data = tmp_path / "IDC_regular_ps50_idx5"
    planted = idc_tree(data, patients=IDC_PATIENTS, per_class=3)
    oncolite("split", data, "--folds", 3, "--val-fraction", 0.2, "--out", tmp_path / "manifest.json", "--quiet",
             cwd=tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["dataset"]["layout"] == "idc"
    # model output order follows the file names' class<0|1>, so "idc" is the positive class
    assert manifest["labels"] == ["non_idc", "idc"]
    assert len(manifest["items"]) == len(planted)
    for fold, sides in enumerate(sides_per_group(manifest, lambda path: parse_idc_name(path)[0])):
        assert set(sides) == set(IDC_PATIENTS)
        assert all(len(s) == 1 for s in sides.values()), f"fold {fold}: a patient on two sides {sides}"
    assert all(item["group"] == parse_idc_name(item["path"])[0] for item in manifest["items"])

    oncolite("train", "--manifest", tmp_path / "manifest.json", "--run", tmp_path / "run", "--dataset", "idc",
             *with_sets(IDC_MODEL), "--quiet", cwd=tmp_path)
    oncolite("export", tmp_path / "run", "--variants", "int8_ptq", "--quiet", cwd=tmp_path)
    model = tmp_path / "run" / "models" / "int8_ptq.tflite"
    assert IDC_POSITIVE in EdgeModel.load(model).labels

    patient = IDC_PATIENTS[0]
    out = tmp_path / "map.png"
    summary = json.loads(oncolite("slidemap", data / patient, "--model", model, "--out", out, "--json",
                                  cwd=tmp_path).stdout)
    mine = [(x, y, cls) for p, x, y, cls in planted if p == patient]
    left, top = min(x for x, _, _ in mine), min(y for _, y, _ in mine)
    width = max(x for x, _, _ in mine) - left + PATCH_SIZE
    height = max(y for _, y, _ in mine) - top + PATCH_SIZE
    assert (summary["patient"], summary["patches"], summary["width"], summary["height"]) == (patient, len(mine), width, height)
    assert summary["true_idc"] == sum(cls for _, _, cls in mine)

    image = Image.open(out)
    assert image.format == "PNG"
    assert image.size == (2 * width + SLIDEMAP_GAP, height + HEADER)
    # The ground-truth panel tints each planted patch at its own place: red for IDC, blue for none.
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    for x, y, cls in mine:
        col, row = width + SLIDEMAP_GAP + x - left, HEADER + y - top
        red, _, blue = pixels[row:row + PATCH_SIZE, col:col + PATCH_SIZE].reshape(-1, 3).mean(axis=0)
        assert (red > blue + 40) if cls else (blue > red + 40), (x, y, cls, red, blue)
