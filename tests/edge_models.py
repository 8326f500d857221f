"""Tiny .tflite models for the edge runtime tests: a small tf-keras conv net, converted to
fp32, full-integer int8 (int8 or uint8 I/O) and dynamic-range, with our metadata written in.

Built once per test session into a temporary folder (TensorFlow is imported only here).
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import numpy as np

from edge_runtime.atomic import write_bytes, write_json
from edge_runtime.metadata import write_metadata
from edge_runtime.preprocess import Preprocessing

SIZE = 16
LABELS = ["benign", "malignant", "normal"]
BINARY_LABELS = ["non-idc", "idc"]
PREP = Preprocessing(height=SIZE, width=SIZE)


@functools.lru_cache(maxsize=None)
def keras_model(num_classes: int = 3):
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.MaxPooling2D(2)(x)
    # Flatten makes the dense kernel big enough (> 1024 weights) for dynamic-range quantization.
    x = keras.layers.Flatten()(x)
    # Large weights so the classes differ visibly between images.
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions",
                                 kernel_initializer=keras.initializers.RandomNormal(stddev=0.3))(x)
    return keras.Model(inputs, outputs)


def calibration_images(n: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def tflite_bytes(variant: str, num_classes: int = 3) -> bytes:
    """Plain converter output: variant fp32, int8 (int8 I/O), uint8 (uint8 I/O), dynamic."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model(num_classes))
    if variant != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant in ("int8", "uint8"):
        converter.representative_dataset = lambda: ([x[None]] for x in calibration_images())
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = getattr(tf, variant)
    return converter.convert()


@functools.lru_cache(maxsize=None)
def _folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="oncolite-edge-models-"))


def model_with_metadata(variant: str = "int8", labels=tuple(LABELS), threshold=None) -> bytes:
    extra = {"format": "oncolite-model/1", "variant": variant, "threshold": threshold}
    return write_metadata(tflite_bytes(variant, len(labels)), name=f"tiny {variant}",
                          description="tiny test classifier", labels=list(labels), prep=PREP, extra=extra)


def model_file(folder: Path, variant: str = "int8", labels=tuple(LABELS), threshold=None, sidecar=True) -> Path:
    """Write `<folder>/<variant>.tflite` with metadata (and its sidecar JSON); return the path."""
    data = model_with_metadata(variant, labels, threshold)
    path = write_bytes(Path(folder) / f"{variant}.tflite", data)
    if sidecar:
        import hashlib

        write_json(path.with_suffix(".json"), {
            "format": "oncolite-model/1", "variant": variant, "labels": list(labels),
            "preprocessing": PREP.to_dict(), "sha256": hashlib.sha256(data).hexdigest(),
            "size_bytes": len(data), "threshold": threshold})
    return path


def write_images(folder: Path, n: int = 3, size: int = 24) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(1)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths
