"""Standard TFLite model metadata (metadata_schema.fbs), written and read without tflite-support.

A `.tflite` that carries its own labels and normalization can be used as it is by MediaPipe
Tasks, LiteRT support libraries and Android Studio. The format: a `ModelMetadata` flatbuffer
(file identifier `M001`) stored in one of the model's buffers and named `TFLITE_METADATA` in
the model's `metadata` list; the files it names (`labels.txt`, our `oncolite.json`) are zipped,
uncompressed, onto the end of the model file.

tflite-support (the reference writer) cannot be installed beside TensorFlow 2.21 (protobuf), so
the small subset of the schema we use is encoded here with the `flatbuffers` runtime. Slot
numbers are the field positions in metadata_schema.fbs (a union takes two slots: type, value).
"""

from __future__ import annotations

import io
import json
import zipfile

import flatbuffers
import numpy as np
from flatbuffers import number_types as N
from flatbuffers.table import Table

from edge_runtime import flatbuf as fb
from edge_runtime.atomic import json_default
from edge_runtime.errors import ModelError
from edge_runtime.preprocess import Preprocessing

METADATA_NAME = "TFLITE_METADATA"
FILE_IDENTIFIER = b"M001"
MODEL_IDENTIFIER = b"TFL3"
# The smallest parser version that understands every field we write (all exist since 1.0.0).
MIN_PARSER_VERSION = "1.0.0"
LABELS_FILE = "labels.txt"
EXTRA_FILE = "oncolite.json"

# Enum values from metadata_schema.fbs.
_ASSOCIATED_DESCRIPTIONS = 1
_ASSOCIATED_TENSOR_AXIS_LABELS = 2
_COLOR_SPACE_RGB = 1
_CONTENT_FEATURE = 1
_CONTENT_IMAGE = 2
_PROCESS_UNIT_NORMALIZATION = 1

# Field slots (position in the table's field list) from metadata_schema.fbs.
_MODEL = dict(name=0, description=1, version=2, subgraph_metadata=3, author=4, license=5,
              associated_files=6, min_parser_version=7)
_SUBGRAPH = dict(name=0, description=1, input_tensor_metadata=2, output_tensor_metadata=3, associated_files=4)
_TENSOR = dict(name=0, description=1, dimension_names=2, content=3, process_units=4, stats=5, associated_files=6)
_CONTENT = dict(content_properties_type=0, content_properties=1, range=2)
_IMAGE_PROPERTIES = dict(color_space=0, default_size=1)
_IMAGE_SIZE = dict(width=0, height=1)
_PROCESS_UNIT = dict(options_type=0, options=1)
_NORMALIZATION = dict(mean=0, std=1)
_ASSOCIATED_FILE = dict(name=0, description=1, type=2, locale=3)


# --- writing ---------------------------------------------------------------------------------

def write_metadata(model_bytes: bytes, *, name: str, description: str, labels, prep: Preprocessing,
                   extra: dict | None = None) -> bytes:
    """Return `model_bytes` with standard metadata, `labels.txt` and `oncolite.json` attached.

    Existing metadata is replaced, so writing twice gives the same result as writing once.
    `extra` (the sidecar facts, e.g. `threshold`) is stored as `oncolite.json`, completed with
    the preprocessing so the file alone describes the model.
    """
    labels = [str(label) for label in labels]
    bad = [label for label in labels if not label or "\n" in label or "\r" in label]
    if bad:
        raise ValueError(f"labels must be non-empty single lines, got {bad!r}")
    extra = dict(extra or {})
    extra["labels"] = labels
    extra["preprocessing"] = prep.to_dict()
    metadata = _encode_model_metadata(name, description, prep)
    flat = _with_metadata_buffer(model_bytes, metadata)
    files = {LABELS_FILE: "\n".join(labels) + "\n", EXTRA_FILE: json.dumps(extra, indent=2, default=json_default) + "\n"}
    return _append_zip(flat, files)


def _encode_model_metadata(name: str, description: str, prep: Preprocessing) -> bytes:
    b = flatbuffers.Builder(1024)
    image = _encode_input_tensor(b, prep)
    probabilities = _encode_output_tensor(b)
    subgraph = _table(b, _SUBGRAPH, name=b.CreateString(name),
                      input_tensor_metadata=_offsets(b, [image]),
                      output_tensor_metadata=_offsets(b, [probabilities]))
    extra_file = _associated_file(b, EXTRA_FILE, "oncolite facts: labels, preprocessing, threshold, provenance",
                                  _ASSOCIATED_DESCRIPTIONS)
    root = _table(b, _MODEL, name=b.CreateString(name), description=b.CreateString(description),
                  subgraph_metadata=_offsets(b, [subgraph]), associated_files=_offsets(b, [extra_file]),
                  min_parser_version=b.CreateString(MIN_PARSER_VERSION))
    b.Finish(root, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def _encode_input_tensor(b, prep: Preprocessing) -> int:
    size = _table(b, _IMAGE_SIZE, scalars=dict(width=(N.Uint32Flags, prep.width), height=(N.Uint32Flags, prep.height)))
    image = _table(b, _IMAGE_PROPERTIES, default_size=size, scalars=dict(color_space=(N.Int8Flags, _COLOR_SPACE_RGB)))
    content = _table(b, _CONTENT, content_properties=image,
                     scalars=dict(content_properties_type=(N.Uint8Flags, _CONTENT_IMAGE)))
    normalization = _table(b, _NORMALIZATION, mean=b.CreateNumpyVector(np.asarray(prep.mean, np.float32)),
                           std=b.CreateNumpyVector(np.asarray(prep.std, np.float32)))
    unit = _table(b, _PROCESS_UNIT, options=normalization,
                  scalars=dict(options_type=(N.Uint8Flags, _PROCESS_UNIT_NORMALIZATION)))
    return _table(b, _TENSOR, name=b.CreateString("image"),
                  description=b.CreateString("RGB image, normalized (x - mean) / std"),
                  content=content, process_units=_offsets(b, [unit]))


def _encode_output_tensor(b) -> int:
    feature = _table(b, {})  # FeatureProperties has no fields
    content = _table(b, _CONTENT, content_properties=feature,
                     scalars=dict(content_properties_type=(N.Uint8Flags, _CONTENT_FEATURE)))
    labels = _associated_file(b, LABELS_FILE, "class names, one per line, in output order",
                              _ASSOCIATED_TENSOR_AXIS_LABELS)
    return _table(b, _TENSOR, name=b.CreateString("probability"),
                  description=b.CreateString("probability of each class"),
                  content=content, associated_files=_offsets(b, [labels]))


def _associated_file(b, name: str, description: str, kind: int) -> int:
    return _table(b, _ASSOCIATED_FILE, name=b.CreateString(name), description=b.CreateString(description),
                  scalars=dict(type=(N.Int8Flags, kind)))


def _table(b, slots: dict, scalars: dict | None = None, **offsets) -> int:
    """One flatbuffer table: `offsets` are already-built children, `scalars` are (flags, value)."""
    b.StartObject(len(slots))
    for field, offset in offsets.items():
        b.PrependUOffsetTRelativeSlot(slots[field], offset, 0)
    for field, (flags, value) in (scalars or {}).items():
        b.Prepend(flags, value)
        b.Slot(slots[field])
    return b.EndObject()


def _offsets(b, children: list[int]) -> int:
    b.StartVector(4, len(children), 4)
    for child in reversed(children):
        b.PrependUOffsetTRelative(child)
    return b.EndVector()


class _AlignedBuilder(flatbuffers.Builder):
    """Keeps weight buffers 16-byte aligned (`force_align: 16` in the TFLite schema), as the converter does."""

    def CreateNumpyVector(self, x):
        if x.dtype == np.uint8 and x.size >= 16:
            self.StartVector(1, x.size, 16)
            self.head -= x.size
            self.Bytes[self.head:self.head + x.size] = x.tobytes()
            self.vectorNumElems = x.size
            return self.EndVector()
        return super().CreateNumpyVector(x)


def _with_metadata_buffer(flat: bytes, metadata: bytes) -> bytes:
    """Re-pack the model with `metadata` as the TFLITE_METADATA entry (replacing any old one).

    Re-packing rebuilds only the flatbuffer, so a zip appended by an earlier write is dropped.
    """
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(flat, 0))
    model.buffers = model.buffers or []
    model.metadata = model.metadata or []
    data = np.frombuffer(metadata, dtype=np.uint8)
    old = [m for m in model.metadata if _text(m.name) == METADATA_NAME]
    if old:  # reuse the old buffer rather than leave it orphaned in the file
        model.buffers[old[0].buffer].data = data
        model.metadata = [m for m in model.metadata if m is old[0] or _text(m.name) != METADATA_NAME]
    else:
        buffer = schema.BufferT()
        buffer.data = data
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = METADATA_NAME
        entry.buffer = len(model.buffers) - 1
        model.metadata.append(entry)
    b = _AlignedBuilder(len(flat) + len(metadata) + 1024)
    b.Finish(model.Pack(b), file_identifier=MODEL_IDENTIFIER)
    return bytes(b.Output())


def _append_zip(flat: bytes, files: dict[str, str]) -> bytes:
    out = io.BytesIO(flat)
    out.seek(0, io.SEEK_END)
    # Stored, not deflated: readers such as MediaPipe map the files straight out of the model.
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as archive:
        for file_name, text in files.items():
            archive.writestr(file_name, text.encode("utf-8"))
    return out.getvalue()


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else (value or "")


