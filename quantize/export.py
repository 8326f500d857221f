"""`oncolite export RUN_DIR`: TFLite variants of a run's models, each self-describing.

The variants are edge_runtime.variants' table. fp32, fp16 and dynamic-range come from the float
model. Full-integer candidates: int8_ptq is the converter's plain post-training
quantization (the textbook baseline); int8_gptq rounds each conv kernel to reconstruct the
layer's float output and corrects the biases (quantize.rounding) before the same conversion;
int8_gptq_act rounds layer by layer on the int8 model's own inputs (a few minutes per model);
int8_qat converts the QAT model. `int8`, the model to ship, is the candidate that agrees best
with the float model on the validation side (ties: the smaller mean probability change), and
`int8_uint8` is that model with uint8 input/output and a batch of 1 (MediaPipe Tasks and
LiteRT.js refuse int8 inputs and dynamic batches). Integer variants are integer only
(TFLITE_BUILTINS_INT8) with int8 I/O by default (config export.int8_io). Calibration images
come from the manifest's *training* side only, through the one preprocessing; their manifest
paths are recorded in the sidecar, so anyone can check no test image was used.

Every integer variant carries an uncertain band (`uncertain_margin`): the largest change of its
decision margin against the float model on the validation side. Outside the band, its decision
is the float model's on every validation image; inside, the device flags the answer.

Each variant is written atomically as models/<variant>.tflite with standard TFLite metadata
(labels, normalization, our facts as oncolite.json) and models/<variant>.json (the sidecar).
A variant whose sidecar is valid for the same source model, options and operating point
(RUN_DIR/threshold.json) is not redone. An int8 variant that still computes in float is refused
before it is written (unless --allow-float-ops), so models/ never holds one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np

from edge_runtime.atomic import atomic_path, write_bytes, write_json
from edge_runtime.backends import make_interpreter
from edge_runtime.console import (Log, add_output_flags, file_size, native_log_level, native_stderr_filtered,
                                  print_json, progress, result, say)
from edge_runtime.decision import margin_errors
from edge_runtime.errors import EXIT_OK, OncoliteError
from edge_runtime.hashing import bytes_sha256, file_sha256
from edge_runtime.metadata import write_metadata
from edge_runtime.model import to_probabilities
from edge_runtime.preprocess import dequantize, normalize, preprocess, quantize
from edge_runtime.variants import INT8_CANDIDATES, SELECTABLE, VARIANTS, io_type
from . import checks
from .rundir import Run, open_run
from oncolite.train.config import add_set_argument, with_overrides
from oncolite.train.rundir import FLOAT_MODEL, QAT_MODEL, RunDir, given_run

SELECTIVE_VARIANT = "int8_ptq_selective"
IO_CHOICES = ("int8", "uint8", "float")
SIDECAR_FORMAT = "oncolite-model/1"
SOURCES = {"float": FLOAT_MODEL, "qat": QAT_MODEL}  # file names in the models folder


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR|MODEL", nargs="?",
                        help="run directory holding models/float.keras (and qat.keras), or your own model: a Keras "
                             "file (.keras, .h5) or a SavedModel directory, with --data or --manifest")
    parser.add_argument("--run", dest="old_run", help=argparse.SUPPRESS)  # the old spelling of RUN_DIR
    parser.add_argument("--variants", help=f"comma-separated, from {', '.join(SELECTABLE)} (default: config export.variants)")
    parser.add_argument("--calibration-images", type=int,
                        help="training images for int8 calibration (default: config export.calibration_images)")
    parser.add_argument("--io", choices=IO_CHOICES, help="int8 variants' input/output type (default: config export.int8_io)")
    parser.add_argument("--allow-float-ops", action="store_true", help="accept int8 exports in which some ops stay float")
    parser.add_argument("--selective", metavar="TENSOR,...",
                        help="also export int8_ptq_selective with these tensors (names from the debugger "
                             "table in export_report.md) kept in float; implies float ops in that variant")
    parser.add_argument("--gate", type=float,
                        help="accuracy an int8 variant may lose against float on validation before the "
                             "quantization debugger runs (default: config export.gate, e.g. 0.01 = 1 point)")
    from .byo import add_model_arguments

    add_model_arguments(parser, "images in class folders: one half calibrates, the other is the validation gate "
                                "(a bring-your-own MODEL)",
                        seed_help="seed of the calibration sample and the --data split")
    parser.add_argument("--manifest", metavar="M", help="a manifest whose train side calibrates and val side gates "
                                                        "(a bring-your-own MODEL)")
    add_set_argument(parser, "export")
    add_output_flags(parser)


# --- calibration ---------------------------------------------------------------------------

def calibration_items(train_items: list[dict], count: int, seed: int) -> list[dict]:
    """A fixed, seeded sample of the training side (sorted first, so the order of the manifest does not matter)."""
    ordered = sorted(train_items, key=lambda item: str(item["path"]))
    return random.Random(seed).sample(ordered, min(count, len(ordered)))


def representative_dataset(items: list[dict], prep, quiet: bool = True):
    """The converter's calibration input: each image through the one preprocessing, batch of one.

    The first image carries one black and one white pixel: the input tensor's range then spans
    every pixel value, so no brighter image is clipped on the device, and with the default
    mean = std = 128 the input scale is exactly 1/128: uint8 pixels land on the int8 grid
    without rounding (p - 128)."""
    extremes = normalize(np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8), prep)

    def generate():
        for i, item in enumerate(progress(items, desc="calibrating", quiet=quiet, unit="img")):
            x = preprocess(item["path"], prep)
            if i == 0:
                x[0, :2] = extremes[0]
            yield [x[None]]

    return generate


def calibration_batches(items: list[dict], prep, batch_size: int = 16):
    """The same calibration images in batches, for quantize.rounding."""
    for start in range(0, len(items), batch_size):
        yield np.stack([preprocess(item["path"], prep) for item in items[start:start + batch_size]])


def manifest_relative(path, root) -> str:
    """An item's path as the manifest writes it (relative to the manifest's root)."""
    return Path(os.path.relpath(path, root)).as_posix()


# --- conversion ----------------------------------------------------------------------------

def make_converter(model, variant: str, representative=None, io: str = "int8", allow_float_ops: bool = False,
                   batch: int | None = None):
    import tensorflow as tf  # here, not at the top: `oncolite export --help` must not wait for TensorFlow

    if batch is None:
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
    else:  # a static batch: convert the model's function traced at that input shape
        spec = tf.TensorSpec([batch, *model.input_shape[1:]], tf.float32)
        function = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
        converter = tf.lite.TFLiteConverter.from_concrete_functions([function], model)
    if variant == "fp32":
        return converter
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    elif VARIANTS[variant].integer:
        # Even a QAT model needs it: it calibrates the input and output tensors.
        converter.representative_dataset = representative
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.target_spec.supported_ops = ops + ([tf.lite.OpsSet.TFLITE_BUILTINS] if allow_float_ops else [])
        if io != "float":
            converter.inference_input_type = converter.inference_output_type = {"int8": tf.int8, "uint8": tf.uint8}[io]
    return converter


def io_facts(model_bytes: bytes) -> dict:
    """dtype, shape, scale and zero point of the model's one input and one output."""
    interpreter, _ = make_interpreter(model_bytes, backend="ai-edge-litert")

    def describe(detail):
        scale, zero_point = detail["quantization"]
        return {"dtype": detail["dtype"].__name__, "shape": [int(d) for d in detail["shape"]],
                "scale": float(scale) if scale else None, "zero_point": int(zero_point) if scale else None}

    return {"input": describe(interpreter.get_input_details()[0]), "output": describe(interpreter.get_output_details()[0])}


