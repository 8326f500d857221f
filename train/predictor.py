"""A model file behind one interface, for evaluate and the benchmark: a `.keras` (float or QAT) or
a `.tflite` (through the edge runtime, as the device runs it) -> probabilities over manifest
items; and what a MODEL argument names (a model file, a variant in a run, or a run directory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from edge_runtime.console import progress
from edge_runtime.errors import ModelError
from edge_runtime.preprocess import Preprocessing
from .rundir import RunDir


# --- models -------------------------------------------------------------------------------------

@dataclass
class Predictor:
    """A loaded model behind one interface: normalized float32 batch -> N x C probabilities."""

    predict: Callable[[np.ndarray], np.ndarray]
    prep: Preprocessing
    labels: list[str] | None  # None when the model file does not carry them (.keras)
    threshold: dict | None  # {"positive": label, "value": p} stored with the model, if any


def load_predictor(model_path, run_dir=None) -> Predictor:
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelError(f"{model_path}: model file not found; give a .keras, a .tflite or a run directory")
    if model_path.suffix == ".tflite":
        from edge_runtime.model import EdgeModel

        edge = EdgeModel.load(model_path)
        return Predictor(edge.predict, edge.prep, list(edge.labels), edge.threshold)
    if model_path.suffix != ".keras":
        raise ModelError(f"{model_path}: not a .keras or .tflite model; give one of those or a run directory")
    model = load_keras(model_path)
    return Predictor(lambda x: np.asarray(model.predict_on_batch(x), dtype=np.float32),
                     keras_preprocessing(model, run_dir), None, None)


def load_keras(path):
    """A tf-keras model, QAT wrappers included (tfmot's scope), with Keras' safe mode on."""
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    try:
        with tfmot.quantization.keras.quantize_scope():
            return keras.models.load_model(path, compile=False, safe_mode=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot load the Keras model ({str(e).splitlines()[0]}); re-train or re-export it") from None


def keras_preprocessing(model, run_dir=None) -> Preprocessing:
    """The run's preprocessing (its config.json) when there is a run, else the model's input size
    with the default normalization and resampling."""
    if run_dir and RunDir(run_dir).config_file.is_file():
        from .config import preprocessing

        return preprocessing(RunDir(run_dir).config())
    _, height, width, _ = model.input_shape
    return Preprocessing(height=height, width=width)


def predict_items(model_path, items, prep=None, batch_size: int = 32, quiet: bool = False,
                  predictor: Predictor | None = None) -> np.ndarray:
    """N x C probabilities of a model file over manifest items, loaded in batches (bounded memory).

    `prep` overrides the model's own preprocessing; pass `predictor` to reuse a loaded model.
    """
    from .data import load_arrays

    predictor = predictor or load_predictor(model_path, resolve_model(model_path)[1])
    prep = prep or predictor.prep
    # load_arrays also returns label indices; any label list that covers the items will do here.
    names = sorted({item["label"] for item in items})
    chunks = []
    bar = progress(total=len(items), desc=f"predicting {Path(model_path).name}", quiet=quiet, unit="img")
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        x, _ = load_arrays(batch, names, prep, quiet=True)
        chunks.append(np.asarray(predictor.predict(x), dtype=np.float32))
        bar.update(len(batch))
    bar.close()
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)


# --- what MODEL names ---------------------------------------------------------------------------

def resolve_model(model_arg, fold=None):
    """MODEL argument -> (model file, run directory or None, default output folder)."""
    path = Path(model_arg)
    if path.is_dir():
        run = RunDir(path).fold(fold) if fold is not None and RunDir(path).fold(fold).path.is_dir() else RunDir(path)
        if not run.float_model.is_file():
            raise ModelError(f"{run.path}: no models/float.keras in this run directory; train first or give a model file")
        return run.float_model, run.path, run.eval_dir("float")
    run = RunDir(path.parent.parent)
    if path.parent == run.models:  # a variant inside a run directory
        return path, run.path, run.eval_dir(path.stem)
    return path, None, path.parent / "eval" / path.stem  # a model elsewhere: its report beside it
