"""Bring your own model (issue 17): `oncolite export MODEL --data DIR | --manifest M` with small
Keras classifiers built here (not MobileNetV2): a .keras with a Rescaling layer inside, a nested
.h5 with a logits output, a Keras SavedModel with a manifest; and the one-line refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

SIZE = 24
LABELS = ["benign", "malignant"]
FAST = "fp32,int8_ptq,int8_gptq,int8,int8_uint8"


def image_folder(root: Path, per_class: int = 8) -> Path:
    """Two class folders of small PNGs whose brightness and texture differ by class."""
    rng = np.random.default_rng(1)
    for k, label in enumerate(LABELS):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = 60 + 120 * k
            pixels = np.clip(rng.normal(base, 40, (SIZE + 8, SIZE + 4, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{label}_{i}.png")
    return root


def small_classifier(rescaling: bool = False, logits: bool = False, nested: bool = False):
    """A few conv layers and a dense head: another backbone than the kit's."""
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs) if rescaling else inputs
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.Conv2D(12, 1, activation="relu")(x)
    features = keras.layers.GlobalAveragePooling2D()(x)
    if nested:
        backbone = keras.Model(inputs, features, name="backbone")
        return keras.Sequential([keras.Input((SIZE, SIZE, 3)), backbone,
                                 keras.layers.Dense(len(LABELS), activation=None if logits else "softmax")])
    outputs = keras.layers.Dense(len(LABELS), activation=None if logits else "softmax")(features)
    return keras.Model(inputs, outputs)


def export(*argv) -> int:
    from oncolite.cli import main

    return main(["export", *map(str, argv)])