def run_model_bytes(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """N x C probabilities of a converted model on normalized float inputs, one image at a time,
    quantized and read out as the device does (EdgeModel.run: an int8 softmax renormalized to sum
    to 1), before the file with metadata exists: the uncertain band and the choice of `int8` are
    made on the probabilities the device will compute."""
    interpreter, _ = make_interpreter(model_bytes, backend="ai-edge-litert")
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    rows = []
    for sample in x:
        tensor = sample[None].astype(np.float32)
        if inp["dtype"] != np.float32:
            tensor = quantize(tensor, *inp["quantization"], inp["dtype"])
        interpreter.set_tensor(inp["index"], tensor)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])[0]
        rows.append(to_probabilities(dequantize(y, *out["quantization"]) if out["dtype"] != np.float32 else y))
    return np.asarray(rows, dtype=np.float64)


def uncertain_margin(float_probs: np.ndarray, probs: np.ndarray, run: Run) -> float | None:
    """The largest change of the decision margin against float on validation, rounded up to
    0.001: outside it, every validation decision was the float model's. None without images."""
    if len(probs) == 0:
        return None
    worst = float(margin_errors(float_probs, probs, run.threshold(), run.labels).max())
    # A margin change can reach 2 (from one class to another outright); margins stop at 1, so a
    # band of 1 already flags every answer: this model is no stand-in for the float one.
    return min(1.0, math.ceil(worst * 1000) / 1000)


