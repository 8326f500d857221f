"""Bring your own model: a Keras image classifier trained elsewhere, exported and benchmarked
like a run's float model.

MODEL is a Keras file (`.keras`, `.h5`) or a SavedModel directory written by Keras. It is
loaded with tf-keras (a file saved by Keras 3 becomes its tf-keras twin: quantize.keras3),
nested sub-models are flattened (train.model.flatten), and its output is
made one probability per class: a softmax output stays as it is, logits get a Softmax layer, a
single sigmoid unit p becomes [1 - p, p] (a fixed Dense layer). The input size comes from the
model; the normalization is given (--mean/--std) or read from the model: a Rescaling or
Normalization layer before the first conv/dense layer means the model takes raw pixels
(mean 0, std 1), otherwise MobileNetV2's (x - 127.5) / 127.5.

Images come from a manifest (its train side calibrates, its val side gates) or from a folder of
class folders (`--data DIR`, any layout train.datasets detects), split here into two seeded,
label-stratified, group-aware halves: calibration images from one, the validation gate on the
other. The model may have seen any of them in training: that is the researcher's to know, and
the report says which images were used.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime.atomic import atomic_path, write_json
from edge_runtime.errors import ModelError, OncoliteError
from edge_runtime.hashing import bytes_sha256, file_sha256
from edge_runtime.preprocess import Preprocessing
from oncolite.train.rundir import RunDir

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
# Layers whose kernels decide where the model's own arithmetic starts: a Rescaling or
# Normalization layer before the first of them means the model normalizes its input itself.
FORMAT = "oncolite-byo/1"


def is_model_path(path) -> bool:
    """A Keras file or a SavedModel directory (not a run directory)."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in KERAS_SUFFIXES
    return path.is_dir() and (path / "saved_model.pb").is_file()


