"""`oncolite evaluate` end to end on a tiny .keras model and a tiny .tflite over synthetic manifests."""

import csv
import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, matthews_corrcoef, roc_auc_score

from edge_runtime.atomic import write_bytes, write_json
from edge_runtime.preprocess import Preprocessing, preprocess
from oncolite.cli import main as oncolite
from oncolite.train import metrics

SIZE = 16
PREP = Preprocessing(height=SIZE, width=SIZE)
BINARY = ["benign", "malignant"]
THREE = ["benign", "malignant", "normal"]


def tiny_model(num_classes):
    import tf_keras as keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions",
                                 kernel_initializer=keras.initializers.RandomNormal(stddev=2.0))(x)
    return keras.Model(inputs, outputs)


def write_manifest(folder, labels, per_side, magnifications=None):
    """Images whose colour varies by label (not learnt: the model is random) on train/val/test sides;
    with `magnifications`, BreakHis-like items: a patient per group, a magnification per image."""
    rng = np.random.default_rng(len(labels))
    items = []
    for side, n in per_side.items():
        for i in range(n):
            label = labels[i % len(labels)]
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            pixels[..., labels.index(label)] //= 2
            rel = f"{side}/{label}/{i}.png"
            (folder / side / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / rel)
            meta = {}
            if magnifications:
                meta = {"magnification": magnifications[(i // 2) % len(magnifications)], "patient": f"{side}-{label}-{i // 4}"}
            items.append({"path": rel, "sha256": hashlib.sha256((folder / rel).read_bytes()).hexdigest(),
                          "label": label, "group": meta.get("patient", f"{side}-{i}"), "split": side, "meta": meta})
    manifest = {"format": "oncolite-manifest/1", "root": str(folder), "labels": labels, "seed": 0,
                "split": {"kind": "group", "folds": 1, "val_fraction": 0.2, "test_fold": 0},
                "audit": {"hash": "phash", "threshold": 6, "conflicts_excluded": 0}, "excluded": [],
                "items": items}
    return write_json(folder / "manifest.json", manifest), items


def side_arrays(folder, items, side, labels):
    chosen = [item for item in items if item["split"] == side]
    x = np.stack([preprocess(folder / item["path"], PREP) for item in chosen])
    y = np.array([labels.index(item["label"]) for item in chosen])
    return x, y


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    """A run directory with models/float.keras, manifest.json and train/history.csv (BreakHis-like)."""
    folder = tmp_path_factory.mktemp("binary")
    manifest, items = write_manifest(folder, BINARY, {"train": 12, "val": 40, "test": 40}, ["40X", "100X"])
    run = folder / "run"
    model = tiny_model(2)
    (run / "models").mkdir(parents=True)
    model.save(run / "models" / "float.keras")
    (run / "train").mkdir()
    write_json(run / "config.json", {"input_size": SIZE, "resample": "bilinear"})  # the settings evaluate reads
    (run / "train" / "history.csv").write_text(
        "phase,epoch,lr,loss,accuracy,val_loss,val_accuracy,val_mcc,seconds\n"
        "head,1,0.001,0.9,0.5,1.0,0.5,0.0,1.0\nfinetune,1,0.0001,0.7,0.6,0.8,0.6,0.2,1.0\n")
    probs = {side: (model.predict(side_arrays(folder, items, side, BINARY)[0], verbose=0),
                    side_arrays(folder, items, side, BINARY)[1]) for side in ("val", "test")}
    return {"folder": folder, "manifest": manifest, "run": run, "items": items, "probs": probs}


@pytest.fixture(scope="module")
def three_class_tflite(tmp_path_factory):
    """A .tflite with a sidecar (labels, preprocessing) and a 3-class manifest, plus direct interpreter outputs."""
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("three")
    manifest, items = write_manifest(folder, THREE, {"train": 9, "val": 6, "test": 30})
    data = tf.lite.TFLiteConverter.from_keras_model(tiny_model(3)).convert()
    path = write_bytes(folder / "models" / "fp32.tflite", data)
    write_json(path.with_suffix(".json"), {
        "format": "oncolite-model/1", "variant": "fp32", "labels": THREE, "preprocessing": PREP.to_dict(),
        "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data), "threshold": None})
    x, y = side_arrays(folder, items, "test", THREE)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
    rows = []
    for sample in x:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], sample[None])
        interpreter.invoke()
        rows.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0])
    return {"folder": folder, "manifest": manifest, "model": path, "probs": np.array(rows), "y": y}


def test_tflite_report_files_and_numbers_equal_scikit_learn(three_class_tflite, capsys):
    t = three_class_tflite
    out = t["folder"] / "report"
    code = oncolite(["evaluate", str(t["model"]), "--manifest", str(t["manifest"]), "--out", str(out),
                     "--bootstrap", "200", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    for name in ("metrics.json", "metrics.md", "predictions.csv", "confusion_matrix.png", "roc.png", "pr.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "metrics.json").read_text())
    assert printed["image_level"] == report["image_level"]
    probs, y = t["probs"], t["y"]
    pred = probs.argmax(axis=1)
    image = report["image_level"]["metrics"]
    assert image["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred))
    assert image["mcc"]["value"] == pytest.approx(matthews_corrcoef(y, pred))
    assert image["macro_roc_auc"]["value"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=1e-6)
    assert report["baseline"]["majority_class"] in THREE
    assert report["operating_point"] is None
    assert len(report["errors"]) == int(np.sum(pred != y))
    confidences = [e["confidence"] for e in report["errors"]]
    assert confidences == sorted(confidences, reverse=True)
    if report["errors"]:
        assert (out / "errors.png").is_file()
    markdown = (out / "metrics.md").read_text()
    assert "| mcc |" in markdown and "Majority-class baseline" in markdown
    with open(out / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(y)


def test_keras_run_dir_target_sensitivity_is_chosen_on_val_and_applied_unchanged(binary_run):
    b = binary_run
    p_val, y_val = b["probs"]["val"]
    p_test, y_test = b["probs"]["test"]
    on_val = metrics.choose_threshold(y_val == 1, p_val[:, 1], 0.9)
    on_test = metrics.choose_threshold(y_test == 1, p_test[:, 1], 0.9)
    assert on_val != pytest.approx(on_test, abs=1e-6)  # the test side's labels would choose differently

    code = oncolite(["evaluate", str(b["run"]), "--manifest", str(b["manifest"]), "--target-sensitivity", "0.9",
                     "--bootstrap", "100", "--quiet"])
    assert code == 0
    saved = json.loads((b["run"] / "threshold.json").read_text())
    assert saved["value"] == pytest.approx(on_val, abs=1e-6)
    assert saved == {"positive": "malignant", "value": saved["value"], "target_sensitivity": 0.9, "chosen_on": "val"}
    out = b["run"] / "eval" / "float"
    report = json.loads((out / "metrics.json").read_text())
    assert report["operating_point"]["val"]["sensitivity"] >= 0.9
    expected = metrics.sensitivity_specificity(y_test == 1, p_test[:, 1], saved["value"])
    image = report["image_level"]["metrics"]
    assert image["sensitivity"]["value"] == pytest.approx(expected["sensitivity"])
    assert image["specificity"]["value"] == pytest.approx(expected["specificity"])
    pred = (p_test[:, 1] >= saved["value"]).astype(int)
    assert image["mcc"]["value"] == pytest.approx(matthews_corrcoef(y_test, pred))
    assert (out / "training_curves.png").is_file()

    # Later evaluations of the run use the saved operating point by default (--threshold auto).
    assert oncolite(["evaluate", str(b["run"]), "--manifest", str(b["manifest"]), "--bootstrap", "0", "--quiet"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["operating_point"]["value"] == saved["value"]
    assert again["image_level"]["metrics"]["mcc"]["value"] == pytest.approx(image["mcc"]["value"])


def test_predict_items_equals_the_model_on_preprocessed_images(binary_run):
    from oncolite.train.predictor import predict_items

    b = binary_run
    tests = [{**item, "path": str(b["folder"] / item["path"])} for item in b["items"] if item["split"] == "test"]
    probs = predict_items(b["run"] / "models" / "float.keras", tests, batch_size=7, quiet=True)
    assert probs.shape == (40, 2)
    assert np.allclose(probs, b["probs"]["test"][0], atol=1e-5)


def test_breakhis_like_items_get_per_magnification_and_patient_level_reports(binary_run):
    b = binary_run
    out = b["folder"] / "argmax"
    code = oncolite(["evaluate", str(b["run"] / "models" / "float.keras"), "--manifest", str(b["manifest"]),
                     "--threshold", "none", "--out", str(out), "--bootstrap", "50", "--quiet"])
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["operating_point"] is None
    assert list(report["by_magnification"]) == ["40X", "100X"]
    assert report["by_magnification"]["40X"]["image_level"]["n"] == 20
    p_test, y_test = b["probs"]["test"]
    tests = [item for item in b["items"] if item["split"] == "test"]
    group_probs, group_y, ids = metrics.aggregate_by_group(p_test, [i["meta"]["patient"] for i in tests], y_test)
    patients = report["patient_level"]
    assert patients["patients"] == len(ids) == 20  # 40 images, 2 per patient
    assert patients["metrics"]["accuracy"]["value"] == pytest.approx(accuracy_score(group_y, group_probs.argmax(axis=1)))
    assert "## Per magnification" in (out / "metrics.md").read_text()


def test_threshold_on_a_three_class_task_is_a_usage_error(three_class_tflite, capsys):
    t = three_class_tflite
    code = oncolite(["evaluate", str(t["model"]), "--manifest", str(t["manifest"]), "--threshold", "0.3",
                     "--out", str(t["folder"] / "nope"), "--quiet"])
    assert code == 2
    assert "binary" in capsys.readouterr().err


@pytest.fixture(scope="module")
def fold_run(tmp_path_factory):
    """RUN/folds/1 as `oncolite train --fold 1` leaves it: config.json records fold 1; the manifest
    has two CV folds whose test sides differ in size (fold 0: the 6 `split` test images, fold 1:
    the 4 validation ones)."""
    folder = tmp_path_factory.mktemp("cv")
    manifest, items = write_manifest(folder, BINARY, {"train": 8, "val": 4, "test": 6})
    fold1 = {"train": "train", "val": "test", "test": "val"}
    data = json.loads(manifest.read_text())
    data["items"] = [{**item, "cv": [item["split"], fold1[item["split"]]]} for item in items]
    data["split"]["folds"] = 2
    run = folder / "run" / "folds" / "1"
    (run / "models").mkdir(parents=True)
    write_json(run / "manifest.json", data)
    tiny_model(2).save(run / "models" / "float.keras")
    write_json(run / "config.json", {"input_size": SIZE, "resample": "bilinear", "run": {"fold": 1}})
    return run


def test_a_cv_fold_run_is_evaluated_on_its_own_test_side_by_default(fold_run):
    assert oncolite(["evaluate", str(fold_run), "--bootstrap", "0", "--quiet"]) == 0
    report = json.loads((fold_run / "eval" / "float" / "metrics.json").read_text())
    assert report["fold"] == 1
    assert report["image_level"]["n"] == 4  # fold 0 (the manifest's `split`) would give 6
    assert "- side: test, fold 1" in (fold_run / "eval" / "float" / "metrics.md").read_text()


def test_a_hand_written_threshold_file_is_used(fold_run):
    write_json(fold_run / "threshold.json", {"positive": "malignant", "value": 0.0})  # no `chosen_on`
    try:
        out = fold_run / "eval" / "by-hand"
        assert oncolite(["evaluate", str(fold_run), "--out", str(out), "--bootstrap", "0", "--quiet"]) == 0
        report = json.loads((out / "metrics.json").read_text())
        assert report["operating_point"]["value"] == 0.0
        assert report["image_level"]["confusion_matrix"]["counts"][0][0] == 0  # p >= 0: all called malignant
        assert "(chosen on file)" in (out / "metrics.md").read_text()
    finally:
        (fold_run / "threshold.json").unlink()