def sidecar_facts(run: Run, variant: str, model_bytes: bytes, source: dict, options: dict, calibration,
                  band: float | None) -> dict:
    """The sidecar without the file's own hash and size (those are of the file with metadata)."""
    import tensorflow as tf

    return {"format": SIDECAR_FORMAT, "variant": variant, "description": VARIANTS[variant].description,
            "labels": run.labels, "preprocessing": run.prep.to_dict(), **io_facts(model_bytes),
            "run": run.path.resolve().name, "manifest_sha256": run.manifest.sha256, "threshold": run.threshold(),
            "uncertain_margin": band, "source": source, "options": options, "calibration": calibration,
            "converter": {"tensorflow": tf.__version__}}


def already_exported(layout: RunDir, variant: str, source: dict, options: dict, threshold) -> dict | None:
    """The sidecar of a finished export of this variant from the same source, options and
    operating point (a threshold chosen after the export must reach the model), else None."""
    tflite, sidecar = layout.variant(variant), layout.sidecar(variant)
    if not (tflite.exists() and sidecar.exists()):
        return None
    try:
        facts = json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    valid = (facts.get("format") == SIDECAR_FORMAT and facts.get("source") == source
             and facts.get("options") == options and facts.get("threshold") == threshold
             and facts.get("sha256") == file_sha256(tflite))
    return facts if valid else None


def write_export(run: Run, variant: str, model_bytes: bytes, facts: dict) -> dict:
    """Metadata into the model, then the .tflite and its sidecar, each atomically.

    Two files cannot be replaced in one step, so the old sidecar goes first: at every moment a
    sidecar that exists describes the model beside it. A kill in between leaves a model without
    a sidecar, which EdgeModel.load reads from its own metadata (the same facts) and the next
    export redoes (already_exported needs both files); never a new model beside the old sidecar,
    whose sha256 would make EdgeModel.load refuse it.
    """
    described = write_metadata(model_bytes, name=f"oncolite {variant}", description=facts["description"],
                               labels=run.labels, prep=run.prep, extra=facts)
    sidecar = {**facts, "sha256": bytes_sha256(described), "size_bytes": len(described)}
    path = run.dir.variant(variant)
    run.dir.sidecar(variant).unlink(missing_ok=True)
    write_bytes(path, described)
    write_json(run.dir.sidecar(variant), sidecar)
    return sidecar


# --- the command ---------------------------------------------------------------------------

