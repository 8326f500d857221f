"""`oncolite export RUN_DIR`: TFLite variants of a run's models, each self-describing.

fp32, fp16 and dynamic-range come from the float model; int8_ptq is post-training full-integer
quantization of the float model; int8_qat converts the QAT model. int8 variants are integer
only (TFLITE_BUILTINS_INT8) with int8 input and output by default, uint8 for accelerators
and readers that want it (MediaPipe Tasks refuses int8 input), or float I/O. Calibration
images come from the manifest's *training* side only, through the one preprocessing; their
manifest paths are recorded in the sidecar, so anyone can check no test image was used.

Each variant is written atomically as models/<variant>.tflite with standard TFLite metadata
(labels, normalization, our facts as oncolite.json) and models/<variant>.json (the sidecar).
A variant whose sidecar is valid for the same source model and options is not redone.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import train  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from edge_runtime.atomic import write_bytes, write_json
from edge_runtime.console import add_output_flags, print_json, progress, say
from edge_runtime.errors import EXIT_OK, OncoliteError
from edge_runtime.hashing import bytes_sha256, file_sha256
from edge_runtime.metadata import write_metadata
from edge_runtime.model import sidecar_path
from edge_runtime.preprocess import preprocess
from quantize import checks
from quantize.rundir import Run, open_run
from train.model import load_float_model

VARIANTS = ("fp32", "fp16", "dynamic", "int8_ptq", "int8_qat")
INT8_VARIANTS = ("int8_ptq", "int8_qat")
SELECTIVE_VARIANT = "int8_ptq_selective"
IO_CHOICES = ("int8", "uint8", "float")
SIDECAR_FORMAT = "oncolite-model/1"
DESCRIPTIONS = {
    "fp32": "float32 weights and activations",
    "fp16": "float16 weights, float32 activations",
    "dynamic": "dynamic-range quantization: int8 weights, float activations",
    "int8_ptq": "full-integer int8, post-training quantization",
    "int8_qat": "full-integer int8 from quantization-aware training",
    SELECTIVE_VARIANT: "int8 post-training quantization with named layers kept in float",
}


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding models/float.keras (and qat.keras)")
    parser.add_argument("--variants", help=f"comma-separated, from {','.join(VARIANTS)} (default: config export.variants)")
    parser.add_argument("--calibration-images", type=int,
                        help="training images for int8 calibration (default: config export.calibration_images)")
    parser.add_argument("--io", choices=IO_CHOICES, help="int8 variants' input/output type (default: config export.int8_io)")
    parser.add_argument("--allow-float-ops", action="store_true", help="accept int8 exports in which some ops stay float")
    parser.add_argument("--selective", metavar="TENSOR,...",
                        help="also export int8_ptq_selective with these tensors (names from the debugger "
                             "table in export_report.md) kept in float; implies float ops in that variant")
    parser.add_argument("--gate", type=float, default=0.01,
                        help="accuracy an int8 variant may lose against float on validation before the "
                             "quantization debugger runs (default 0.01 = 1 point)")
    add_output_flags(parser)


# --- calibration ---------------------------------------------------------------------------

def calibration_items(train_items: list[dict], count: int, seed: int) -> list[dict]:
    """A fixed, seeded sample of the training side (sorted first, so the order of the manifest does not matter)."""
    ordered = sorted(train_items, key=lambda item: str(item["path"]))
    return random.Random(seed).sample(ordered, min(count, len(ordered)))


def representative_dataset(items: list[dict], prep, quiet: bool = True):
    """The converter's calibration input: each image through the one preprocessing, batch of one."""
    def generate():
        for item in progress(items, desc="calibrating", quiet=quiet, unit="img"):
            yield [preprocess(item["path"], prep)[None]]

    return generate


def manifest_relative(path, root) -> str:
    """An item's path as the manifest writes it (relative to the manifest's root)."""
    return Path(os.path.relpath(path, root)).as_posix()


# --- conversion ----------------------------------------------------------------------------

def make_converter(model, variant: str, representative=None, io: str = "int8", allow_float_ops: bool = False):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if variant == "fp32":
        return converter
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    elif variant in INT8_VARIANTS:
        # Even a QAT model needs it: it calibrates the input and output tensors.
        converter.representative_dataset = representative
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.target_spec.supported_ops = ops + ([tf.lite.OpsSet.TFLITE_BUILTINS] if allow_float_ops else [])
        if io != "float":
            converter.inference_input_type = converter.inference_output_type = {"int8": tf.int8, "uint8": tf.uint8}[io]
    return converter


def io_facts(model_bytes: bytes) -> dict:
    """dtype, shape, scale and zero point of the model's one input and one output."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes)

    def describe(detail):
        scale, zero_point = detail["quantization"]
        return {"dtype": detail["dtype"].__name__, "shape": [int(d) for d in detail["shape"]],
                "scale": float(scale) if scale else None, "zero_point": int(zero_point) if scale else None}

    return {"input": describe(interpreter.get_input_details()[0]), "output": describe(interpreter.get_output_details()[0])}


def sidecar_facts(run: Run, variant: str, model_bytes: bytes, source: dict, options: dict, calibration) -> dict:
    """The sidecar without the file's own hash and size (those are of the file with metadata)."""
    return {"format": SIDECAR_FORMAT, "variant": variant, "description": DESCRIPTIONS[variant],
            "labels": run.labels, "preprocessing": run.prep.to_dict(), **io_facts(model_bytes),
            "run": run.path.resolve().name, "manifest_sha256": run.manifest.sha256, "threshold": run.threshold(),
            "source": source, "options": options, "calibration": calibration,
            "converter": {"tensorflow": tf.__version__}}


