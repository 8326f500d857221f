"""A .tflite classifier on the device: checked when loaded, quantized in, probabilities out.

`EdgeModel.load` refuses, with one line naming the file and the fix, anything that would give
silently wrong answers: not a TFLite file, truncated or corrupt, not one NHWC RGB input and one
[1, C] output, input/output types other than float32 or scaled int8/uint8, labels that do not
match C, a file that differs from its sidecar's sha256, a sidecar whose labels, preprocessing or
input/output facts disagree with the model's metadata or tensors.
Labels, preprocessing and the operating threshold come from the model's own metadata, the
sidecar `<model>.json` being the fallback for models without it.

Also the `info` command: `python -m edge_runtime info MODEL [--json]`.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime.backends import BACKENDS, make_interpreter
from edge_runtime.flatbuf import model_kind
from edge_runtime.errors import EXIT_OK, ModelError
from edge_runtime.hashing import bytes_sha256
from edge_runtime.metadata import MODEL_IDENTIFIER, read_metadata
from edge_runtime.preprocess import Preprocessing, dequantize, preprocess, quantize

# The model a fresh checkout ships: used when a command is given no MODEL.
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "busi" / "int8_qat.tflite"


def default_model_path() -> Path:
    if not SHIPPED_MODEL.is_file():
        raise ModelError(f"{SHIPPED_MODEL}: the shipped model is not there (not in this install); "
                         "pass a MODEL.tflite or run `oncolite run` to export one")
    return SHIPPED_MODEL


@dataclass
class TensorInfo:
    index: int
    dtype: type
    shape: tuple[int, ...]
    scale: float
    zero_point: int

    @classmethod
    def from_details(cls, d: dict) -> "TensorInfo":
        scale, zero_point = d.get("quantization", (0.0, 0))
        return cls(int(d["index"]), np.dtype(d["dtype"]).type, tuple(int(v) for v in d["shape"]),
                   float(scale), int(zero_point))

    @property
    def quantized(self) -> bool:
        return np.issubdtype(self.dtype, np.integer) and self.scale > 0

    def to_dict(self) -> dict:
        return {"dtype": np.dtype(self.dtype).name, "shape": list(self.shape),
                "scale": self.scale, "zero_point": self.zero_point}


@dataclass
class EdgeModel:
    path: Path
    interpreter: object
    backend: str
    labels: list[str]
    prep: Preprocessing
    threshold: dict | None
    input: TensorInfo
    output: TensorInfo
    kind: str
    sha256: str
    size_bytes: int
    facts: dict = field(default_factory=dict)  # oncolite.json from the metadata, or the sidecar
    has_metadata: bool = False
    # An interpreter is not re-entrant: the field server calls predict from several threads.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, path, backend: str | None = None, threads: int | None = None, resolver: str = "default") -> "EdgeModel":
        path = Path(path)
        data = _read_model_bytes(path)
        digest = bytes_sha256(data)
        sidecar = _read_sidecar(path)
        _check_sidecar_hash(path, sidecar, digest)
        try:
            metadata = read_metadata(data)
            kind = model_kind(data)
        except ModelError as e:
            raise ModelError(f"{path}: {e}") from None
        except Exception as e:  # a truncated flatbuffer fails in whatever field is read first
            raise ModelError(f"{path}: not a valid TFLite flatbuffer ({type(e).__name__}); "
                             "the file is truncated or corrupt, re-copy or re-export it") from None
        interpreter, backend_name = make_interpreter(data, backend=backend, threads=threads, resolver=resolver,
                                                     name=os.fsdecode(path))
        inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
        _check_tensors(path, inputs, outputs)
        tensors = {"input": TensorInfo.from_details(inputs[0]), "output": TensorInfo.from_details(outputs[0])}
        _check_tensor_types(path, tensors)
        _check_sidecar_agrees(path, metadata, sidecar)
        for where, described in ((sidecar_path(path).name, sidecar), ("the model's metadata", (metadata or {}).get("extra"))):
            _check_io_facts(path, where, described, tensors)
        facts = (metadata or {}).get("extra") or sidecar or {}
        labels = (metadata or {}).get("labels") or (sidecar or {}).get("labels")
        model = cls(path=path, interpreter=interpreter, backend=backend_name,
                    labels=_check_labels(path, labels, int(outputs[0]["shape"][-1])),
                    prep=_prep(path, metadata, sidecar, inputs[0]), threshold=None,
                    input=tensors["input"], output=tensors["output"],
                    kind=kind, sha256=digest, size_bytes=len(data), facts=facts, has_metadata=metadata is not None)
        model.threshold = _check_threshold(path, facts.get("threshold", (sidecar or {}).get("threshold")), model.labels)
        return model

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 N x H x W x 3, normalized -> float32 N x C probabilities (each row sums to 1)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        expected = (self.prep.height, self.prep.width, 3)
        if x.shape[1:] != expected:
            raise ValueError(f"expected inputs of shape N x {expected}, got {x.shape}")
        return np.stack([self.run(self.quantize_input(sample[None])) for sample in x])

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Normalized float32 1 x H x W x 3 -> the input tensor's dtype (int8/uint8 with its scale and zero point)."""
        if self.input.quantized:
            return quantize(x, self.input.scale, self.input.zero_point, self.input.dtype)
        return np.asarray(x, dtype=self.input.dtype)

    def run(self, tensor: np.ndarray) -> np.ndarray:
        """One inference on an input tensor from quantize_input -> C probabilities."""
        with self._lock:
            self.interpreter.set_tensor(self.input.index, tensor)
            self.interpreter.invoke()
            y = self.interpreter.get_tensor(self.output.index)[0]
        if self.output.quantized:
            y = dequantize(y, self.output.scale, self.output.zero_point)
        return to_probabilities(y)

    def prepare(self, source) -> np.ndarray:
        """File path or bytes -> this model's float32 input (the one shared preprocessing)."""
        return preprocess(source, self.prep)

    def predict_file(self, source) -> np.ndarray:
        return self.predict(self.prepare(source))[0]

    def decide(self, probs) -> int:
        """Index of the predicted label: the threshold's positive class if p >= value, else argmax."""
        probs = np.asarray(probs, dtype=np.float64)
        if self.threshold is None:
            return int(np.argmax(probs))
        positive = self.labels.index(self.threshold["positive"])
        if probs[positive] >= self.threshold["value"]:
            return positive
        others = probs.copy()
        others[positive] = -np.inf
        return int(np.argmax(others))

    def info(self) -> dict:
        return {"path": os.fsdecode(self.path), "backend": self.backend, "kind": self.kind,
                "labels": self.labels, "preprocessing": self.prep.to_dict(), "threshold": self.threshold,
                "input": self.input.to_dict(), "output": self.output.to_dict(), "sha256": self.sha256,
                "size_bytes": self.size_bytes, "metadata": self.has_metadata,
                "variant": self.facts.get("variant")}