class Validation:
    """The run's validation side, loaded once when an integer variant first needs it: the float
    model's probabilities there are the reference for every uncertain band and for the choice."""

    def __init__(self, run: Run, float_model):
        self.run, self.float_model, self.x, self.float_probs = run, float_model, None, None
        self._probs: dict[str, np.ndarray] = {}  # by model sha256: a candidate is run here once

    def load(self) -> "Validation":
        if self.x is None:
            from oncolite.train.data import load_arrays

            self.x, self.y = load_arrays(self.run.sides()["val"], self.run.labels, self.run.prep, quiet=True)
            self.float_probs = (self.float_model.predict(self.x, batch_size=32, verbose=0).astype(np.float64)
                                if len(self.x) else np.zeros((0, len(self.run.labels))))
        return self

    def probs(self, model_bytes: bytes) -> np.ndarray:
        """The model's validation probabilities, computed once per model (by sha256)."""
        key = bytes_sha256(model_bytes)
        if key not in self._probs:
            self._probs[key] = run_model_bytes(model_bytes, self.load().x)
        return self._probs[key]

    def same_model(self, model_bytes: bytes, written_sha256: str) -> None:
        """The file written with metadata computes what the converted bytes did: choosing `int8`
        from the files on disk then reuses the probabilities computed for the band."""
        self._probs[written_sha256] = self.probs(model_bytes)

    def fidelity(self, model_bytes: bytes) -> dict:
        """How closely a model follows the float model here (`fidelity`)."""
        return fidelity(self.probs(model_bytes), self.float_probs, self.run.threshold(), self.run.labels)


def fidelity(probs: np.ndarray, float_probs: np.ndarray, rule, labels: list[str]) -> dict:
    """What choose_int8 ranks: decision agreement with the float model (under the run's decision
    rule) and mean |Δp| on the same images."""
    from edge_runtime.decision import decisions

    same = decisions(probs, rule, labels) == decisions(float_probs, rule, labels)
    return {"n": int(len(probs)), "agreement": float(same.mean()) if len(probs) else None,
            "mean_abs_prob_diff": float(np.abs(probs - float_probs).mean()) if len(probs) else None}


def export_variants(run: Run, variants: list[str], chosen: list[dict], io: str, allow_float_ops: bool = False,
                    selective: list[str] | None = None, quiet: bool = True) -> dict:
    """Export each variant (skipping finished ones), integer ones calibrated on `chosen` training
    items; `int8` and `int8_uint8` after the candidates they choose from. Returns
    {variant: {status, sidecar, ops, float_ops}} (and "selection" for `int8`)."""
    from oncolite.train.model import load_float_model

    float_model = load_float_model(run.dir.float_model)
    calibration = {"side": "train", "count": len(chosen), "seed": int(run.config["seed"]),
                   "paths": [manifest_relative(item["path"], run.manifest.root) for item in chosen]}
    representative = representative_dataset(chosen, run.prep, quiet=quiet)
    validation = Validation(run, float_model)
    jobs = [(v, None) for v in variants if VARIANTS[v].source != "int8"]
    if selective:
        jobs.append((SELECTIVE_VARIANT, selective))
    results = {}
    ship = any(VARIANTS[v].source == "int8" for v in variants)
    # Minutes for a full set: a bar on a terminal, a line every LINE_EVERY seconds in a log.
    bar = progress(total=len(jobs) + int(ship), desc="exporting", quiet=quiet, unit="variant")
    for variant, denylist in jobs:
        bar.set_postfix(variant=variant)
        spec = VARIANTS[variant]
        source = model_source(run, SOURCES[spec.source])
        options = {"io": io_type(variant, io), "calibration_images": len(chosen) if spec.integer else None,
                   "allow_float_ops": bool(allow_float_ops or denylist), "selective": denylist or None,
                   "rounding": rounding_recipe(spec.rounding) if spec.integer else None, "batch": spec.batch}
        results[variant] = export_one(run, variant, source, options, lambda: convert(
            variant, load_source(run, spec.source, float_model), float_model, chosen, run.prep, representative, options),
            calibration, validation)
        bar.update(1)
    if ship:
        bar.set_postfix(variant="int8 (choosing among the candidates)")
        results.update(ship_int8(run, variants, float_model, chosen, representative, calibration, validation))
        bar.update(1)
    bar.close()
    return results