def source_sha256(path) -> str:
    """sha256 of a model file, or of a SavedModel directory's files (names and contents)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    parts = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        parts.append(f"{f.relative_to(path).as_posix()}:{file_sha256(f)}")
    return bytes_sha256("\n".join(parts).encode())


def load_foreign_model(path):
    """A tf-keras model from a .keras/.h5 file (tf-keras' or Keras 3's) or a Keras SavedModel
    directory (one-line errors)."""
    import oncolite.train  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
    import tf_keras as keras

    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: not found; give a .keras or .h5 file or a SavedModel directory")
    if path.is_dir() and not (path / "saved_model.pb").is_file():
        raise ModelError(f"{path}: a folder without saved_model.pb; give a SavedModel directory, a .keras or .h5 file")
    if path.is_file() and path.suffix.lower() not in KERAS_SUFFIXES:
        raise ModelError(f"{path}: not a Keras model file; give a .keras or .h5 file or a SavedModel directory "
                         "(a .tflite goes to `oncolite benchmark`, not export)")
    try:
        # safe_mode refuses arbitrary code in .keras archives; .h5 and SavedModel ignore it.
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # noqa: BLE001 - Keras raises anything from ValueError to KeyError on foreign files
        from .keras3 import load_keras3, tf_keras_twin

        saved_by_keras3 = load_keras3(path) if path.is_file() else None
        if saved_by_keras3 is not None:
            return tf_keras_twin(saved_by_keras3, path)
        first = " ".join(str(e).split()) or type(e).__name__
        first = first if len(first) <= 200 else first[:199] + "…"
        raise ModelError(f"{path}: cannot load it as a Keras model ({first}); save it with model.save() from "
                         "Keras 3 or tf-keras, without custom layers or Lambda layers") from None
    if not isinstance(model, keras.Model) or not hasattr(model, "layers"):
        raise ModelError(f"{path}: a SavedModel without a Keras model inside (Keras 3's model.export() writes "
                         "such an inference-only one); give the .keras or .h5 file it was exported from")
    return model


def _first_compute_index(layers) -> int:
    import tf_keras as keras

    kinds = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D, keras.layers.Dense)
    return next((i for i, layer in enumerate(layers) if isinstance(layer, kinds)), len(layers))


def normalizes_itself(model) -> bool:
    """A Rescaling or Normalization layer comes before the first conv/dense layer."""
    import tf_keras as keras

    layers = model.layers[:_first_compute_index(model.layers)]
    return any(isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)) for layer in layers)


def _output_kind(model) -> str:
    """"softmax", "sigmoid" or "logits", from the last layer."""
    import tf_keras as keras

    last = model.layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return "softmax"
    activation = getattr(last, "activation", None)
    name = getattr(activation, "__name__", str(activation))
    return name if name in ("softmax", "sigmoid") else "logits"


def prepare_model(model, where) -> tuple[object, list[str]]:
    """The model as the kit needs it: flat, one NHWC RGB input, one probability per class.
    Returns (model, notes on what was changed)."""
    import tf_keras as keras

    from oncolite.train.model import flatten, is_flat

    notes = []
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(f"{where}: {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                         "give an image classifier with one image input and one class output")
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ModelError(f"{where}: input shape {shape} is not (batch, height, width, 3); "
                         "give a classifier of RGB images (channels last)")
    if not is_flat(model):
        try:
            model = flatten(model)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"{where}: cannot flatten its nested sub-models ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else ''}); save the classifier as one "
                             "functional model") from None
        notes.append("nested sub-models flattened into one graph")
    out = tuple(model.output_shape)
    if len(out) != 2:
        raise ModelError(f"{where}: output shape {out} is not (batch, classes); end the model in a class layer")
    kind = _output_kind(model)
    if out[1] == 1:
        if kind != "sigmoid":
            raise ModelError(f"{where}: one output unit without a sigmoid; end the model in a sigmoid unit or "
                             "a softmax over the classes")
        pair = keras.layers.Dense(2, name="byo_binary_probabilities")
        x = pair(model.output)
        pair.set_weights([np.array([[-1.0, 1.0]], np.float32), np.array([1.0, 0.0], np.float32)])
        model = keras.Model(model.input, x, name=model.name)
        notes.append("one sigmoid unit p made into [1 - p, p]")
    elif kind == "logits":
        model = keras.Model(model.input, keras.layers.Softmax(name="byo_softmax")(model.output), name=model.name)
        notes.append("logits output: a Softmax layer appended")
    elif kind == "sigmoid":
        notes.append("sigmoid outputs over several classes: renormalized to sum to 1 where read")
    return model, notes


def model_preprocessing(model, where, size=None, mean=None, std=None, resample=None) -> tuple[Preprocessing, str]:
    """The input contract: size from the model (or --size), normalization given or read from it."""
    _, height, width, _ = tuple(model.input_shape)
    if size:
        height, width = size
    elif height is None or width is None:
        raise ModelError(f"{where}: the model takes any input size; give one with --size HxW (e.g. 224x224)")
    if mean is None and std is None:
        if normalizes_itself(model):
            mean, std, origin = 0.0, 1.0, "raw pixels 0..255 (the model rescales its input itself)"
        else:
            mean, std, origin = 127.5, 127.5, "MobileNetV2's (x - 127.5) / 127.5 (default; --mean/--std to change)"
    else:
        mean = 127.5 if mean is None else mean
        std = 127.5 if std is None else std
        origin = "given"
    try:
        prep = Preprocessing(height=int(height), width=int(width), mean=mean, std=std, resample=resample or "bilinear")
    except ValueError as e:
        raise OncoliteError(f"--mean/--std/--resample: {e}") from None
    return prep, origin


def parse_size(text: str | None):
    if not text:
        return None
    try:
        h, _, w = text.lower().partition("x")
        size = (int(h), int(w or h))
    except ValueError:
        size = (0, 0)
    if min(size) < 1:
        raise OncoliteError(f"--size {text!r}: give HxW in pixels, e.g. 224x224")
    return size


def parse_channels(text: str | None, flag: str):
    if text is None:
        return None
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if len(values) not in (1, 3) or (flag == "--std" and min(values) <= 0):
        raise OncoliteError(f"{flag} {text!r}: give one value or three comma-separated values (R,G,B)"
                            + (", all above 0" if flag == "--std" else ""))
    return tuple(values) if len(values) == 3 else values[0]


def parse_labels(text: str | None):
    if text is None:
        return None
    labels = [v.strip() for v in text.split(",") if v.strip()]
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise OncoliteError(f"--labels {text!r}: give two or more distinct class names in the model's output order")
    return labels


def add_model_arguments(parser, data_help: str, out_suffix: str = "export", seed_help: str | None = None) -> None:
    """The flags of a bring-your-own model: images, labels and preprocessing (and --seed where
    the command draws a sample: `seed_help`)."""
    group = parser.add_argument_group("bring your own model")
    group.add_argument("--data", metavar="DIR", help=data_help)
    group.add_argument("--labels", metavar="A,B,...",
                       help="class names in the model's output order (default: the manifest's, or the sorted folder names)")
    group.add_argument("--size", metavar="HxW", help="input size for a model that takes any size")
    group.add_argument("--mean", help="normalization mean, one value or R,G,B (default: read from the model)")
    group.add_argument("--std", help="normalization std, one value or R,G,B (default: read from the model)")
    group.add_argument("--resample", choices=("bilinear", "bicubic", "nearest", "area"), help="resize filter (default bilinear)")
    group.add_argument("--out", metavar="DIR", help=f"output folder (default: <model stem>_{out_suffix}/ beside the model)")
    if seed_help:
        group.add_argument("--seed", type=int, default=0, help=seed_help)


# --- images ---------------------------------------------------------------------------------

@dataclass
class FolderData:
    """A folder of labelled images as the manifest parts export and benchmark read."""

    root: Path
    labels: list[str]
    split: dict  # side -> items ({"path": absolute, "label", "group"})
    sha256: str  # of the listing (relative paths and labels), not of the pixels
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    def sides(self, fold=None) -> dict[str, list[dict]]:
        return {side: list(self.split.get(side, [])) for side in ("train", "val", "test")}


def check_labels(where, found, given) -> list[str]:
    """The label order: `given` (--labels) when it names exactly the classes found."""
    if given is None:
        return list(found)
    missing = sorted(set(found) - set(given))
    if missing:
        raise OncoliteError(f"{where}: classes {missing} are not in --labels {','.join(given)}; name every class")
    return list(given)


def folder_data(root, labels=None, seed: int = 0, halves: bool = True) -> FolderData:
    """Images of a dataset folder: split into a calibration half ("train") and a validation
    half ("val") when `halves`, else every image on the "test" side."""
    from oncolite.train.datasets import load_dataset

    dataset = load_dataset(root)
    labels = check_labels(dataset.root, dataset.labels, labels)
    items = [{"path": r.path, "label": r.label, "group": r.group or dataset.relative(r.path)} for r in dataset.records]
    listing = "\n".join(f"{dataset.relative(it['path'])}\t{it['label']}" for it in items)
    if not halves:
        split = {"test": items}
        meta = {"split": {"kind": "given", "folds": 1}, "seed": seed, "audit": {"conflicts_excluded": None}}
    else:
        split = {"train": [], "val": []}
        rng = random.Random(seed)
        for label in labels:
            groups: dict[str, list[dict]] = {}
            for it in items:
                if it["label"] == label:
                    groups.setdefault(it["group"], []).append(it)
            keys = sorted(groups)
            rng.shuffle(keys)
            total, in_val = sum(len(g) for g in groups.values()), 0
            for key in keys:
                side = "val" if in_val < total / 2 else "train"
                in_val += len(groups[key]) if side == "val" else 0
                split[side].extend(groups[key])
        if not split["train"] or not split["val"]:
            raise OncoliteError(f"{dataset.root}: too few images to split into a calibration half and a validation "
                                "half; give more images, or a manifest with train and val sides (--manifest)")
        meta = {"split": {"kind": "group" if any(r.group for r in dataset.records) else "random", "folds": 1,
                          "halves": "train = calibration, val = validation gate"},
                "seed": seed, "audit": {"conflicts_excluded": None}}
    return FolderData(dataset.root, labels, split, bytes_sha256(listing.encode()), meta)


def manifest_data(path, labels=None):
    """A manifest (json or csv) with the label order checked against --labels."""
    from oncolite.train.manifest import load_manifest

    manifest = load_manifest(path)
    if labels is not None:
        manifest.labels = check_labels(manifest.path, manifest.labels, labels)
    return manifest


# --- export ---------------------------------------------------------------------------------

def import_model(model_path, out: Path, size=None, mean=None, std=None, resample=None, quiet=True):
    """The foreign model prepared and saved as OUT/float.keras (only when the source or the
    preparation changed, so finished variants stay up to date); returns (prep, facts, the prepared model)."""
    model_path = Path(model_path)
    digest = source_sha256(model_path)
    model = load_foreign_model(model_path)
    prepared, notes = prepare_model(model, model_path)
    prep, origin = model_preprocessing(prepared, model_path, size, mean, std, resample)
    facts = {"format": FORMAT, "source": {"model": str(model_path.resolve()), "sha256": digest},
             "preprocessing": prep.to_dict(), "preprocessing_from": origin, "changes": notes,
             "input_shape": list(prepared.input_shape), "classes": int(prepared.output_shape[-1])}
    out.mkdir(parents=True, exist_ok=True)
    # OUT is laid out like a run's models folder (quantize.rundir.ModelRun).
    record, keras_path = out / "byo.json", RunDir(out, models=out).float_model
    try:
        before = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
    except json.JSONDecodeError:
        before = None
    same = (before is not None and keras_path.is_file()
            and {k: before.get(k) for k in ("source", "changes")} == {k: facts[k] for k in ("source", "changes")}
            and before.get("float_sha256") == file_sha256(keras_path))
    if not same:
        with atomic_path(keras_path) as tmp:
            prepared.save(tmp)
        facts["float_sha256"] = file_sha256(keras_path)
        write_json(record, facts)
    else:
        facts["float_sha256"] = before["float_sha256"]
    return prep, facts, prepared


def byo_run(model_path, out, data=None, manifest=None, labels=None, size=None, mean=None, std=None, resample=None,
            seed: int = 0, quiet: bool = True):
    """A Run (quantize.rundir.ModelRun) for export_variants: OUT holds float.keras and the variants."""
    from .rundir import ModelRun
    from oncolite.train.config import load_config

    if (data is None) == (manifest is None):
        raise OncoliteError(f"{model_path}: give the images for calibration and the validation gate with "
                            "--data DIR (class folders) or --manifest M (one of them)")
    out = Path(out) if out else Path(model_path).resolve().parent / f"{Path(model_path).name.split('.')[0]}_export"
    prep, facts, prepared = import_model(model_path, out, size, mean, std, resample, quiet)
    source = folder_data(data, labels, seed) if data else manifest_data(manifest, labels)
    where = data or manifest
    if facts["classes"] != len(source.labels):
        raise OncoliteError(f"{model_path}: {facts['classes']} outputs but {where} has {len(source.labels)} classes "
                            f"({', '.join(source.labels)}); give the model's classes with --labels in output order")
    sides = source.sides()
    for side, use in (("train", "calibration"), ("val", "the validation gate")):
        if not sides[side]:
            raise OncoliteError(f"{where}: no {side} images for {use}; split it with train and val sides "
                                "(oncolite split) or give --data DIR")
    config = {**load_config(), "seed": seed}
    return ModelRun(path=out, config=config, manifest=source, prep=prep, given_labels=list(source.labels),
                    source=facts), prepared