def to_probabilities(y: np.ndarray) -> np.ndarray:
    """Renormalize a softmax output (int8 rounding leaves its sum slightly off 1); softmax logits.

    Our models end in softmax; an output with negative values or a sum far from 1 is logits.
    """
    y = np.asarray(y, dtype=np.float64)
    total = y.sum()
    if y.min() >= 0 and abs(total - 1.0) <= 0.1:
        return (y / total).astype(np.float32)
    e = np.exp(y - y.max())
    return (e / e.sum()).astype(np.float32)


def _read_model_bytes(path: Path) -> bytes:
    if not path.exists():
        raise ModelError(f"{path}: model file not found; check the path")
    if path.is_dir():
        raise ModelError(f"{path}: is a folder; pass the .tflite file inside it")
    try:
        data = path.read_bytes()
    except PermissionError:
        raise ModelError(f"{path}: permission denied; make the model readable") from None
    if len(data) < 8 or data[4:8] != MODEL_IDENTIFIER:
        raise ModelError(f"{path}: not a TFLite model (no {MODEL_IDENTIFIER.decode()} flatbuffer identifier; "
                         f"{len(data)} bytes); pass a .tflite file, or re-copy it if the copy is damaged")
    return data


def sidecar_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def _read_sidecar(path: Path) -> dict | None:
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        facts = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{sidecar}: unreadable model sidecar ({e}); re-export the model or delete the sidecar") from None
    if not isinstance(facts, dict):
        raise ModelError(f"{sidecar}: model sidecar is not a JSON object; re-export the model or delete the sidecar")
    return facts