def export_one(run: Run, variant: str, source: dict, options: dict, make, calibration: dict, validation) -> dict:
    """One variant: up to date, or converted by `make()`, checked, banded and written."""
    spec = VARIANTS[variant]
    done = already_exported(run.dir, variant, source, options, run.threshold())
    if done is not None:
        ops = _ops(run, variant, run.dir.variant(variant).read_bytes(), spec.integer, options)
        return {"status": "up to date", "sidecar": done, **ops}
    if source["sha256"] is None:
        raise OncoliteError(f"{run.path / source['model']}: missing; run `oncolite quantize {run.path}` "
                            f"first or leave {variant} out of --variants")
    model_bytes = make()
    ops = _ops(run, variant, model_bytes, spec.integer, options)  # refuses float ops before anything is written
    band = uncertain_margin(validation.load().float_probs, validation.probs(model_bytes), run) if spec.integer else None
    sidecar = write_export(run, variant, model_bytes, sidecar_facts(run, variant, model_bytes, source, options,
                                                                    calibration if spec.integer else None, band))
    if spec.integer:
        validation.same_model(model_bytes, sidecar["sha256"])
    return {"status": "exported", "sidecar": sidecar, **ops}


def choose_int8(fidelity: dict, order: tuple = INT8_CANDIDATES) -> str | None:
    """The candidate to ship: the highest validation agreement with float, then the smallest mean
    probability change (far less noisy than agreement on a few dozen images), then `order` (the
    table's)."""
    present = [name for name in order if name in fidelity and fidelity[name]["agreement"] is not None]
    if not present:
        return None
    return min(present, key=lambda n: (-fidelity[n]["agreement"], fidelity[n]["mean_abs_prob_diff"], order.index(n)))


def ship_int8(run: Run, variants: list[str], float_model, chosen: list[dict], representative, calibration: dict,
              validation: Validation) -> dict:
    """`int8`: a copy of the best exported candidate; `int8_uint8`: the same model converted with
    uint8 I/O and a batch of 1."""
    fidelity = {}
    for name in INT8_CANDIDATES:
        path = run.dir.variant(name)
        if path.is_file() and run.dir.sidecar(name).is_file():
            fidelity[name] = validation.fidelity(path.read_bytes())
    best = choose_int8(fidelity)
    if best is None:
        raise OncoliteError(f"{run.models}: no int8 candidate to choose `int8` from; export one of "
                            f"{', '.join(INT8_CANDIDATES)} first (--variants)")
    best_path = run.dir.variant(best)
    best_facts = json.loads(run.dir.sidecar(best).read_text(encoding="utf-8"))
    selection = {"from": best, "rule": "highest validation agreement with float, then smallest mean |Δp|",
                 "candidates": fidelity}
    source = {"model": f"models/{best}.tflite", "sha256": file_sha256(best_path)}
    results = {}
    if "int8" in variants:
        options = {**best_facts["options"], "chosen_from": best}
        done = already_exported(run.dir, "int8", source, options, run.threshold())
        status = "up to date"
        if done is None:
            done = {**best_facts, "variant": "int8", "description": VARIANTS["int8"].description, "source": source,
                    "options": options, "selection": selection}
            path = run.dir.variant("int8")
            run.dir.sidecar("int8").unlink(missing_ok=True)
            with atomic_path(path) as tmp:
                shutil.copyfile(best_path, tmp)
            write_json(run.dir.sidecar("int8"), done)
            status = "exported"
        results["int8"] = {"status": status, "sidecar": done, "selection": selection,
                           **_ops(run, "int8", best_path.read_bytes(), True, options)}
    if "int8_uint8" in variants:
        spec, origin = VARIANTS["int8_uint8"], VARIANTS[best]
        options = {**best_facts["options"], "io": spec.io, "batch": spec.batch, "chosen_from": best}
        results["int8_uint8"] = export_one(run, "int8_uint8", source, options, lambda: convert(
            "int8_uint8", load_source(run, origin.source, float_model), float_model, chosen, run.prep, representative,
            options), calibration, validation)
    return results


