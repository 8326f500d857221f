"""A .tflite classifier on the device: checked when loaded, quantized in, probabilities out.

`EdgeModel.load` refuses, with one line naming the file and the fix, anything that would give
silently wrong answers: not a regular file (a pipe or a device would block or never end), not a
TFLite file, truncated or corrupt, not one NHWC RGB input and one [1, C] output, input/output
types other than float32 or scaled int8/uint8, labels that do not match C, a sidecar that does
not name the model's sha256 or names another, a sidecar whose labels, preprocessing or
input/output facts disagree with the model's metadata or tensors, an invalid threshold or
uncertain band.
Labels, preprocessing, the operating threshold and the uncertain band come from the model's own
metadata, the sidecar `<model>.json` being the fallback for models without it.

`prediction_record` is one image's answer in the one shape predict prints and the field server
returns: label, probabilities, top classes, the decision rule and the uncertain flag.

Also the `info` command: `python -m edge_runtime info MODEL [--json]`.
"""

from __future__ import annotations

import json
import math
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime.backends import BACKENDS, make_interpreter
from edge_runtime.decision import uncertain
from edge_runtime.flatbuf import model_kind
from edge_runtime.errors import EXIT_OK, ModelError, OncoliteError
from edge_runtime.hashing import bytes_sha256
from edge_runtime.metadata import MODEL_IDENTIFIER, read_metadata
from edge_runtime.preprocess import Preprocessing, dequantize, input_pixels, preprocess, quantize
from edge_runtime.resources import SHIPPED_MODEL

# A flatbuffer cannot be larger (32-bit offsets); a sidecar is a few KB of JSON.
MAX_MODEL_BYTES = 2**31
MAX_SIDECAR_BYTES = 2**20


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
    # Below this top-1 margin (decision.margins) the int8 answer may differ from the float
    # model's: flagged "uncertain". None: the model has no band.
    uncertain_margin: float | None = None
    # Why whoever uses this model should be told to be careful (e.g. an int8 model that lost
    # more accuracy against float on validation than the export gate allowed).
    warnings: list = field(default_factory=list)
    # An interpreter is not re-entrant: the field server calls predict from several threads.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _pixel_input: object = field(default=None, repr=False)  # edge_runtime.pixels.PixelInput, made when first used

    @classmethod
    def load(cls, path, backend: str | None = None, threads: int | None = None, resolver: str = "default",
             labels: list[str] | None = None, prep: Preprocessing | None = None) -> "EdgeModel":
        """`labels` and `prep`: for a bare model (no metadata, no sidecar) only; the model's own win."""
        path = Path(path)
        if threads is not None and threads < 1:
            raise OncoliteError(f"--threads {threads}: give 1 or more interpreter threads, "
                                "or leave it out for the backend's default")
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
        given_labels, given_prep = labels, prep
        labels = (metadata or {}).get("labels") or (sidecar or {}).get("labels") or given_labels
        model = cls(path=path, interpreter=interpreter, backend=backend_name,
                    labels=_check_labels(path, labels, int(outputs[0]["shape"][-1])),
                    prep=_prep(path, metadata, sidecar, inputs[0], given_prep), threshold=None,
                    input=tensors["input"], output=tensors["output"],
                    kind=kind, sha256=digest, size_bytes=len(data), facts=facts, has_metadata=metadata is not None)
        model.threshold = _check_threshold(path, facts.get("threshold", (sidecar or {}).get("threshold")), model.labels)
        model.uncertain_margin = _check_uncertain_margin(
            path, facts.get("uncertain_margin", (sidecar or {}).get("uncertain_margin")), model.threshold, model.labels)
        gate = (sidecar or {}).get("gate")
        if isinstance(gate, dict) and gate.get("passed") is False:
            model.warnings.append(f"{path}: this int8 model lost {gate.get('accuracy_loss', 0):.1%} accuracy against the "
                                  f"float model on validation, more than the export gate of {gate.get('gate', 0):.1%}; "
                                  "see the export report before relying on it")
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

    def input_from_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 H x W x 3 pixels (preprocess.resize) -> the input tensor: bit-identical to
        quantize_input(normalize(pixels)), without the float round trip (edge_runtime.pixels)."""
        if self._pixel_input is None:
            from edge_runtime.pixels import PixelInput

            self._pixel_input = PixelInput.for_model(self)
        return self._pixel_input(pixels)

    def input_tensor(self, source) -> np.ndarray:
        """File path or bytes -> the input tensor, as predict, the server and the bench make it:
        the one preprocessing's uint8 pixels (preprocess.input_pixels) straight to the tensor."""
        return self.input_from_pixels(input_pixels(source, self.prep))

    def predict_file(self, source) -> np.ndarray:
        return self.run(self.input_tensor(source))

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

    def is_uncertain(self, probs) -> bool | None:
        """Whether this answer falls inside the model's uncertain band (None: the model has none)."""
        return uncertain_flag(probs, self.uncertain_margin, self.threshold, self.labels)

    def info(self) -> dict:
        return {"path": os.fsdecode(self.path), "backend": self.backend, "kind": self.kind,
                "labels": self.labels, "preprocessing": self.prep.to_dict(), "threshold": self.threshold,
                "decision_rule": decision_rule(self.labels, self.threshold), "uncertain_margin": self.uncertain_margin,
                "input": self.input.to_dict(), "output": self.output.to_dict(), "sha256": self.sha256,
                "size_bytes": self.size_bytes, "metadata": self.has_metadata,
                "variant": self.facts.get("variant")}