def sidecar(folder: Path, variant: str) -> dict:
    return json.loads((folder / f"{variant}.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("byo-data") / "images")


def test_keras_file_with_rescaling_exports_every_variant(tmp_path, data, capsys):
    from edge_runtime.model import EdgeModel

    model_path = tmp_path / "mine.keras"
    small_classifier(rescaling=True).save(model_path)
    assert export(model_path, "--data", data, "--variants", FAST, "--calibration-images", 6, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    out = tmp_path / "mine_export"
    assert {"fp32", "int8_ptq", "int8_gptq", "int8", "int8_uint8"} <= set(report["variants"])
    assert report["int8"]["from"] in ("int8_ptq", "int8_gptq")
    assert (out / "export_report.md").is_file() and (out / "float.keras").is_file()
    facts = sidecar(out, "int8")
    # The Rescaling layer inside: the model takes raw pixels, and the pixels land on the int8 grid.
    assert facts["preprocessing"]["mean"] == [0.0] * 3 and facts["preprocessing"]["std"] == [1.0] * 3
    assert facts["input"]["dtype"] == "int8" and facts["input"]["scale"] == pytest.approx(1.0)
    assert facts["input"]["zero_point"] == -128
    assert facts["labels"] == LABELS and facts["uncertain_margin"] is not None
    assert facts["calibration"]["count"] == 6 and facts["gate"]["side"] == "val"
    edge = EdgeModel.load(out / "int8.tflite")
    probs = edge.predict_file(next((data / "benign").iterdir()))
    assert probs.shape == (2,) and abs(float(probs.sum()) - 1) < 1e-3
    assert EdgeModel.load(out / "int8_uint8.tflite").input.dtype == np.uint8
    # A second export finds everything up to date (float.keras is not rewritten).
    assert export(model_path, "--data", data, "--variants", FAST, "--calibration-images", 6, "--json") == 0
    again = json.loads(capsys.readouterr().out)
    assert {row["status"] for row in again["variants"].values()} == {"up to date"}


def test_nested_h5_with_logits_is_flattened_and_given_a_softmax(tmp_path, data, capsys):
    import tf_keras as keras

    model_path = tmp_path / "nested.h5"
    small_classifier(logits=True, nested=True).save(model_path)
    out = tmp_path / "out"
    assert export(model_path, "--data", data, "--out", out, "--variants", "fp32,int8_ptq",
                  "--calibration-images", 4, "--mean", "127.5", "--std", "127.5") == 0
    text = capsys.readouterr().out
    assert "flattened" in text and "Softmax" in text
    byo = json.loads((out / "byo.json").read_text())
    assert byo["preprocessing_from"] == "given"
    flat = keras.models.load_model(out / "float.keras", compile=False, safe_mode=True)
    assert not any(isinstance(layer, keras.Model) for layer in flat.layers)
    assert isinstance(flat.layers[-1], keras.layers.Softmax)
    assert sidecar(out, "int8_ptq")["preprocessing"]["mean"] == [127.5] * 3


def test_saved_model_with_a_csv_manifest_and_labels(tmp_path, data, capsys):
    saved = tmp_path / "saved"
    small_classifier().save(saved, save_format="tf")
    rows = ["path,label,split"]
    for label in LABELS:
        for i, f in enumerate(sorted((data / label).iterdir())):
            rows.append(f"{f},{label},{'train' if i % 2 else 'val'}")
    (tmp_path / "split.csv").write_text("\n".join(rows) + "\n")
    # Output order given explicitly (reversed): the sidecar carries it.
    assert export(saved, "--manifest", tmp_path / "split.csv", "--labels", "malignant,benign",
                  "--variants", "int8_ptq,int8", "--calibration-images", 4, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["int8"]["from"] == "int8_ptq"
    assert sidecar(tmp_path / "saved_export", "int8")["labels"] == ["malignant", "benign"]


@pytest.mark.parametrize("argv, message", [
    (["--variants", "int8_qat"], "quantization-aware training needs an oncolite run"),
    ([], "--data DIR"),
])
def test_one_line_refusals(tmp_path, data, capsys, argv, message):
    model_path = tmp_path / "m.keras"
    small_classifier().save(model_path)
    extra = ["--data", str(data)] if argv else []
    assert export(model_path, *extra, *argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_lambda_layer_gets_a_one_line_reason(tmp_path, data, capsys):
    import tf_keras as keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    model.save(tmp_path / "lambda.keras")
    assert export(tmp_path / "lambda.keras", "--data", data) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot load it as a Keras model" in err and len(err.splitlines()) == 1


def keras3_classifier(nested: bool = False, logits: bool = False):
    """small_classifier's network built with Keras 3 (`import keras`, what TensorFlow's users
    get today), which tf-keras cannot read."""
    import keras

    assert keras.__version__.startswith("3")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    y = keras.layers.ReLU(6.0)(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same")(y)
    x = keras.layers.Add()([x, y])
    features = keras.layers.GlobalAveragePooling2D()(x)
    head = keras.layers.Dense(len(LABELS), activation=None if logits else "softmax")
    if nested:
        return keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.Model(inputs, features, name="backbone"), head])
    return keras.Model(inputs, head(features))


@pytest.mark.parametrize("suffix, nested", [(".keras", False), (".h5", True)])
def test_a_model_saved_by_keras_3_exports_through_its_tf_keras_twin(tmp_path, data, capsys, suffix, nested):
    import keras
    import tf_keras

    from edge_runtime.model import EdgeModel
    from edge_runtime.preprocess import Preprocessing, preprocess

    original = keras3_classifier(nested=nested, logits=nested)
    # Trained a little, so BatchNorm's moving statistics are not their initial values.
    x = np.random.default_rng(2).uniform(0, 255, (16, SIZE, SIZE, 3)).astype(np.float32)
    original.compile("adam", "sparse_categorical_crossentropy" if not nested else
                     keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    original.fit(x, np.arange(16) % 2, epochs=2, verbose=0)
    model_path = tmp_path / f"k3{suffix}"
    original.save(model_path)
    out = tmp_path / "out"
    assert export(model_path, "--data", data, "--out", out, "--variants", "fp32,int8_ptq,int8_gptq,int8",
                  "--calibration-images", 6, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["int8"]["from"] in ("int8_ptq", "int8_gptq")
    twin = tf_keras.models.load_model(out / "float.keras", compile=False, safe_mode=True)
    images = sorted((data / "benign").iterdir())[:3]
    pixels = np.stack([preprocess(f, Preprocessing(height=SIZE, width=SIZE, mean=(0.0,) * 3, std=(1.0,) * 3))
                       for f in images])
    want = np.asarray(original(pixels, training=False))
    want = np.exp(want) / np.exp(want).sum(axis=1, keepdims=True) if nested else want  # logits: a Softmax appended
    np.testing.assert_allclose(twin.predict(pixels, verbose=0), want, atol=1e-5)
    fp32 = EdgeModel.load(out / "fp32.tflite")
    np.testing.assert_allclose(np.stack([fp32.predict_file(f) for f in images]), want, atol=1e-4)


def test_a_keras_3_layer_tf_keras_lacks_gets_a_one_line_reason(tmp_path, data, capsys):
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.RMSNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x)).save(tmp_path / "rms.keras")
    assert export(tmp_path / "rms.keras", "--data", data) == 2
    err = capsys.readouterr().err.strip()
    assert "'rms_normalization' is a RMSNormalization, which tf-keras does not have" in err
    assert len(err.splitlines()) == 1


def test_folder_halves_are_disjoint_and_stratified(data):
    from oncolite.quantize.byo import folder_data

    split = folder_data(data, seed=3).sides()
    train, val = {it["path"] for it in split["train"]}, {it["path"] for it in split["val"]}
    assert train and val and not train & val
    for label in LABELS:
        assert sum(it["label"] == label for it in split["val"]) == 4


def test_keras_3_graphs_of_every_common_shape_get_an_exact_twin_or_one_line(tmp_path):
    """Augmentation layers (saved with training=True) stay off in the twin; a layer shared across
    the graph, a free input size and a renamed argument come through; a Keras 3 op is refused."""
    import keras

    import oncolite.train  # noqa: F401
    from edge_runtime.errors import ModelError
    from oncolite.quantize.byo import load_foreign_model

    def head(x):
        return keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.RandomFlip()(inputs)
    x = keras.layers.RandomRotation(0.2)(x)
    augmented = keras.Model(inputs, head(keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(x))))
    inputs = keras.Input((SIZE, SIZE, 3))
    shared = keras.layers.Conv2D(3, 3, padding="same")
    x = shared(keras.layers.Conv2D(3, 1, name="mid")(shared(inputs)))
    reused = keras.Model(inputs, head(keras.layers.LeakyReLU(negative_slope=0.1)(x)))
    inputs = keras.Input((None, None, 3))
    free = keras.Model(inputs, head(keras.layers.Conv2D(3, 3)(inputs)))
    pixels = np.random.default_rng(3).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    for name, model in {"augmented": augmented, "reused": reused, "free": free}.items():
        model.save(tmp_path / f"{name}.keras")
        twin = load_foreign_model(tmp_path / f"{name}.keras")
        np.testing.assert_allclose(twin.predict(pixels, verbose=0), np.asarray(model(pixels, training=False)),
                                   atol=1e-5, err_msg=name)
    inputs = keras.Input((SIZE, SIZE, 3))
    keras.Model(inputs, head(inputs * 2.0)).save(tmp_path / "op.keras")
    with pytest.raises(ModelError, match="is a Keras 3 operation, not a layer"):
        load_foreign_model(tmp_path / "op.keras")
