"""`oncolite benchmark --float MODEL A.tflite ... --data DIR | --manifest M` (issue 17): a small
Keras classifier built here, a .tflite exported by oncolite from it, and bare .tflite files
from plain tf.lite.TFLiteConverter (no metadata) with --labels: the same report as a run's."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from test_byo_export import LABELS, SIZE, image_folder, small_classifier

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def bare_tflite(model, path, int8: bool):
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        rng = np.random.default_rng(0)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([rng.uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)]
                                                    for _ in range(8))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.int8
    path.write_bytes(converter.convert())
    return path


def benchmark(*argv) -> int:
    from oncolite.cli import main

    return main(["benchmark", *map(str, argv)])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo-bench")
    data = image_folder(root / "images", per_class=6)
    model = small_classifier()
    model.save(root / "mine.h5")
    return root, data, model


def test_float_and_bare_tflite_files_on_a_folder(setup, capsys):
    root, data, model = setup
    fp32 = bare_tflite(model, root / "plain_fp32.tflite", int8=False)
    int8 = bare_tflite(model, root / "plain_int8.tflite", int8=True)
    assert benchmark("--float", root / "mine.h5", fp32, int8, "--data", data, "--labels", ",".join(LABELS),
                     "--no-timing", "--bootstrap", "20", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    v = report["variants"]
    assert {"keras_float", "tflite_plain_fp32", "tflite_plain_int8", "majority_baseline"} <= set(v)
    assert v["tflite_plain_fp32"]["agreement_with_float"] == 1.0
    for name in ("tflite_plain_fp32", "tflite_plain_int8"):
        assert "mcnemar" in v[name] and "ci" in v[name] and v[name]["size_bytes"] > 0
    assert report["split"]["n_test"] == 12 and report["split"]["kind"] == "given"
    assert isinstance(report["flipped"]["tflite_plain_int8"], list)
    out = root / "mine_benchmark" / "benchmark"
    assert (out / "report.md").is_file() and (out / "report.json").is_file()


def test_missing_images_get_a_one_line_reason(setup, capsys):
    root, data, model = setup
    # The folder gives the labels: a bare model is read with them.
    fp32 = bare_tflite(model, root / "plain2.tflite", int8=False)
    assert benchmark("--float", root / "mine.h5", fp32, "--no-timing") == 2
    err = capsys.readouterr().err.strip()
    assert "--data DIR" in err and len(err.splitlines()) == 1


def test_exported_int8_with_timing_and_a_saved_model(setup, tmp_path, capsys):
    """oncolite's own export of a SavedModel, timed: Keras ways of calling, batch, image-to-answer split."""
    from oncolite.cli import main

    root, data, model = setup
    saved = tmp_path / "saved"
    model.save(saved, save_format="tf")
    # mean = std = 128: with the calibration's black and white pixels the input scale is 1/128,
    # zero point 0, and the device's input is pixels - 128 exactly (no lookup, no float).
    norm = ["--mean", "128", "--std", "128"]
    assert main(["export", str(saved), "--data", str(data), "--variants", "int8_ptq", "--calibration-images", "4",
                 *norm, "--quiet"]) == 0
    int8 = tmp_path / "saved_export" / "int8_ptq.tflite"
    assert benchmark("--float", saved, int8, "--data", data, "--threads", "1", "--runs", "2", "--warmup", "1",
                     "--bootstrap", "20", "--out", tmp_path / "bench", *norm) == 0
    text = capsys.readouterr().out
    # report.md, printed: the CPU's int8 features, the float model's ways of calling, the split.
    assert "- int8 features: " in text and "× faster than fastest float @1" in text and "### Image to answer" in text
    report = json.loads((tmp_path / "bench" / "benchmark" / "report.json").read_text())
    f, q = report["variants"]["keras_float"], report["variants"]["tflite_int8_ptq"]
    assert f["keras_mode"]["1"] in ("eager", "tf_function", "xla") and "eager" in f["keras_modes"]["1"]
    assert f["latency_ms"]["1"] == f["keras_modes"]["1"][f["keras_mode"]["1"]]["inference_ms"]
    assert f["batch"]["1"]["batch"] == 32
    assert set(q["stages_ms"]["1"]) >= {"decode", "resize", "quantize", "invoke", "read_out", "image_to_answer"}
    assert q["stages_ms"]["1"]["input_path"] == "xor128"
    assert "1" in q["speedup_vs_keras"] and "1" in q["speedup_vs_keras_eager"]
    assert q["uncertain_margin"] is not None
