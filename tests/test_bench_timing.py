"""Fair, complete timings (issue 17), tested for shape, never for speed: the exact uint8-pixel
input path, the edge bench's image-to-answer split, batch throughput and CPU features, and the
Keras timing's ways of calling (eager, tf.function, XLA) with batch throughput."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edge_models
from edge_runtime.pixels import PixelInput
from edge_runtime.preprocess import Preprocessing, normalize, quantize

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mean, std, dtype, scale, zero_point, kind", [
    (128, 128, np.int8, 1 / 128, 0, "xor128"),
    (128, 128, np.uint8, 1 / 128, 128, "pixels"),
    (0, 1, np.int8, 1.0, -128, "xor128"),
    (127.5, 127.5, np.int8, 2 / 255, -1, "table"),
    ((123.7, 116.3, 103.5), (58.4, 57.1, 57.4), np.int8, 0.0187, -14, "table"),
    (127.5, 127.5, np.float32, 0.0, 0, "table"),
])
def test_pixel_input_is_bit_identical_to_the_float_path(mean, std, dtype, scale, zero_point, kind):
    prep = Preprocessing(height=9, width=7, mean=mean, std=std)
    pixels = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    pixels[0, :3] = [[0, 0, 0], [255, 255, 255], [128, 127, 129]]
    fast = PixelInput(prep, dtype, scale, zero_point)
    x = normalize(pixels, prep)
    slow = quantize(x, scale, zero_point, dtype) if scale else x.astype(dtype)
    assert fast.kind == kind
    out = fast(pixels)
    assert out.dtype == np.dtype(dtype) and out.shape == (1, 9, 7, 3)
    assert np.array_equal(out[0], slow)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-images")
    rng = np.random.default_rng(2)
    paths = []
    for i in range(3):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("variant", ["int8", "uint8", "fp32"])
def test_edge_bench_reports_the_split_batch_and_cpu(tmp_path, images, variant):
    from edge_runtime.bench import STAGES, bench, format_report

    model = edge_models.model_file(tmp_path, variant)
    report = bench(model, images, (1,), warmup=1, runs=3, quiet=True, batch=4)
    result = report["threads"][0]
    stages = result["stages_ms"]
    assert set(STAGES) <= set(stages) and all(stages[s]["p50"] >= 0 for s in STAGES)
    assert stages["image_to_answer"]["p50"] >= stages["invoke"]["p50"]
    assert isinstance(stages["image_to_answer_over_invoke"], float)
    assert stages["input_path"] in ("pixels", "xor128", "table")
    batch = result["batch"]
    assert batch["batch"] == 4 and (batch["images_per_s"] > 0 if batch["supported"] else batch["reason"])
    device = report["device"]
    if "cpu_flags" in device:
        assert isinstance(device["cpu_flags"], list) and isinstance(device["int8_features"], str)
    text = "\n".join(format_report(report))
    assert "cpu " in text and "image to answer" in text and "batch 4" in text


def test_edge_bench_without_images_skips_decode(tmp_path):
    from edge_runtime.bench import bench, format_report

    report = bench(edge_models.model_file(tmp_path, "int8"), [], (1,), warmup=0, runs=2, quiet=True, batch=0)
    stages = report["threads"][0]["stages_ms"]
    assert stages["decode"] is None and stages["resize"] is None and stages["invoke"]["p50"] >= 0
    text = "\n".join(format_report(report))
    assert "pixels to answer (random pixels" in text and "image to answer" not in text
    assert "batch" not in report["threads"][0]


def test_bare_tflite_is_benched_with_given_labels(tmp_path, images, capsys):
    from edge_runtime.cli import main

    bare = tmp_path / "bare.tflite"
    bare.write_bytes(edge_models.tflite_bytes("int8"))
    assert main(["bench", str(bare), *images, "--runs", "2", "--warmup", "0", "--batch", "2"]) == 2
    assert "--labels" in capsys.readouterr().err
    assert main(["bench", str(bare), *images, "--runs", "2", "--warmup", "0", "--batch", "2",
                 "--labels", ",".join(edge_models.LABELS), "--mean", "127.5", "--std", "127.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["threads"][0]["stages_ms"]["invoke"]["p50"] >= 0


def test_keras_timing_has_every_way_of_calling_and_batch(tmp_path, images):
    from oncolite.benchmarks.latency import MODES

    path = tmp_path / "float.keras"
    edge_models.keras_model().save(path)
    prep = json.dumps(edge_models.PREP.to_dict())
    done = subprocess.run([sys.executable, "-m", "oncolite.benchmarks.latency", str(path), *images, "--prep", prep,
                           "--runs", "2", "--warmup", "1", "--batch", "4"],
                          capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout)
    assert set(r["modes"]) == set(MODES) and r["mode"] in MODES
    for mode, result in r["modes"].items():
        assert ("inference_ms" in result) != ("error" in result)
    assert r["inference_ms"] == r["modes"][r["mode"]]["inference_ms"]
    assert r["batch"]["batch"] == 4 and r["batch"]["images_per_s"] > 0 and r["batch"]["mode"] == r["mode"]


@pytest.mark.parametrize("variant", ["int8", "uint8", "fp32"])
def test_predict_the_server_and_the_bench_share_one_input_path(tmp_path, images, variant, monkeypatch):
    """The bench's decode, resize and quantize stages are EdgeModel.input_tensor split in three, the
    very path predict and the server run: uint8 pixels to the tensor, equal to the float path."""
    from edge_runtime.bench import time_stages
    from edge_runtime.model import EdgeModel
    from edge_runtime.predict import classify

    model = EdgeModel.load(edge_models.model_file(tmp_path, variant))
    for image in images:
        assert np.array_equal(model.input_tensor(image), model.quantize_input(model.prepare(image)[None]))
    seen = []
    through = EdgeModel.input_from_pixels
    monkeypatch.setattr(EdgeModel, "input_from_pixels", lambda self, pixels: seen.append(pixels.copy()) or through(self, pixels))
    classify(model, images[0], top_k=1)
    model.predict_file(images[0])
    time_stages(model, images[:1], warmup=0, runs=1)
    assert len(seen) == 3 and all(np.array_equal(pixels, seen[0]) for pixels in seen)


def test_the_shipped_int8_model_takes_pixels_without_arithmetic():
    """mean = std = 128 and input scale 1/128: the int8 input is p - 128, a bit flip, no float."""
    from edge_runtime.model import EdgeModel

    shipped = REPO / "models" / "busi" / "int8.tflite"
    if not shipped.is_file():
        pytest.skip(f"{shipped} not in this checkout")
    assert PixelInput.for_model(EdgeModel.load(shipped)).kind == "xor128"