def model_source(run: Run, file_name: str) -> dict:
    path = run.models / file_name
    return {"model": f"models/{file_name}", "sha256": file_sha256(path) if path.exists() else None}


def load_source(run: Run, source: str, float_model):
    if source == "qat":
        from .qat import load_qat_model

        return load_qat_model(run.dir.qat_model, float_model, freeze_bn=run.config["qat"]["freeze_bn"])
    return float_model


# The roundings of one model on one calibration set (a variant and its uint8 twin share one), and
# their conversions (int8_gptq_act reads its activation grids from int8_gptq's). The model is kept
# with its copies, so its id cannot be reused by another model meanwhile.
_ROUNDED: dict = {"key": None, "model": None, "copies": {}, "converted": {}}


def rounding_recipe(rounding: str) -> str:
    """The weight rounding an export records: "nearest", or quantize.rounding's recipe name."""
    if rounding == "nearest":
        return rounding
    from .rounding import RECIPES

    return RECIPES[rounding]


def rounded_copy(model, chosen: list[dict], prep, recipe: str, representative):
    """The copy of `model` that quantize.rounding's `recipe` (a RECIPES value, as export records
    it) makes on these calibration images, computed once per export. "gptq_act" rounds the
    activations on the grids the converter gives the "gptq" copy."""
    from .rounding import RECIPES, activation_points, reconstruct_weights

    rounding = next(name for name, text in RECIPES.items() if text == recipe)
    key = (id(model), tuple(str(item["path"]) for item in chosen), prep)
    if _ROUNDED["key"] != key:
        _ROUNDED.update(key=key, model=model, copies={}, converted={})
    copies = _ROUNDED["copies"]
    if rounding not in copies:
        points = None
        if rounding == "gptq_act":
            gptq = rounded_copy(model, chosen, prep, RECIPES["gptq"], representative)
            points = activation_points(rounded_conversion(gptq, "int8_gptq", RECIPES["gptq"], representative,
                                                          {"io": "int8", "allow_float_ops": False}))
        copies[rounding] = reconstruct_weights(model, calibration_batches(chosen, prep), sequential=points is not None,
                                               points=points)[0]
    return copies[rounding]


def convert(variant: str, model, float_model, chosen: list[dict], prep, representative, options: dict) -> bytes:
    """One conversion. With a rounding other than "nearest" (quantize.rounding's recipe) the
    converter gets a copy of the float model whose kernels that recipe chose; the selective
    variant goes through the debugger."""
    if variant == SELECTIVE_VARIANT:
        from .debug import selective_quantize

        return selective_quantize(float_model, representative, options["selective"])
    if options.get("rounding") not in (None, "nearest"):
        model = rounded_copy(model, chosen, prep, options["rounding"], representative)
        return rounded_conversion(model, variant, options["rounding"], representative, options)
    return _converted(make_converter(model, variant, representative, options["io"], options["allow_float_ops"],
                                     options.get("batch")))


def rounded_conversion(copy, variant: str, recipe: str, representative, options: dict) -> bytes:
    """A rounded copy (rounded_copy) converted, once per export for the same converter settings."""
    key = (recipe, options["io"], options["allow_float_ops"], options.get("batch"))
    converted = _ROUNDED["converted"]
    if key not in converted:
        converted[key] = _converted(make_converter(copy, variant, representative, options["io"],
                                                   options["allow_float_ops"], options.get("batch")))
    return converted[key]


