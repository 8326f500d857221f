"""Read flatbuffer tables by field slot, and the few fields of a .tflite model the runtime needs.

The device must not need TensorFlow or ai-edge-litert's generated schema to read a model: the
tflite-runtime environment has neither. Slots are the field positions in the schema files
(tensorflow/lite/schema/schema.fbs, metadata_schema.fbs); a union takes two (type, value).
"""

from __future__ import annotations

import flatbuffers
import numpy as np
from flatbuffers import number_types as N
from flatbuffers.table import Table

# schema.fbs field slots.
MODEL = dict(version=0, operator_codes=1, subgraphs=2, description=3, buffers=4, metadata_buffer=5, metadata=6)
SUBGRAPH = dict(tensors=0, inputs=1, outputs=2, operators=3, name=4)
TENSOR = dict(shape=0, type=1, buffer=2, name=3, quantization=4)
OPERATOR = dict(opcode_index=0, inputs=1, outputs=2)
BUFFER = dict(data=0, offset=1, size=2)
METADATA = dict(name=0, buffer=1)
# schema.fbs TensorType values.
FLOAT32, UINT8, INT8 = 0, 3, 9


def root(buf: bytes) -> Table:
    return Table(bytearray(buf), flatbuffers.encode.Get(flatbuffers.packer.uoffset, buf, 0))


def field(t: Table, slot: int) -> int:
    return t.Offset(4 + 2 * slot)


def string(t: Table, slot: int) -> str | None:
    o = field(t, slot)
    return t.String(o + t.Pos).decode("utf-8") if o else None


def scalar(t: Table, slot: int, flags=N.Int32Flags):
    o = field(t, slot)
    return t.Get(flags, o + t.Pos) if o else 0


def child(t: Table, slot: int) -> Table | None:
    o = field(t, slot)
    return Table(t.Bytes, t.Indirect(o + t.Pos)) if o else None


def union(t: Table, slot: int) -> Table | None:
    o = field(t, slot)
    if not o:
        return None
    u = Table(bytearray(), 0)
    t.Union(u, o)
    return u


def tables(t: Table, slot: int) -> list[Table]:
    o = field(t, slot)
    if not o:
        return []
    start = t.Vector(o)
    return [Table(t.Bytes, t.Indirect(start + 4 * i)) for i in range(t.VectorLen(o))]


def numbers(t: Table, slot: int, flags) -> np.ndarray:
    o = field(t, slot)
    return t.GetVectorAsNumpy(flags, o) if o else np.zeros(0, dtype=flags.py_type)


def vector_bytes(t: Table, slot: int) -> bytes:
    o = field(t, slot)
    if not o:
        return b""
    start = t.Vector(o)
    return bytes(t.Bytes[start:start + t.VectorLen(o)])


def buffer_bytes(model_bytes: bytes, model: Table, index: int) -> bytes:
    """A model buffer's data, inline or (large models) stored after the flatbuffer at offset/size."""
    buffer = tables(model, MODEL["buffers"])[index]
    offset = scalar(buffer, BUFFER["offset"], N.Uint64Flags)
    if offset > 1:
        return bytes(model_bytes[offset:offset + scalar(buffer, BUFFER["size"], N.Uint64Flags)])
    return vector_bytes(buffer, BUFFER["data"])


def model_kind(model_bytes: bytes) -> str:
    """'dynamic' for dynamic-range models (float activations, int8 weights), else 'integer' or 'float'.

    A dynamic-range ("hybrid") op takes a float activation and an int8 constant weight and gives
    a float result; a full-integer model has integer activations instead.
    """
    model = root(model_bytes)
    graph = tables(model, MODEL["subgraphs"])[0]
    tensors = tables(graph, SUBGRAPH["tensors"])
    has_data = [field(b, BUFFER["data"]) != 0 or scalar(b, BUFFER["offset"], N.Uint64Flags) > 1
                for b in tables(model, MODEL["buffers"])]
    integer = False
    for op in tables(graph, SUBGRAPH["operators"]):
        ins = [tensors[i] for i in numbers(op, OPERATOR["inputs"], N.Int32Flags) if i >= 0]
        outs = [scalar(tensors[i], TENSOR["type"], N.Int8Flags) for i in numbers(op, OPERATOR["outputs"], N.Int32Flags)]
        in_types = [scalar(t, TENSOR["type"], N.Int8Flags) for t in ins]
        const_int8 = any(scalar(t, TENSOR["type"], N.Int8Flags) == INT8 and has_data[scalar(t, TENSOR["buffer"], N.Uint32Flags)]
                         for t in ins)
        if FLOAT32 in in_types and FLOAT32 in outs and const_int8:
            return "dynamic"
        integer = integer or INT8 in outs or UINT8 in outs
    return "integer" if integer else "float"