def decision_rule(labels: list[str], threshold: dict | None) -> str:
    """The rule behind an answer, in words: shown beside it so a thresholded answer is never read
    as "the highest bar wins"."""
    if threshold is None:
        return "highest probability"
    positive = threshold["positive"]
    others = [label for label in labels if label != positive]
    otherwise = others[0] if len(others) == 1 else "the most probable other class"
    return f"{positive} if p({positive}) >= {threshold['value']:g}, else {otherwise}"


def uncertain_flag(probs, margin: float | None, threshold: dict | None, labels: list[str]) -> bool | None:
    """True when the answer's margin (edge_runtime.decision.margins) is below the model's
    uncertain band; None when the model has no band."""
    if margin is None:
        return None
    return bool(uncertain(np.asarray(probs, dtype=np.float64).reshape(1, -1), margin, threshold, list(labels))[0])


def prediction_record(model, probs, top_k: int | None = None) -> dict:
    """One image's answer, the same for `predict` and the field server: the label the model's
    rule chose (`index` into the labels, its `probability`), every class's probability, the
    `top_k` most probable classes (default all) as [{"label", "probability"}], the decision rule
    in words and `uncertain` (true/false; null when the model has no band). `model`: anything with
    .labels, .threshold, .uncertain_margin and .decide(probs). Probabilities are the model's own
    float32 values, unrounded: outputs of two devices can be compared exactly."""
    probs = np.asarray(probs, dtype=np.float32).reshape(-1)
    labels = [str(label) for label in model.labels]
    index = int(model.decide(probs))
    ranked = sorted(range(len(labels)), key=lambda i: -probs[i])[:top_k or len(labels)]
    return {"label": labels[index], "index": index, "probability": float(probs[index]),
            "probabilities": {label: float(p) for label, p in zip(labels, probs)},
            "top": [{"label": labels[i], "probability": float(probs[i])} for i in ranked],
            "decision_rule": decision_rule(labels, model.threshold),
            "uncertain": uncertain_flag(probs, model.uncertain_margin, model.threshold, labels)}


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
    # From its stat first: reading a FIFO blocks until a writer comes, a device never ends.
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelError(f"{path}: model file not found; check the path") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read the model ({e.strerror or e}); check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelError(f"{path}: is a folder; pass the .tflite file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"{path}: not a regular file (a pipe or a device); pass the .tflite file itself")
    if st.st_size > MAX_MODEL_BYTES:
        raise ModelError(f"{path}: {st.st_size} bytes is larger than any TFLite model can be (2 GiB); pass the .tflite file")
    try:
        data = path.read_bytes()
    except PermissionError:
        raise ModelError(f"{path}: permission denied; make the model readable") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read the model ({e.strerror or e}); copy it again") from None
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
    if sidecar.stat().st_size > MAX_SIDECAR_BYTES:
        raise ModelError(f"{sidecar}: {sidecar.stat().st_size} bytes is too large for a model sidecar; "
                         "re-export the model or delete the sidecar")
    try:
        facts = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{sidecar}: unreadable model sidecar ({e}); re-export the model or delete the sidecar") from None
    if not isinstance(facts, dict):
        raise ModelError(f"{sidecar}: model sidecar is not a JSON object; re-export the model or delete the sidecar")
    return facts


def _check_sidecar_hash(path: Path, sidecar: dict | None, digest: str) -> None:
    """A sidecar is used only if it names this very file: without the hash, a sidecar written by
    hand or for another export (labels in another order) would silently relabel every answer."""
    if sidecar is None:
        return
    expected = sidecar.get("sha256")
    if not expected:
        raise ModelError(f"{path}: {sidecar_path(path).name} does not name the model's sha256, so it may describe "
                         "another model (labels in another order); re-export the model (oncolite export), "
                         f"or add \"sha256\": \"{digest}\" to it once its labels are checked against training")
    if expected != digest:
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
                         "re-export the model with metadata (oncolite export), or give its labels (--labels)")
    labels = [str(label) for label in labels]
    if len(labels) != num_outputs:
        raise ModelError(f"{path}: {len(labels)} labels {labels} but the model has {num_outputs} outputs; "
                         "the labels belong to another model, re-export it")
    return labels