def _check_sidecar_hash(path: Path, sidecar: dict | None, digest: str) -> None:
    expected = (sidecar or {}).get("sha256")
    if expected and expected != digest:
        raise ModelError(f"{path}: sha256 {digest[:12]}... does not match {sidecar_path(path).name} "
                         f"({str(expected)[:12]}...): the model changed or the copy is incomplete; "
                         "copy the model and its sidecar together again, or re-export")


def _check_tensors(path: Path, inputs: list, outputs: list) -> None:
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"{path}: expected one input and one output tensor, found {len(inputs)} and "
                         f"{len(outputs)}; export an image classifier")
    shape_in, shape_out = list(inputs[0]["shape"]), list(outputs[0]["shape"])
    if len(shape_in) != 4 or shape_in[0] != 1 or shape_in[3] != 3:
        raise ModelError(f"{path}: input shape {shape_in} is not [1, H, W, 3] (NHWC RGB); export the model with that input")
    if len(shape_out) != 2 or shape_out[0] != 1 or shape_out[1] < 2:
        raise ModelError(f"{path}: output shape {shape_out} is not [1, C] class scores; export a classifier head")


# Tensor types the runtime knows how to feed and read (quantize_input / run).
IO_DTYPES = ("float32", "int8", "uint8")


def _check_tensor_types(path: Path, tensors: dict[str, TensorInfo]) -> None:
    for role, t in tensors.items():
        dtype = np.dtype(t.dtype).name
        if dtype not in IO_DTYPES:
            raise ModelError(f"{path}: {role} tensor is {dtype}, not one of {', '.join(IO_DTYPES)}; "
                             "export the model with float32, int8 or uint8 input and output")
        if dtype != "float32" and not t.quantized:
            raise ModelError(f"{path}: {role} tensor is {dtype} with no quantization scale, so its values "
                             "cannot be converted; re-export the model with a representative dataset")


def _check_sidecar_agrees(path: Path, metadata: dict | None, sidecar: dict | None) -> None:
    """A model with metadata and a sidecar: both must say the same, or one belongs to another model."""
    if metadata is None or sidecar is None:
        return
    name = sidecar_path(path).name
    ours, theirs = metadata.get("labels"), sidecar.get("labels")
    if ours and theirs is not None and [str(v) for v in theirs] != [str(v) for v in ours]:
        raise ModelError(f"{path}: labels {list(ours)} in the model's metadata but {list(theirs)} in {name}; "
                         "the sidecar belongs to another model, copy the model with its own sidecar or re-export")
    stored = sidecar.get("preprocessing")
    if stored and not _same_prep(metadata["prep"], Preprocessing.from_dict(stored)):
        raise ModelError(f"{path}: preprocessing {metadata['prep'].to_dict()} in the model's metadata but {stored} "
                         f"in {name}; the sidecar belongs to another model, copy the model with its own sidecar or re-export")


def _same_prep(a: Preprocessing, b: Preprocessing) -> bool:
    # Metadata stores mean/std as float32: compare at that precision.
    return ((a.height, a.width, a.resample) == (b.height, b.width, b.resample)
            and np.allclose(a.mean, b.mean, rtol=1e-6) and np.allclose(a.std, b.std, rtol=1e-6))


