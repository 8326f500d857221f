"""Quantization: flatten, QAT (settle, distil, resume), TFLite exports, op checks, accuracy gate.

One tiny run directory (MobileNetV2 alpha 0.35, 32 px, 3 synthetic classes) is built once per
module and shared; each test asserts on what the commands wrote into it.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train  # noqa: F401
import tf_keras as keras

from edge_runtime.atomic import write_json
from edge_runtime.metadata import read_metadata
from quantize import checks
from quantize.export import calibration_items, export_variants
from quantize.rundir import open_run
from train.config import load_config
from train.model import build_classifier, flatten, is_flat

SIZE = 32
LABELS = ["benign", "malignant", "normal"]
COLORS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def _image(path: Path, label: int, rng) -> None:
    pixels = rng.integers(0, 60, (40, 40, 3)).astype(np.int16)
    pixels[8:32, 8:32] += np.array(COLORS[label], dtype=np.int16)  # the class is the square's colour
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def _items(root: Path, rng) -> list[dict]:
    items = []
    for i in range(48):
        label = i % 3
        side = "test" if i < 9 else "val" if i < 18 else "train"
        path = root / "images" / f"{LABELS[label]}_{i}.png"
        _image(path, label, rng)
        items.append({"path": f"images/{path.name}", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                      "label": LABELS[label], "group": f"g{i}", "split": side, "meta": {}})
    return items


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qrun")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    manifest = {"format": "oncolite-manifest/1", "root": ".", "labels": LABELS, "seed": 0,
                "split": {"kind": "group", "folds": 1}, "audit": {}, "excluded": [], "items": _items(root, rng)}
    write_json(root / "manifest.json", manifest)
    config = load_config(overrides={"input_size": SIZE, "alpha": 0.35, "weights": None, "batch_size": 8,
                                    "qat": {"epochs": 1, "settle_steps": 8},
                                    "export": {"calibration_images": 12}})
    write_json(root / "config.json", {**config, "run": {"fold": None}})
    run = open_run(root)
    from train.data import load_arrays

    keras.utils.set_random_seed(0)

    x, y = load_arrays(run.sides()["train"], LABELS, run.prep)
    model = build_classifier(3, SIZE, SIZE, alpha=0.35, weights=None, dropout=0.0)
    for layer in model.layers:  # from scratch, BN's default 0.999 momentum never leaves its init (NOTES)
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.5
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=8, batch_size=8, verbose=0)
    (root / "models").mkdir()
    model.save(root / "models" / "float.keras")
    return root


@pytest.fixture(scope="module")
def exported(run_dir):
    run = open_run(run_dir)
    chosen = calibration_items(run.sides()["train"], 12, 0)
    return export_variants(run, ["fp32", "int8_ptq"], chosen, "int8")


def test_flatten_makes_a_nested_model_flat_and_quantizable():
    import tensorflow_model_optimization as tfmot

    base = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), alpha=0.35, include_top=False, weights=None)
    nested = keras.Sequential([base, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")])
    nested.build((None, SIZE, SIZE, 3))
    flat = flatten(nested)
    x = np.random.default_rng(1).uniform(-1, 1, (4, SIZE, SIZE, 3)).astype(np.float32)
    assert not is_flat(nested) and is_flat(flat)
    np.testing.assert_allclose(flat(x).numpy(), nested(x).numpy(), atol=1e-6)
    with pytest.raises(ValueError):
        tfmot.quantization.keras.quantize_model(nested)
    q = tfmot.quantization.keras.quantize_model(flat)
    assert q(x).shape == (4, 3)


def test_int8_export_has_int8_io_and_only_int8_ops(run_dir, exported):
    side = exported["int8_ptq"]["sidecar"]
    assert side["input"]["dtype"] == "int8" and side["output"]["dtype"] == "int8"
    assert side["input"]["scale"] > 0
    model_bytes = (run_dir / "models" / "int8_ptq.tflite").read_bytes()
    rows = checks.list_ops(model_bytes)
    assert rows and checks.float_ops(rows) == []
    assert {row["runs_as"] for row in rows} <= {"int8", "int8/int32", "int32"}
    assert exported["int8_ptq"]["float_ops"] == []


def test_float_op_check_refuses_a_float_model(run_dir, exported):
    fp32 = (run_dir / "models" / "fp32.tflite").read_bytes()
    with pytest.raises(checks.FloatOpError, match="still run in float"):
        checks.check_integer_only(fp32, "fp32.tflite")
    assert checks.check_integer_only(fp32, "fp32.tflite", allow_float_ops=True)


def test_metadata_and_sidecar_round_trip(run_dir, exported):
    for variant in ("fp32", "int8_ptq"):
        model_bytes = (run_dir / "models" / f"{variant}.tflite").read_bytes()
        sidecar = json.loads((run_dir / "models" / f"{variant}.json").read_text())
        meta = read_metadata(model_bytes)
        assert meta["labels"] == LABELS == sidecar["labels"]
        assert (meta["prep"].height, meta["prep"].width) == (SIZE, SIZE)
        assert meta["extra"]["variant"] == variant
        assert sidecar["sha256"] == hashlib.sha256(model_bytes).hexdigest()
        assert sidecar["size_bytes"] == len(model_bytes)
        assert sidecar["manifest_sha256"] == hashlib.sha256((run_dir / "manifest.json").read_bytes()).hexdigest()


def test_calibration_uses_only_training_images(run_dir, exported):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    side_of = {item["path"]: item["split"] for item in manifest["items"]}
    calibration = json.loads((run_dir / "models" / "int8_ptq.json").read_text())["calibration"]
    assert calibration["count"] == len(calibration["paths"]) == 12
    assert {side_of[path] for path in calibration["paths"]} == {"train"}


def test_finished_exports_are_not_redone(run_dir, exported):
    run = open_run(run_dir)
    again = export_variants(run, ["fp32", "int8_ptq"], calibration_items(run.sides()["train"], 12, 0), "int8")
    assert {v["status"] for v in again.values()} == {"up to date"}
    # other options invalidate the sidecar: a different calibration set is a different model
    other = export_variants(run, ["int8_ptq"], calibration_items(run.sides()["train"], 6, 0), "uint8")
    assert other["int8_ptq"]["status"] == "exported"
    assert other["int8_ptq"]["sidecar"]["input"]["dtype"] == "uint8"
    assert checks.float_ops(checks.list_ops((run_dir / "models" / "int8_ptq.tflite").read_bytes())) == []


def test_gate_report_int8_agrees_with_float(run_dir, exported):
    from quantize.debug import gate_report

    report = gate_report(open_run(run_dir), exported, gate=0.01)
    assert report["variants"]["fp32"]["agreement"] == 1.0
    assert report["variants"]["int8_ptq"]["agreement"] >= 0.8
    assert report["float"]["accuracy"] > 0.5  # the synthetic task was learned, so agreement means something


def test_qat_resume_and_int8_qat_export(run_dir):
    from quantize.qat import qat_settings, run_qat

    run = open_run(run_dir)
    # epochs=0: settle the ranges only, as if killed before the first epoch ended
    first = run_qat(run, qat_settings(run.config, epochs=0))
    assert first["epochs_run"] == 0 and first["settle_steps"] == 8
    assert (run_dir / "models" / "qat.keras").exists()
    resumed = run_qat(run, qat_settings(run.config, epochs=1), resume=True)
    assert resumed["resumed_after_epoch"] == 0 and resumed["epochs_run"] == 1
    history = resumed["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[0]["agreement"] >= 0.75  # settled ranges: the untrained QAT model already tracks float
    assert resumed["validation"]["agreement"] == max(h["agreement"] for h in history)  # best epoch kept
    # Every epoch checkpoints under a new name; only those state.json names are kept.
    state_dir = run_dir / "models" / "qat_state"
    state = json.loads((state_dir / "state.json").read_text())
    assert state["checkpoint"] == "epoch-1" and state["best_checkpoint"] in ("best-0", "best-1")
    assert {p.name[: -len(".index")] for p in state_dir.glob("*.index")} == {state["checkpoint"], state["best_checkpoint"]}
    result = export_variants(run, ["int8_qat"], calibration_items(run.sides()["train"], 12, 0), "int8")
    assert result["int8_qat"]["sidecar"]["input"]["dtype"] == "int8"
    assert result["int8_qat"]["float_ops"] == []