def _prep(path: Path, metadata: dict | None, sidecar: dict | None, details: dict,
          given: Preprocessing | None = None) -> Preprocessing:
    height, width = int(details["shape"][1]), int(details["shape"][2])
    if metadata is not None:
        prep = metadata["prep"]
    elif sidecar and sidecar.get("preprocessing"):
        prep = Preprocessing.from_dict(sidecar["preprocessing"])
    else:
        # Given for a bare model: its normalization, at the input tensor's size.
        prep = Preprocessing(height, width, given.mean, given.std, given.resample) if given else \
            Preprocessing(height=height, width=width)
    if (prep.height, prep.width) != (height, width):
        raise ModelError(f"{path}: preprocessing says {prep.height}x{prep.width} but the input tensor is "
                         f"{height}x{width}; re-export the model")
    return prep


def _check_uncertain_margin(path: Path, margin, threshold: dict | None, labels: list[str]) -> float | None:
    if margin is None:
        return None
    ok = (isinstance(margin, (int, float)) and not isinstance(margin, bool) and math.isfinite(margin)
          and 0.0 <= margin <= 1.0)
    if not ok:
        raise ModelError(f"{path}: uncertain_margin {margin!r} is not a number from 0 to 1 (or null for no band); "
                         "re-export the model")
    if threshold is not None and len(labels) != 2:
        raise ModelError(f"{path}: an uncertain band with a threshold needs a binary model, not {len(labels)} classes; "
                         "re-export the model")
    return float(margin)


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
    from edge_runtime.console import print_json, result, say

    model = EdgeModel.load(args.model or default_model_path(), backend=args.backend)
    info = model.info()
    if args.json:
        print_json(info)
        return EXIT_OK
    say(args,
        f"model        {info['path']} ({info['size_bytes']} bytes, sha256 {info['sha256'][:16]}...)",
        f"kind         {info['kind']}{' / ' + info['variant'] if info['variant'] else ''}; backend {info['backend']}",
        f"labels       {', '.join(info['labels'])}",
        f"input        {_tensor_line(info['input'])}",
        f"output       {_tensor_line(info['output'])}",
        f"preprocess   {model.prep.height}x{model.prep.width} {model.prep.resample}, mean {list(model.prep.mean)} std {list(model.prep.std)}",
        f"decision     {info['decision_rule']}",
        f"uncertain    {_band_text(info['uncertain_margin'])}",
        f"metadata     {'standard TFLite metadata' if info['metadata'] else 'none (sidecar JSON used)'}")
    result(args, f"{info['path']}: checks passed; {info['kind']}{' / ' + info['variant'] if info['variant'] else ''}, "
                 f"labels {', '.join(info['labels'])}, input {info['input']['dtype']} {info['input']['shape']}")
    return EXIT_OK


def _band_text(margin: float | None) -> str:
    if margin is None:
        return "no band (the model's metadata has no uncertain_margin)"
    return f"answers with a margin below {margin:g} are flagged: review them on a second reader"


def _tensor_line(t: dict) -> str:
    quant = f", scale {t['scale']:.6g} zero point {t['zero_point']}" if t["scale"] else ""
    return f"{t['dtype']} {t['shape']}{quant}"