def already_exported(models: Path, variant: str, source: dict, options: dict) -> dict | None:
    """The sidecar of a finished export of this variant from the same source and options, else None."""
    tflite, sidecar = models / f"{variant}.tflite", models / f"{variant}.json"
    if not (tflite.exists() and sidecar.exists()):
        return None
    try:
        facts = json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    valid = (facts.get("format") == SIDECAR_FORMAT and facts.get("source") == source
             and facts.get("options") == options and facts.get("sha256") == file_sha256(tflite))
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
    path = run.models / f"{variant}.tflite"
    sidecar_path(path).unlink(missing_ok=True)
    write_bytes(path, described)
    write_json(sidecar_path(path), sidecar)
    return sidecar


# --- the command ---------------------------------------------------------------------------

def export_variants(run: Run, variants: list[str], chosen: list[dict], io: str, allow_float_ops: bool = False,
                    selective: list[str] | None = None, quiet: bool = True) -> dict:
    """Export each variant (skipping finished ones), int8 ones calibrated on `chosen` training
    items; returns {variant: {status, sidecar, ops, float_ops}}."""
    float_model = load_float_model(run.models / "float.keras")
    calibration = {"side": "train", "count": len(chosen), "seed": int(run.config["seed"]),
                   "paths": [manifest_relative(item["path"], run.manifest.root) for item in chosen]}
    representative = representative_dataset(chosen, run.prep, quiet=quiet)
    jobs = [(variant, None) for variant in variants]
    if selective:
        jobs.append((SELECTIVE_VARIANT, selective))
    results = {}
    for variant, denylist in jobs:
        source_name = "qat.keras" if variant == "int8_qat" else "float.keras"
        source = {"model": f"models/{source_name}", "sha256": file_sha256(run.models / source_name)
                  if (run.models / source_name).exists() else None}
        int8 = variant in INT8_VARIANTS or variant == SELECTIVE_VARIANT
        # The selective variant's float layers need float tensors around them: float I/O.
        options = {"io": io if variant in INT8_VARIANTS else "float", "calibration_images": len(chosen) if int8 else None,
                   "allow_float_ops": bool(allow_float_ops or denylist), "selective": denylist or None}
        done = already_exported(run.models, variant, source, options)
        if done is None:
            if source["sha256"] is None:
                raise OncoliteError(f"{run.models / source_name}: missing; run `oncolite quantize {run.path}` "
                                    f"first or leave {variant} out of --variants")
            model_bytes = convert_variant(run, variant, float_model, representative, options)
            done = write_export(run, variant, model_bytes, sidecar_facts(run, variant, model_bytes, source, options,
                                                                         calibration if int8 else None))
            status = "exported"
        else:
            status = "up to date"
        results[variant] = _with_ops(run, variant, done, int8, options, status)
    return results


def convert_variant(run: Run, variant: str, float_model, representative, options: dict) -> bytes:
    if variant == SELECTIVE_VARIANT:
        from quantize.debug import selective_quantize

        return selective_quantize(float_model, representative, options["selective"])
    if variant == "int8_qat":
        from quantize.qat import load_qat_model

        model = load_qat_model(run.models / "qat.keras", float_model)
    else:
        model = float_model
    converter = make_converter(model, variant, representative, options["io"], options["allow_float_ops"])
    return converter.convert()


def _with_ops(run: Run, variant: str, sidecar: dict, int8: bool, options: dict, status: str) -> dict:
    model_bytes = (run.models / f"{variant}.tflite").read_bytes()
    rows = checks.list_ops(model_bytes)
    float_found = checks.check_integer_only(model_bytes, str(run.models / f"{variant}.tflite"),
                                            float_io=options["io"] == "float",
                                            allow_float_ops=options["allow_float_ops"]) if int8 else []
    return {"status": status, "sidecar": sidecar, "ops": checks.op_summary(rows),
            "float_ops": [f"{row['op']}#{row['index']}" for row in float_found]}


def parse_variants(text: str | None, default: list[str]) -> list[str]:
    variants = [v.strip() for v in text.split(",") if v.strip()] if text else list(default)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise OncoliteError(f"--variants: unknown {', '.join(unknown)}; choose from {','.join(VARIANTS)}")
    return variants


def main(args) -> int:
    from quantize.debug import gate_report, write_report

    run = open_run(args.run_dir)
    settings = run.config["export"]
    variants = parse_variants(args.variants, settings["variants"])
    count = args.calibration_images or settings["calibration_images"]
    if count < 1:
        raise OncoliteError("--calibration-images must be at least 1")
    io = args.io or settings["int8_io"]
    selective = [s.strip() for s in args.selective.split(",") if s.strip()] if args.selective else None
    quiet = args.quiet or args.json
    chosen = calibration_items(run.sides()["train"], count, int(run.config["seed"]))
    results = export_variants(run, variants, chosen, io, args.allow_float_ops, selective, quiet=quiet)
    report = gate_report(run, results, gate=args.gate, representative=representative_dataset(chosen, run.prep),
                         quiet=quiet)
    write_report(run, report)
    if args.json:
        print_json(report)
    else:
        for name, row in report["variants"].items():
            say(args, f"{name:<20} {row['size_bytes'] / 1e6:7.2f} MB  accuracy {row['accuracy']:.3f}  "
                      f"MCC {row['mcc']:.3f}  agreement {row['agreement']:.1%}  ({row['status']})")
        for warning in report["warnings"]:
            say(args, f"warning: {warning}")
        say(args, f"report: {run.models / 'export_report.md'}")
    return EXIT_OK