# --- reading ---------------------------------------------------------------------------------

def read_metadata(model_bytes: bytes) -> dict | None:
    """`{name, description, labels, prep, extra}` from a model's metadata, or None if it has none.

    Labels come from the output tensor's TENSOR_AXIS_LABELS file, mean/std and size from the
    input tensor's NormalizationOptions and ImageProperties; `extra` is `oncolite.json` (or {}).
    Raises ModelError when metadata is present but unreadable.
    """
    raw = metadata_buffer(model_bytes)
    if raw is None:
        return None
    try:
        return _decode(raw, _associated_files(model_bytes))
    except ModelError:
        raise
    except Exception as e:  # a corrupt flatbuffer surfaces as any of struct/index/unicode errors
        raise ModelError(f"TFLite metadata is corrupt ({type(e).__name__}: {e}); re-export the model") from None


def metadata_buffer(model_bytes: bytes) -> bytes | None:
    """The raw ModelMetadata flatbuffer stored under TFLITE_METADATA, or None."""
    model = fb.root(model_bytes)
    for entry in fb.tables(model, fb.MODEL["metadata"]):
        if fb.string(entry, fb.METADATA["name"]) == METADATA_NAME:
            return fb.buffer_bytes(model_bytes, model, fb.scalar(entry, fb.METADATA["buffer"], N.Uint32Flags))
    return None


def _associated_files(model_bytes: bytes) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(io.BytesIO(model_bytes)) as archive:
            return {info.filename: archive.read(info) for info in archive.infolist()}
    except zipfile.BadZipFile:
        return {}


def _decode(raw: bytes, files: dict[str, bytes]) -> dict:
    if raw[4:8] != FILE_IDENTIFIER:
        raise ModelError(f"TFLite metadata has identifier {raw[4:8]!r}, not {FILE_IDENTIFIER!r}; re-export the model")
    root = fb.root(raw)
    subgraphs = fb.tables(root, _MODEL["subgraph_metadata"])
    inputs = fb.tables(subgraphs[0], _SUBGRAPH["input_tensor_metadata"]) if subgraphs else []
    outputs = fb.tables(subgraphs[0], _SUBGRAPH["output_tensor_metadata"]) if subgraphs else []
    extra = json.loads(files[EXTRA_FILE].decode("utf-8")) if EXTRA_FILE in files else {}
    labels = _labels(outputs[0], files) if outputs else None
    return {"name": fb.string(root, _MODEL["name"]), "description": fb.string(root, _MODEL["description"]),
            "min_parser_version": fb.string(root, _MODEL["min_parser_version"]),
            "labels": labels if labels is not None else extra.get("labels"),
            "prep": _prep(inputs[0] if inputs else None, extra.get("preprocessing") or {}),
            "extra": extra}


def _labels(tensor: Table, files: dict[str, bytes]) -> list[str] | None:
    for f in fb.tables(tensor, _TENSOR["associated_files"]):
        if fb.scalar(f, _ASSOCIATED_FILE["type"], N.Int8Flags) == _ASSOCIATED_TENSOR_AXIS_LABELS:
            name = fb.string(f, _ASSOCIATED_FILE["name"])
            if name not in files:
                raise ModelError(f"TFLite metadata names label file {name!r} but the model carries none; re-export the model")
            return [line.strip() for line in files[name].decode("utf-8").splitlines() if line.strip()]
    return None


def _prep(tensor: Table | None, stored: dict) -> Preprocessing:
    values = dict(stored)
    if tensor is not None:
        for unit in fb.tables(tensor, _TENSOR["process_units"]):
            if fb.scalar(unit, _PROCESS_UNIT["options_type"], N.Uint8Flags) == _PROCESS_UNIT_NORMALIZATION:
                options = fb.union(unit, _PROCESS_UNIT["options"])
                values["mean"] = _floats(options, _NORMALIZATION["mean"]) or values.get("mean")
                values["std"] = _floats(options, _NORMALIZATION["std"]) or values.get("std")
        content = fb.child(tensor, _TENSOR["content"])
        if content is not None and fb.scalar(content, _CONTENT["content_properties_type"], N.Uint8Flags) == _CONTENT_IMAGE:
            size = fb.child(fb.union(content, _CONTENT["content_properties"]), _IMAGE_PROPERTIES["default_size"])
            if size is not None:
                values["width"] = fb.scalar(size, _IMAGE_SIZE["width"], N.Uint32Flags) or values.get("width")
                values["height"] = fb.scalar(size, _IMAGE_SIZE["height"], N.Uint32Flags) or values.get("height")
    return Preprocessing.from_dict({k: v for k, v in values.items() if v is not None})


def _floats(t: Table, slot: int) -> list[float]:
    return [float(v) for v in fb.numbers(t, slot, N.Float32Flags)]
