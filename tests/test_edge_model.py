"""EdgeModel: checks on load, int8 quantization in and out, probabilities, threshold, backends."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_models import BINARY_LABELS, LABELS, PREP, calibration_images, model_file, tflite_bytes, write_images
from edge_runtime import backends
from edge_runtime.atomic import write_bytes, write_json
from edge_runtime.errors import ModelError
from edge_runtime.model import EdgeModel, to_probabilities
from edge_runtime.preprocess import dequantize, quantize


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("edge-model")


def test_int8_model_quantizes_input_and_dequantizes_output(folder):
    model = EdgeModel.load(model_file(folder, "int8"))
    assert model.input.dtype is np.int8 and model.input.quantized and model.output.quantized
    x = calibration_images(3)
    probs = model.predict(x)
    from ai_edge_litert.interpreter import Interpreter

    raw = Interpreter(model_content=model.path.read_bytes())
    raw.allocate_tensors()
    for sample, p in zip(x, probs):
        raw.set_tensor(model.input.index, quantize(sample[None], model.input.scale, model.input.zero_point, np.int8))
        raw.invoke()
        expected = dequantize(raw.get_tensor(model.output.index)[0], model.output.scale, model.output.zero_point)
        np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-6)


def test_int8_agrees_with_fp32(folder):
    fp32, int8 = EdgeModel.load(model_file(folder, "fp32")), EdgeModel.load(model_file(folder, "int8"))
    x = calibration_images(8)
    assert np.abs(fp32.predict(x) - int8.predict(x)).max() < 0.1


@pytest.mark.parametrize("variant", ["fp32", "int8", "uint8", "dynamic"])
def test_probabilities_sum_to_one(folder, variant):
    model = EdgeModel.load(model_file(folder, variant))
    probs = model.predict(calibration_images(4))
    assert probs.shape == (4, len(LABELS)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs >= 0).all()


def test_logits_get_a_softmax_and_probabilities_are_renormalized():
    np.testing.assert_allclose(to_probabilities(np.array([2.0, -1.0, 0.5])).sum(), 1.0, atol=1e-6)
    assert to_probabilities(np.array([2.0, -1.0, 0.5])).argmax() == 0
    np.testing.assert_allclose(to_probabilities(np.array([0.5, 0.49, 0.0])), [0.5 / 0.99, 0.49 / 0.99, 0.0], rtol=1e-6)


def test_labels_prep_and_threshold_come_from_metadata(folder):
    path = model_file(folder / "meta", "int8", labels=tuple(BINARY_LABELS),
                      threshold={"positive": "idc", "value": 0.2}, sidecar=False)
    model = EdgeModel.load(path)
    assert model.labels == BINARY_LABELS and model.prep == PREP and model.has_metadata
    assert model.decide([0.75, 0.25]) == 1  # p(idc) 0.25 >= 0.2
    assert model.decide([0.85, 0.15]) == 0
    assert model.threshold == {"positive": "idc", "value": 0.2}


def test_argmax_without_threshold(folder):
    model = EdgeModel.load(model_file(folder, "fp32"))
    assert model.threshold is None and model.decide([0.2, 0.3, 0.5]) == 2


def test_sidecar_is_the_fallback_for_models_without_metadata(folder):
    import hashlib

    path = write_bytes(folder / "plain" / "m.tflite", tflite_bytes("int8"))
    write_json(path.with_suffix(".json"), {"labels": ["x", "y", "z"], "preprocessing": PREP.to_dict(),
                                           "threshold": {"positive": "y", "value": 0.5},
                                           "sha256": hashlib.sha256(tflite_bytes("int8")).hexdigest()})
    model = EdgeModel.load(path)
    assert model.labels == ["x", "y", "z"] and not model.has_metadata and model.threshold["positive"] == "y"


def test_model_without_any_labels_is_refused(folder):
    path = write_bytes(folder / "nolabels" / "m.tflite", tflite_bytes("fp32"))
    with pytest.raises(ModelError, match="no labels"):
        EdgeModel.load(path)


def test_wrong_label_count_is_refused(folder):
    from edge_runtime.metadata import write_metadata

    path = write_bytes(folder / "wrong" / "m.tflite", write_metadata(tflite_bytes("fp32", 3), name="x", description="", labels=["a", "b"], prep=PREP))
    with pytest.raises(ModelError, match=r"2 labels .* 3 outputs"):
        EdgeModel.load(path)


def test_sidecar_sha_mismatch_is_refused(folder):
    path = model_file(folder / "sha", "int8")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    sidecar["sha256"] = "0" * 64
    write_json(path.with_suffix(".json"), sidecar)
    with pytest.raises(ModelError, match=r"sha256 .* does not match int8.json"):
        EdgeModel.load(path)


def _sidecar_with(path, **changes):
    sidecar = json.loads(path.with_suffix(".json").read_text())
    write_json(path.with_suffix(".json"), {**sidecar, **changes})


def test_sidecar_preprocessing_disagreeing_with_the_metadata_is_refused(folder):
    path = model_file(folder / "prep", "int8")
    _sidecar_with(path, preprocessing={**PREP.to_dict(), "mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0]})
    with pytest.raises(ModelError, match=r"preprocessing .* in int8.json") as caught:
        EdgeModel.load(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_sidecar_input_output_facts_that_match_the_tensors_load(folder, variant):
    path = model_file(folder / f"io-{variant}", variant)
    real = EdgeModel.load(path)
    # As export writes them: null scale and zero point for float tensors.
    facts = {role: {**t.to_dict(), **({} if t.quantized else {"scale": None, "zero_point": None})}
             for role, t in (("input", real.input), ("output", real.output))}
    _sidecar_with(path, **facts)
    assert EdgeModel.load(path).input.to_dict() == real.input.to_dict()


@pytest.mark.parametrize("role, field, value", [("input", "scale", 0.5), ("input", "zero_point", 3),
                                                ("output", "dtype", "uint8"), ("input", "shape", [1, 8, 8, 3])])
def test_sidecar_input_output_facts_that_differ_from_the_tensors_are_refused(folder, role, field, value):
    path = model_file(folder / f"io-bad-{role}-{field}", "int8")
    real = getattr(EdgeModel.load(path), role).to_dict()
    _sidecar_with(path, **{role: {**real, field: value}})
    with pytest.raises(ModelError, match=f"int8.json describes the {role} tensor") as caught:
        EdgeModel.load(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("dtype, scale, problem", [(np.float16, 0.0, "float16, not one of"),
                                                   (np.int16, 0.1, "int16, not one of"),
                                                   (np.int8, 0.0, "int8 with no quantization scale")])
def test_input_output_types_the_runtime_cannot_feed_are_refused(dtype, scale, problem):
    from edge_runtime.model import TensorInfo, _check_tensor_types

    odd = TensorInfo(0, dtype, (1, 2), scale, 0)
    with pytest.raises(ModelError, match=f"m.tflite: output tensor is {problem}"):
        _check_tensor_types("m.tflite", {"output": odd})


@pytest.mark.parametrize("damage", ["empty", "text", "truncated_half", "truncated_header", "flipped"])
def test_corrupt_or_truncated_model_is_refused(folder, damage):
    good = model_file(folder / "good", "int8", sidecar=False).read_bytes()
    data = {"empty": b"", "text": b"hello, this is not a model at all",
            "truncated_half": good[:len(good) // 2], "truncated_header": good[:6],
            "flipped": good[:8] + bytes(b ^ 0xFF for b in good[8:200]) + good[200:]}[damage]
    path = write_bytes(folder / "bad" / f"{damage}.tflite", data)
    with pytest.raises(ModelError) as caught:
        EdgeModel.load(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message


def test_missing_model_is_refused(folder):
    with pytest.raises(ModelError, match="not found"):
        EdgeModel.load(folder / "nothere.tflite")


def test_bad_threshold_is_refused(folder):
    path = model_file(folder / "thr", "fp32", threshold={"positive": "cancer", "value": 0.5}, sidecar=False)
    with pytest.raises(ModelError, match="threshold"):
        EdgeModel.load(path)


def test_reference_resolver_gives_the_same_int8_outputs(folder):
    path = model_file(folder, "int8")
    x = calibration_images(4)
    default, reference = EdgeModel.load(path), EdgeModel.load(path, resolver="reference")
    np.testing.assert_array_equal(default.predict(x), reference.predict(x))


def test_model_kind(folder):
    assert backends.model_kind(tflite_bytes("fp32")) == "float"
    assert backends.model_kind(tflite_bytes("int8")) == "integer"
    assert backends.model_kind(tflite_bytes("dynamic")) == "dynamic"


def test_forcing_a_missing_backend_says_so(monkeypatch):
    monkeypatch.setattr(backends, "_module_available", lambda name: name == "ai-edge-litert")
    with pytest.raises(backends.BackendError, match="tflite-runtime is not installed"):
        backends.make_interpreter(tflite_bytes("fp32"), backend="tflite-runtime")
    with pytest.raises(backends.BackendError, match="unknown backend"):
        backends.make_interpreter(tflite_bytes("fp32"), backend="onnx")


def test_tflite_runtime_is_not_offered_dynamic_range_models(monkeypatch):
    monkeypatch.setattr(backends, "_module_available", lambda name: True)
    with pytest.raises(backends.BackendError, match="cannot run dynamic-range"):
        backends.make_interpreter(tflite_bytes("dynamic"), backend="tflite-runtime")
    # Automatic choice skips it (ai-edge-litert comes first anyway; here it is the only other one).
    monkeypatch.setattr(backends, "installed_backends", lambda: ["tflite-runtime", "ai-edge-litert"])
    _, name = backends.make_interpreter(tflite_bytes("dynamic"))
    assert name == "ai-edge-litert"


def test_predict_file_uses_the_shared_preprocessing(folder):
    from edge_runtime.preprocess import preprocess

    model = EdgeModel.load(model_file(folder, "fp32"))
    image = write_images(folder / "images", n=1, size=40)[0]
    np.testing.assert_array_equal(model.predict_file(image), model.predict(preprocess(image, PREP))[0])


def test_info_command_json(folder, capsys):
    from edge_runtime.cli import main

    assert main(["info", str(model_file(folder, "int8")), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["labels"] == LABELS and info["input"]["dtype"] == "int8" and info["kind"] == "integer"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=50),
       st.floats(1e-3, 0.05), st.integers(-128, 127))
def test_int8_quantize_dequantize_round_trip(values, scale, zero_point):
    x = np.asarray(values, dtype=np.float32)
    q = quantize(x, scale, zero_point, np.int8)
    back = dequantize(q, scale, zero_point)
    representable = (x >= (-128 - zero_point) * scale) & (x <= (127 - zero_point) * scale)
    assert q.dtype == np.int8
    # Inside the range: within half a step; outside: saturated at the nearest end.
    assert np.all(np.abs(back - x)[representable] <= scale / 2 + 1e-6)
    assert np.all(np.isin(q[~representable], [-128, 127]))


def test_an_int8_model_over_the_export_gate_warns_whoever_loads_it(tmp_path, capsys):
    """export writes the shipped int8 model's validation loss against the gate into its sidecar;
    loading it says so, and `predict` prints it on stderr."""
    from edge_runtime.cli import main as edge_main

    path = model_file(tmp_path, "int8")
    assert EdgeModel.load(path).warnings == []
    sidecar = path.with_suffix(".json")
    facts = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**facts, "gate": {"accuracy_loss": 0.05, "gate": 0.01, "passed": False}}))
    (warning,) = EdgeModel.load(path).warnings
    assert "5.0%" in warning and "gate of 1.0%" in warning
    image = write_images(tmp_path / "img", n=1, size=20)[0]
    assert edge_main(["predict", str(path), str(image), "--json"]) == 0
    assert "more than the export gate" in capsys.readouterr().err
