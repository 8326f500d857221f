"""Models for the in-browser field page tests: uint8 input/output, static batch 1.

- `browser_variant(src, dst)`: the shipped int8 model (int8 I/O, dynamic batch) rewritten as the
  `int8_uint8` export will be: a QUANTIZE uint8->int8 in front, a QUANTIZE int8->uint8 behind
  (what TFLiteConverter emits for uint8 I/O), every batch dimension fixed at 1, the same
  metadata and a sidecar. The int8 network in between is untouched, so its answers are the
  shipped model's. No TensorFlow needed.
- `tiny_model(folder, ...)`: a tiny tf-keras conv net with `keras.Input(batch_size=1)`, converted
  by TFLiteConverter to full int8 with uint8 I/O.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from edge_runtime.atomic import write_bytes, write_json
from edge_runtime.metadata import _AlignedBuilder, read_metadata, write_metadata
from edge_runtime.preprocess import Preprocessing

QUANTIZE = 114  # schema.fbs BuiltinOperator
SIZE = 16


def browser_variant(src: Path, dst: Path, uncertain_margin=None) -> Path:
    from ai_edge_litert import schema_py_generated as schema

    data = Path(src).read_bytes()
    meta = read_metadata(data)
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    graph = model.subgraphs[0]
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    if QUANTIZE not in codes:
        code = schema.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = QUANTIZE
        code.version = 1
        model.operatorCodes.append(code)
        codes.append(QUANTIZE)
    opcode = codes.index(QUANTIZE)

    def uint8_twin(index: int, name: str) -> int:
        old = graph.tensors[index]
        assert old.type == schema.TensorType.INT8, "expects an int8-I/O model"
        t = schema.TensorT()
        t.name = name
        t.type = schema.TensorType.UINT8
        t.shape = np.asarray(old.shape, dtype=np.int32)
        q = schema.QuantizationParametersT()
        q.scale = np.asarray(old.quantization.scale, dtype=np.float32)
        q.zeroPoint = np.asarray(old.quantization.zeroPoint, dtype=np.int64) + 128
        t.quantization = q
        model.buffers.append(schema.BufferT())
        t.buffer = len(model.buffers) - 1
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    def quantize_op(src_index: int, dst_index: int):
        op = schema.OperatorT()
        op.opcodeIndex = opcode
        op.inputs = np.asarray([src_index], dtype=np.int32)
        op.outputs = np.asarray([dst_index], dtype=np.int32)
        return op

    old_in, old_out = int(graph.inputs[0]), int(graph.outputs[0])
    new_in, new_out = uint8_twin(old_in, "image_uint8"), uint8_twin(old_out, "probabilities_uint8")
    graph.operators.insert(0, quantize_op(new_in, old_in))
    graph.operators.append(quantize_op(old_out, new_out))
    graph.inputs = np.asarray([new_in], dtype=np.int32)
    graph.outputs = np.asarray([new_out], dtype=np.int32)
    for signature in model.signatureDefs or []:
        for ti in [*signature.inputs, *signature.outputs]:
            ti.tensorIndex = {old_in: new_in, old_out: new_out}.get(ti.tensorIndex, ti.tensorIndex)
    for t in graph.tensors:  # static batch 1
        if t.shapeSignature is not None and len(t.shapeSignature) and t.shapeSignature[0] == -1:
            t.shapeSignature = np.asarray([1, *t.shapeSignature[1:]], dtype=np.int32)
    b = _AlignedBuilder(len(data) + 4096)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")

    extra = dict(meta["extra"])
    for role, index in (("input", new_in), ("output", new_out)):
        t = graph.tensors[index]
        extra[role] = {"dtype": "uint8", "shape": [int(v) for v in t.shape],
                       "scale": float(t.quantization.scale[0]), "zero_point": int(t.quantization.zeroPoint[0])}
    extra.update(variant="int8_uint8", description="full-integer int8, uint8 input/output, batch 1 (browser)",
                 uncertain_margin=uncertain_margin)
    extra.pop("calibration", None)
    return save(dst, write_metadata(bytes(b.Output()), name="oncolite int8_uint8", description=extra["description"],
                                    labels=meta["labels"], prep=meta["prep"], extra=extra), extra)


def save(path: Path, data: bytes, extra: dict) -> Path:
    """The model and its sidecar (DEVELOPERS.md's format)."""
    path = write_bytes(Path(path), data)
    write_json(path.with_suffix(".json"), {**extra, "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)})
    return path


@functools.lru_cache(maxsize=None)
def _tiny_bytes(seed: int, labels: tuple) -> bytes:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3), batch_size=1)
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(labels), activation="softmax", name="predictions",
                                 kernel_initializer=keras.initializers.RandomNormal(stddev=2.0))(x)
    converter = tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, outputs))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(seed)
    converter.representative_dataset = lambda: ([rng.uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)] for _ in range(16))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.uint8
    return converter.convert()


def tiny_model(folder: Path, name: str = "int8_uint8", seed: int = 0, labels=("benign", "malignant", "normal"),
               threshold=None, uncertain_margin=None) -> Path:
    """A tiny uint8-I/O, batch-1 model with metadata and sidecar at `<folder>/<name>.tflite`."""
    from ai_edge_litert.interpreter import Interpreter

    data = _tiny_bytes(seed, tuple(labels))
    it = Interpreter(model_content=data)
    facts = {}
    for role, d in (("input", it.get_input_details()[0]), ("output", it.get_output_details()[0])):
        scale, zero_point = d["quantization"]
        facts[role] = {"dtype": np.dtype(d["dtype"]).name, "shape": [int(v) for v in d["shape"]],
                       "scale": float(scale), "zero_point": int(zero_point)}
    prep = Preprocessing(height=SIZE, width=SIZE)
    extra = {"format": "oncolite-model/1", "variant": "int8_uint8", "labels": list(labels),
             "preprocessing": prep.to_dict(), **facts, "threshold": threshold, "uncertain_margin": uncertain_margin}
    data = write_metadata(data, name=f"tiny {name}", description="tiny browser test classifier", labels=list(labels),
                          prep=prep, extra=extra)
    return save(Path(folder) / f"{name}.tflite", data, extra)
