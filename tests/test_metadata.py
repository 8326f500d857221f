"""Standard TFLite metadata: written by edge_runtime.metadata, read back, and read by MediaPipe."""

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edge_models import LABELS, PREP, model_with_metadata, tflite_bytes, write_images
from edge_runtime.errors import ModelError
from edge_runtime.metadata import EXTRA_FILE, LABELS_FILE, metadata_buffer, read_metadata, write_metadata
from edge_runtime.preprocess import Preprocessing

THRESHOLD = {"positive": "malignant", "value": 0.25}


def test_round_trip_labels_preprocessing_and_extra():
    prep = Preprocessing(height=16, width=16, mean=(120.0, 110.0, 100.0), std=(60.0, 50.0, 40.0), resample="bicubic")
    model = write_metadata(tflite_bytes("int8"), name="busi int8", description="three classes", labels=LABELS,
                           prep=prep, extra={"variant": "int8_qat", "threshold": THRESHOLD})
    meta = read_metadata(model)
    assert meta["name"] == "busi int8" and meta["description"] == "three classes"
    assert meta["labels"] == LABELS
    assert meta["prep"] == prep
    assert meta["extra"]["threshold"] == THRESHOLD and meta["extra"]["variant"] == "int8_qat"
    assert meta["min_parser_version"] == "1.0.0"


def test_metadata_is_the_standard_layout():
    model = model_with_metadata("int8")
    raw = metadata_buffer(model)
    assert model[4:8] == b"TFL3" and raw[4:8] == b"M001"
    with zipfile.ZipFile(io.BytesIO(model)) as archive:
        infos = {i.filename: i for i in archive.infolist()}
        assert set(infos) == {LABELS_FILE, EXTRA_FILE}
        # Stored, not compressed: MediaPipe maps associated files straight out of the model.
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos.values())
        assert archive.read(LABELS_FILE).decode().split() == LABELS


def test_writing_twice_replaces_the_metadata():
    once = model_with_metadata("fp32")
    twice = write_metadata(once, name="renamed", description="d", labels=["a", "b", "c"], prep=PREP, extra={})
    meta = read_metadata(twice)
    assert meta["name"] == "renamed" and meta["labels"] == ["a", "b", "c"]
    from ai_edge_litert import schema_py_generated as schema

    entries = schema.Model.GetRootAs(twice, 0)
    names = [entries.Metadata(i).Name() for i in range(entries.MetadataLength())]
    assert names.count(b"TFLITE_METADATA") == 1
    assert entries.BuffersLength() == schema.Model.GetRootAs(once, 0).BuffersLength()  # no orphan buffer


def test_model_with_metadata_still_runs_identically():
    from ai_edge_litert.interpreter import Interpreter

    outputs = []
    for data in (tflite_bytes("int8"), model_with_metadata("int8")):
        it = Interpreter(model_content=data)
        it.allocate_tensors()
        d = it.get_input_details()[0]
        it.set_tensor(d["index"], np.arange(16 * 16 * 3, dtype=np.int64).reshape(d["shape"]).astype(np.int8))
        it.invoke()
        outputs.append(it.get_tensor(it.get_output_details()[0]["index"]))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_plain_model_has_no_metadata():
    assert read_metadata(tflite_bytes("fp32")) is None


def test_labels_must_be_single_lines():
    with pytest.raises(ValueError, match="single lines"):
        write_metadata(tflite_bytes("fp32"), name="x", description="", labels=["a\nb", "c", "d"], prep=PREP)


def test_missing_label_file_is_reported():
    model = model_with_metadata("fp32")
    flat_only = model[:_zip_start(model)]
    with pytest.raises(ModelError, match="labels.txt"):
        read_metadata(flat_only)


def _zip_start(model: bytes) -> int:
    with zipfile.ZipFile(io.BytesIO(model)) as archive:
        return min(i.header_offset for i in archive.infolist())


REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_UINT8 = REPO_ROOT / "models" / "busi" / "int8_uint8.tflite"
BUSI = REPO_ROOT / "data" / "busi"
MEDIAPIPE_VENV = REPO_ROOT / ".venv-mediapipe" / "bin" / "python"

# Run by MediaPipe's own Python: every category's score per image, as JSON Lines.
MEDIAPIPE_CHECK = """
import json, sys
import mediapipe as mp
from mediapipe.tasks.python import vision
from mediapipe.tasks.python.core.base_options import BaseOptions
model, *images = sys.argv[1:]
options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=model), max_results=-1)
with vision.ImageClassifier.create_from_options(options) as classifier:
    for path in images:
        result = classifier.classify(mp.Image.create_from_file(path))
        print(json.dumps({c.category_name: c.score for c in result.classifications[0].categories}))
"""


def _mediapipe_python() -> str | None:
    """This interpreter if it has mediapipe, else $ONCOLITE_MEDIAPIPE_PYTHON, else the repo's
    .venv-mediapipe (scripts/test makes it): mediapipe needs absl-py 2 and tfmot absl-py 1, so
    it usually lives in a venv of its own."""
    import importlib.util

    if importlib.util.find_spec("mediapipe") is not None:
        return sys.executable
    return os.environ.get("ONCOLITE_MEDIAPIPE_PYTHON") or (str(MEDIAPIPE_VENV) if MEDIAPIPE_VENV.is_file() else None)


def mediapipe_scores(tmp_path, model_path, images) -> list[dict]:
    """{label: score} per image from MediaPipe Tasks' ImageClassifier, in a process of its own."""
    python = _mediapipe_python()
    if not python:
        pytest.skip(f"mediapipe not importable here and no {MEDIAPIPE_VENV}: run `bash scripts/test` (it makes "
                    "that venv) or set ONCOLITE_MEDIAPIPE_PYTHON to a Python that has mediapipe")
    script = tmp_path / "mediapipe_check.py"
    script.write_text(MEDIAPIPE_CHECK)
    done = subprocess.run([python, str(script), str(model_path), *map(str, images)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_mediapipe_image_classifier_reads_our_metadata(tmp_path):
    from edge_models import model_file
    from edge_runtime.model import EdgeModel

    model_path = model_file(tmp_path, "uint8")  # MediaPipe refuses int8 inputs, takes uint8
    # Images at the model's size: MediaPipe and our runtime resize differently.
    images = write_images(tmp_path / "images", n=4, size=PREP.width)
    ours = EdgeModel.load(model_path)
    expected = [ours.labels[ours.decide(ours.predict_file(p))] for p in images]
    shown = mediapipe_scores(tmp_path, model_path, images)
    assert [max(s, key=s.get) for s in shown] == expected  # label names come from our labels.txt


def test_mediapipe_agrees_with_our_runtime_on_the_shipped_uint8_model(tmp_path):
    """The shipped int8_uint8 model, as an Android app would open it with MediaPipe Tasks, on BUSI
    scans of every class: the same top-1 as our edge runtime, probabilities within two output
    quantization steps (2/256: MediaPipe reports the dequantized softmax as it is, our runtime
    renormalizes it to sum to 1, which moves a value by at most the sum's rounding, a step or two).
    Both get the same pixels: each scan resized by our preprocessing and saved losslessly at the
    model's input size, since MediaPipe's own resize (bilinear, no antialiasing) is not Pillow's."""
    from PIL import Image

    from edge_runtime.model import EdgeModel
    from edge_runtime.preprocess import input_pixels

    if not SHIPPED_UINT8.is_file():
        pytest.skip(f"{SHIPPED_UINT8} not in this checkout")
    model = EdgeModel.load(SHIPPED_UINT8)
    scans = [p for label in model.labels for p in sorted((BUSI / label).glob("*.png"))[::60][:4]]
    if len(scans) < 3 * len(model.labels):
        pytest.skip(f"{BUSI}: the BUSI scans are not in this checkout")
    images, ours = [], []
    for i, scan in enumerate(scans):
        pixels = input_pixels(scan, model.prep)
        images.append(tmp_path / f"scan{i}.png")
        Image.fromarray(pixels).save(images[-1])
        ours.append(model.run(model.input_from_pixels(pixels)))
    shown = mediapipe_scores(tmp_path, SHIPPED_UINT8, images)
    theirs = np.array([[s[label] for label in model.labels] for s in shown])
    ours = np.array(ours)
    step = model.output.scale
    assert theirs.shape == ours.shape
    assert list(theirs.argmax(1)) == [model.decide(p) for p in ours]
    assert len(set(ours.argmax(1))) == len(model.labels)  # every class answered: the comparison covers each
    print(f"MediaPipe vs edge runtime on {len(scans)} BUSI scans: top-1 equal, max |Δp| {np.abs(theirs - ours).max():.5f}")
    assert np.abs(theirs - ours).max() <= 2 * step, (np.abs(theirs - ours).max(), step)
