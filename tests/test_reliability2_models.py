"""Issue 19 classes 5 and 6 (models), and the model facts shown beside every answer.

5. A sidecar is trusted only if it names the model's sha256.
6. A FIFO or a device given as the model is refused from its stat, never read.
Display: `uncertain_margin` (sidecar or metadata, validated), `EdgeModel.is_uncertain`, the
decision rule in words, and `prediction_record`, the one shape of an answer in predict and the
server.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import badinputs
from edge_models import BINARY_LABELS, LABELS, PREP, model_file, tflite_bytes, write_images
from edge_runtime.atomic import write_bytes, write_json, write_text
from edge_runtime.errors import ModelError
from edge_runtime.metadata import write_metadata
from edge_runtime.model import EdgeModel, decision_rule, prediction_record

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}


def plain_model(folder: Path, num_classes: int = 3, **sidecar) -> Path:
    """A model without metadata and a sidecar with `sidecar`'s facts (sha256 added unless given); a
    fact given as ... is left out."""
    data = tflite_bytes("fp32", num_classes)
    path = write_bytes(folder / "model.tflite", data)
    facts = {"format": "oncolite-model/1", "sha256": hashlib.sha256(data).hexdigest(), **sidecar}
    write_json(path.with_suffix(".json"), {k: v for k, v in facts.items() if v is not ...})
    return path


# --------------------------------------------------------------------- 5. sidecars must name the hash

def test_a_sidecar_without_the_models_hash_is_refused_with_the_fix(tmp_path):
    path = plain_model(tmp_path, labels=list(reversed(LABELS)), sha256=...)
    with pytest.raises(ModelError) as caught:
        EdgeModel.load(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert "does not name the model's sha256" in message and "oncolite export" in message
    assert hashlib.sha256(path.read_bytes()).hexdigest() in message  # the one-line fix, once the labels are checked


def test_the_same_sidecar_naming_the_hash_is_used(tmp_path):
    path = plain_model(tmp_path, labels=list(reversed(LABELS)))
    assert EdgeModel.load(path).labels == list(reversed(LABELS))


def test_a_model_with_metadata_and_an_unhashed_sidecar_is_refused(tmp_path):
    path = model_file(tmp_path, "int8")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    del sidecar["sha256"]
    write_json(path.with_suffix(".json"), sidecar)
    with pytest.raises(ModelError, match="does not name the model's sha256"):
        EdgeModel.load(path)
    path.with_suffix(".json").unlink()  # the metadata alone is enough
    assert EdgeModel.load(path).labels == LABELS


def test_an_oversized_sidecar_is_refused_unread(tmp_path):
    path = plain_model(tmp_path, labels=LABELS)
    write_text(path.with_suffix(".json"), " " * (2**20 + 1))
    with pytest.raises(ModelError, match="too large for a model sidecar"):
        EdgeModel.load(path)


# --------------------------------------------------------------------- 6. a FIFO or a device as the model

def _capped():
    resource.setrlimit(resource.RLIMIT_AS, (1536 * 2**20, 1536 * 2**20))


@pytest.mark.parametrize("name", ["fifo_model", "device_model"])
def test_a_fifo_or_a_device_as_the_model_is_refused_unread(name, tmp_path):
    """A child process with a deadline and an address-space cap: the old code blocked on the
    FIFO forever and read /dev/zero until memory ran out."""
    sample = {s.name: s for s in badinputs.special_models(tmp_path)}[name]
    try:
        done = subprocess.run([sys.executable, "-m", "edge_runtime", "info", os.fspath(sample.path)], env=ENV,
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, preexec_fn=_capped)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`info {sample.path.name}` still reading after 60 s")
    finally:
        badinputs.release_fifo(tmp_path / "pipe.tflite")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert f"{sample.path}: not a regular file (a pipe or a device)" in lines[0]


def test_a_folder_as_the_model_still_says_so(tmp_path):
    with pytest.raises(ModelError, match="is a folder; pass the .tflite file inside it"):
        EdgeModel.load(tmp_path)


# --------------------------------------------------------------------- display: uncertain band and rule

def test_uncertain_margin_is_read_from_the_sidecar(tmp_path):
    model = EdgeModel.load(plain_model(tmp_path, labels=LABELS, uncertain_margin=0.25))
    assert model.uncertain_margin == 0.25
    assert model.is_uncertain([0.5, 0.3, 0.2]) is True  # top-1 minus top-2: 0.2 < 0.25
    assert model.is_uncertain([0.7, 0.2, 0.1]) is False
    assert model.info()["uncertain_margin"] == 0.25


def test_uncertain_margin_is_read_from_the_metadata(tmp_path):
    data = write_metadata(tflite_bytes("int8", 3), name="tiny", description="", labels=LABELS, prep=PREP,
                          extra={"format": "oncolite-model/1", "variant": "int8", "threshold": None, "uncertain_margin": 0.05})
    model = EdgeModel.load(write_bytes(tmp_path / "int8.tflite", data))
    assert model.has_metadata and model.uncertain_margin == 0.05


@pytest.mark.parametrize("margin", [None, ...])
def test_no_band_means_no_flag(tmp_path, margin):
    model = EdgeModel.load(plain_model(tmp_path, labels=LABELS, uncertain_margin=margin))
    assert model.uncertain_margin is None and model.is_uncertain([0.34, 0.33, 0.33]) is None


@pytest.mark.parametrize("margin", ["0.2", 1.5, -0.1, True, [0.1], {"value": 0.1}])
def test_an_invalid_uncertain_margin_is_a_one_line_error(tmp_path, margin):
    path = plain_model(tmp_path, labels=LABELS, uncertain_margin=margin)
    with pytest.raises(ModelError) as caught:
        EdgeModel.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: uncertain_margin") and "0 to 1" in message and "\n" not in message


def test_a_nan_uncertain_margin_is_refused(tmp_path):
    path = plain_model(tmp_path, labels=LABELS)
    sidecar = path.with_suffix(".json")
    write_text(sidecar, sidecar.read_text().replace('"format"', '"uncertain_margin": NaN, "format"'))
    with pytest.raises(ModelError, match="uncertain_margin nan"):
        EdgeModel.load(path)


def test_with_a_threshold_the_band_is_around_the_threshold(tmp_path):
    """The margin of a thresholded answer is |p(positive) - threshold| (edge_runtime.decision)."""
    threshold = {"positive": "idc", "value": 0.72}
    model = EdgeModel.load(plain_model(tmp_path, 2, labels=BINARY_LABELS, threshold=threshold, uncertain_margin=0.05))
    assert model.labels[model.decide([0.324, 0.676])] == "non-idc"
    assert model.is_uncertain([0.324, 0.676]) is True  # 0.044 from the threshold
    assert model.is_uncertain([0.505, 0.495]) is False  # a near tie, but far from the threshold: a sure "non-idc"
    assert model.is_uncertain([0.1, 0.9]) is False


def test_a_band_with_a_threshold_on_more_than_two_classes_is_refused(tmp_path):
    path = plain_model(tmp_path, labels=LABELS, threshold={"positive": "malignant", "value": 0.5}, uncertain_margin=0.1)
    with pytest.raises(ModelError, match="needs a binary model"):
        EdgeModel.load(path)


def test_the_decision_rule_in_words():
    assert decision_rule(LABELS, None) == "highest probability"
    assert decision_rule(["benign", "malignant"], {"positive": "malignant", "value": 0.72}) == \
        "malignant if p(malignant) >= 0.72, else benign"
    assert decision_rule(LABELS, {"positive": "malignant", "value": 0.5}) == \
        "malignant if p(malignant) >= 0.5, else the most probable other class"


def test_info_shows_the_rule_and_the_band(tmp_path, capsys):
    from edge_runtime.cli import main

    path = plain_model(tmp_path, 2, labels=BINARY_LABELS, threshold={"positive": "idc", "value": 0.3}, uncertain_margin=0.02)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "decision     idc if p(idc) >= 0.3, else non-idc" in out and "margin below 0.02 are flagged" in out


def test_prediction_record_shape():
    class Model:
        labels = ["benign", "malignant"]
        threshold = {"positive": "malignant", "value": 0.72}
        uncertain_margin = 0.05
        decide = EdgeModel.decide

    record = prediction_record(Model(), np.array([0.3125, 0.6875], np.float32))
    assert record == {"label": "benign", "index": 0, "probability": 0.3125,
                      "probabilities": {"benign": 0.3125, "malignant": 0.6875},
                      "top": [{"label": "malignant", "probability": 0.6875}, {"label": "benign", "probability": 0.3125}],
                      "decision_rule": "malignant if p(malignant) >= 0.72, else benign", "uncertain": True}
    # The model's float32 values, unrounded (device outputs are compared exactly).
    assert prediction_record(Model(), np.array([0.1, 0.9], np.float32))["probability"] == float(np.float32(0.9))
    assert [t["label"] for t in prediction_record(Model(), [0.3, 0.7], top_k=1)["top"]] == ["malignant"]


def test_predict_and_the_server_give_one_record_for_one_image(tmp_path, capsys):
    from starlette.testclient import TestClient

    from edge_runtime import server
    from edge_runtime.cli import main

    path = plain_model(tmp_path, labels=LABELS, uncertain_margin=0.3)
    image = write_images(tmp_path / "images", n=1)[0]
    assert main(["predict", str(path), str(image), "--json"]) == 0
    [cli] = [r for r in map(json.loads, capsys.readouterr().out.splitlines()) if r["type"] == "result"]
    with TestClient(server.create_app(EdgeModel.load(path))) as client:
        api = client.post("/api/predict", content=image.read_bytes()).json()
    shared = ("label", "index", "probability", "probabilities", "top", "decision_rule", "uncertain")
    assert {k: cli[k] for k in shared} == {k: api[k] for k in shared}
    assert isinstance(api["uncertain"], bool)