def _check_io_facts(path: Path, where: str, described: dict | None, tensors: dict[str, TensorInfo]) -> None:
    """The input/output facts a sidecar (or the metadata) records must be the model's real tensors:
    a wrong scale or zero point would quantize every input wrongly without any error."""
    for role, t in tensors.items():
        facts = (described or {}).get(role)
        if not isinstance(facts, dict):
            continue
        real = t.to_dict()
        # Export writes null scale and zero point for float tensors; the interpreter reports 0.
        said = {"dtype": facts.get("dtype"), "shape": facts.get("shape"),
                "scale": facts.get("scale") or 0.0, "zero_point": facts.get("zero_point") or 0}
        same = (said["dtype"] == real["dtype"] and list(said["shape"] or []) == real["shape"]
                and np.isclose(float(said["scale"]), real["scale"], rtol=1e-6, atol=0.0)
                and int(said["zero_point"]) == real["zero_point"])
        if not same:
            raise ModelError(f"{path}: {where} describes the {role} tensor as {said} but the model has {real}; "
                             "the description belongs to another model, copy the model with its own sidecar or re-export")


def _check_labels(path: Path, labels, num_outputs: int) -> list[str]:
    if not labels:
        raise ModelError(f"{path}: no labels in the model's metadata or in {sidecar_path(path).name}; "
                         "re-export the model with metadata (oncolite export)")
    labels = [str(label) for label in labels]
    if len(labels) != num_outputs:
        raise ModelError(f"{path}: {len(labels)} labels {labels} but the model has {num_outputs} outputs; "
                         "the labels belong to another model, re-export it")
    return labels


def _prep(path: Path, metadata: dict | None, sidecar: dict | None, details: dict) -> Preprocessing:
    height, width = int(details["shape"][1]), int(details["shape"][2])
    if metadata is not None:
        prep = metadata["prep"]
    elif sidecar and sidecar.get("preprocessing"):
        prep = Preprocessing.from_dict(sidecar["preprocessing"])
    else:
        prep = Preprocessing(height=height, width=width)
    if (prep.height, prep.width) != (height, width):
        raise ModelError(f"{path}: preprocessing says {prep.height}x{prep.width} but the input tensor is "
                         f"{height}x{width}; re-export the model")
    return prep


def _check_threshold(path: Path, threshold, labels: list[str]) -> dict | None:
    if threshold is None:
        return None
    ok = (isinstance(threshold, dict) and threshold.get("positive") in labels
          and isinstance(threshold.get("value"), (int, float)) and 0.0 <= threshold["value"] <= 1.0)
    if not ok:
        raise ModelError(f"{path}: threshold {threshold!r} is not {{'positive': one of {labels}, 'value': 0..1}}; "
                         "re-export the model with a valid operating point")
    return {"positive": threshold["positive"], "value": float(threshold["value"])}


# --- `info` command --------------------------------------------------------------------------

def add_arguments(parser) -> None:
    from edge_runtime.console import add_output_flags

    parser.add_argument("model", nargs="?", help="a .tflite model (default: the shipped BUSI int8 model)")
    parser.add_argument("--backend", choices=BACKENDS, help="force an interpreter")
    add_output_flags(parser)


def main(args) -> int:
    from edge_runtime.console import print_json, say

    model = EdgeModel.load(args.model or default_model_path(), backend=args.backend)
    info = model.info()
    if args.json:
        print_json(info)
        return EXIT_OK
    threshold = info["threshold"]
    say(args,
        f"model        {info['path']} ({info['size_bytes']} bytes, sha256 {info['sha256'][:16]}...)",
        f"kind         {info['kind']}{' / ' + info['variant'] if info['variant'] else ''}; backend {info['backend']}",
        f"labels       {', '.join(info['labels'])}",
        f"input        {_tensor_line(info['input'])}",
        f"output       {_tensor_line(info['output'])}",
        f"preprocess   {model.prep.height}x{model.prep.width} {model.prep.resample}, mean {list(model.prep.mean)} std {list(model.prep.std)}",
        f"threshold    {_threshold_text(threshold)}",
        f"metadata     {'standard TFLite metadata' if info['metadata'] else 'none (sidecar JSON used)'}",
        "checks       passed")
    return EXIT_OK


def _threshold_text(threshold: dict | None) -> str:
    if threshold is None:
        return "none (argmax)"
    return f"{threshold['positive']} if p({threshold['positive']}) >= {threshold['value']:g}"


def _tensor_line(t: dict) -> str:
    quant = f", scale {t['scale']:.6g} zero point {t['zero_point']}" if t["scale"] else ""
    return f"{t['dtype']} {t['shape']}{quant}"