def _converted(converter) -> bytes:
    # The converter reports its settings on stderr ("fully_quantize: 0, ...") and warns that int8
    # inputs have no statistics (they get the calibrated input range): noise, also under --quiet.
    with native_stderr_filtered(native_log_level()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return converter.convert()


def _ops(run: Run, variant: str, model_bytes: bytes, integer: bool, options: dict) -> dict:
    """The op table and the float ops of a variant; raises FloatOpError for an int8 variant with
    float ops that the options do not allow."""
    float_found = checks.check_integer_only(model_bytes, str(run.dir.variant(variant)),
                                            float_io=options["io"] == "float",
                                            allow_float_ops=options["allow_float_ops"]) if integer else []
    return {"ops": checks.op_summary(checks.list_ops(model_bytes)),
            "float_ops": [f"{row['op']}#{row['index']}" for row in float_found]}


def on_disk(run: Run, exclude) -> dict:
    """Variants exported by earlier calls whose model and sidecar are both in models/; one made
    from a source model (float, QAT, the chosen candidate) that has changed since is marked stale,
    so the report never compares models of two trainings without saying so."""
    found = {}
    for name, spec in VARIANTS.items():
        path = run.dir.variant(name)
        if name in exclude or not (path.is_file() and run.dir.sidecar(name).is_file()):
            continue
        try:
            facts = json.loads(run.dir.sidecar(name).read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        if facts.get("sha256") != file_sha256(path):
            continue
        source = facts.get("source") or {}
        made_from = run.models / Path(source.get("model", "")).name  # recorded as "models/<file>" (model_source)
        stale = source.get("sha256") != (file_sha256(made_from) if made_from.is_file() else None)
        status = (f"earlier export, STALE: {source.get('model')} has changed since; re-export it with --variants {name}"
                  if stale else "earlier export")
        found[name] = {"status": status, "sidecar": facts, **({"selection": facts["selection"]} if "selection" in facts else {}),
                       **_ops(run, name, path.read_bytes(), spec.integer, facts["options"])}
    return found


def record_gate(run: Run, report: dict) -> None:
    """The shipped model's validation loss against the gate goes into its sidecar, so the edge
    runtime can warn whoever loads a model that lost more than the gate allowed."""
    path = run.dir.sidecar("int8")
    facts = json.loads(path.read_text(encoding="utf-8"))
    shipped = report["int8"]
    facts["gate"] = {"accuracy_loss": shipped["accuracy_loss"], "gate": report["gate"], "passed": not shipped["over_gate"],
                     "side": "val", "n": report["n_val"]}
    write_json(path, facts)


def check_tensor_names(run: Run, names: list[str]) -> None:
    """--selective names must be tensors of the quantized model; a typo would be ignored silently."""
    import difflib

    reference = run.dir.variant("int8_ptq")
    if not reference.is_file():
        raise OncoliteError(f"{reference}: missing; --selective names tensors of int8_ptq, export it first "
                            f"(oncolite export {run.path} --variants int8_ptq)")
    known = {d["name"] for d in make_interpreter(reference, backend="ai-edge-litert")[0].get_tensor_details()}
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.5)
            raise OncoliteError(f"--selective: {name!r} is not a tensor of {reference.name}"
                                + (f"; close: {', '.join(repr(c) for c in close)}" if close else "")
                                + "; copy the names from the debugger table in export_report.md")


def parse_variants(text: str | None, default: list[str]) -> list[str]:
    variants = [v.strip() for v in text.split(",") if v.strip()] if text else list(default)
    unknown = [v for v in variants if v not in SELECTABLE]
    if unknown:
        raise OncoliteError(f"--variants: unknown {', '.join(unknown)}; choose from {','.join(SELECTABLE)}")
    return variants


def byo_arguments_used(args) -> list[str]:
    return [flag for flag in ("data", "manifest", "labels", "size", "mean", "std", "resample", "out")
            if getattr(args, flag, None) is not None]


def open_model_run(args):
    """A bring-your-own MODEL as a Run whose models folder is --out (quantize.byo)."""
    from . import byo

    run, _ = byo.byo_run(args.run_dir, args.out, data=args.data, manifest=args.manifest,
                         labels=byo.parse_labels(args.labels), size=byo.parse_size(args.size),
                         mean=byo.parse_channels(args.mean, "--mean"), std=byo.parse_channels(args.std, "--std"),
                         resample=args.resample, seed=args.seed, quiet=args.quiet or args.json)
    return run


def byo_variants(text: str | None, default: list[str]) -> list[str]:
    """The variants of a bring-your-own model: QAT needs our training, so int8_qat is not one."""
    if text and "int8_qat" in [v.strip() for v in text.split(",")]:
        raise OncoliteError("--variants int8_qat: quantization-aware training needs an oncolite run; a bring-your-own "
                            "model's int8 candidates are int8_ptq, int8_gptq and int8_gptq_act")
    return [v for v in parse_variants(text, default) if v != "int8_qat"]


def main(args) -> int:
    from .byo import is_model_path
    from .debug import gate_report, write_report

    given_run(args, "export")
    byo = is_model_path(args.run_dir)
    if byo:
        run = open_model_run(args)
    else:
        if Path(args.run_dir).is_file():
            raise OncoliteError(f"{args.run_dir}: not a run directory or a Keras model (.keras, .h5, SavedModel "
                                "directory); give one of those")
        used = byo_arguments_used(args)
        if used:
            raise OncoliteError(f"--{used[0]}: only for a bring-your-own MODEL; a run directory has its own "
                                "manifest and models folder")
        run = open_run(args.run_dir)
    run.config = with_overrides(run.config, args.set, "export")
    settings = run.config["export"]
    variants = byo_variants(args.variants, settings["variants"]) if byo else parse_variants(args.variants, settings["variants"])
    count = args.calibration_images or settings["calibration_images"]
    if count < 1:
        raise OncoliteError("--calibration-images must be at least 1")
    io = args.io or settings["int8_io"]
    selective = [s.strip() for s in args.selective.split(",") if s.strip()] if args.selective else None
    quiet = args.quiet or args.json
    if selective:
        check_tensor_names(run, selective)
    chosen = calibration_items(run.sides()["train"], count, int(run.config["seed"]))
    # RUN_DIR/logs/export.log as train writes train.log; the file only, the lines reach stdout below.
    log = Log(run.dir.log("export"), quiet=True)
    asked = "" if len(chosen) == count else f" ({count} asked, {len(chosen)} on the training side)"
    log(f"{args.command_line}: {', '.join(variants)} from {len(chosen)} calibration images{asked}, integer I/O {io}")
    results = export_variants(run, variants, chosen, io, args.allow_float_ops, selective, quiet=quiet)
    results.update(on_disk(run, exclude=results))  # the report describes every model in the run
    gate = settings["gate"] if args.gate is None else args.gate
    report = gate_report(run, results, gate=gate, representative=representative_dataset(chosen, run.prep),
                         quiet=quiet)
    write_report(run, report)
    if report.get("int8"):
        record_gate(run, report)
    lines = [f"{name:<20} {file_size(row['size_bytes']):>10}  accuracy {row['accuracy']:.3f}  MCC {row['mcc']:.3f}  "
             f"agreement {row['agreement']:.1%}  ({row['status']})" for name, row in report["variants"].items()]
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    if byo:
        lines.append(f"model: {run.source['source']['model']}; preprocessing: {run.source['preprocessing_from']}"
                     + "".join(f"; {note}" for note in run.source["changes"]))
    shipped = report.get("int8")
    headline = (f": int8 = {shipped['from']} ({shipped['rule']}), agreement with float "
                f"{report['variants']['int8']['agreement']:.1%} on validation" if shipped else "")
    done = f"report: {run.dir.export_report_md}{headline}"
    for line in [*lines, done]:
        log(line)
    if args.json:
        print_json(report)
    say(args, *lines)
    result(args, done)
    return EXIT_OK
