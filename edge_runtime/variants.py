"""The TFLite variants oncolite exports: one table that export, benchmark, the pipeline and the
config read (in the spirit of Ultralytics' export_formats()). A new variant is one row here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    source: str  # "float": models/float.keras; "qat": models/qat.keras; "int8": the source of the chosen int8 model
    integer: bool  # full-integer: only TFLITE_BUILTINS_INT8 ops, calibrated on training images
    io: str | None  # fixed input/output type; None: float for float variants, config export.int8_io for integer ones
    batch: int | None = None  # a static batch size (LiteRT.js refuses a dynamic one); None: dynamic
    rounding: str = "nearest"  # int8 weight rounding: the converter's "nearest", or quantize.rounding's "gptq" / "gptq_act"
    selectable: bool = True  # named in --variants / export.variants (False: made by another option)


VARIANTS = {v.name: v for v in (
    Variant("fp32", "float32 weights and activations", "float", False, "float"),
    Variant("fp16", "float16 weights, float32 activations", "float", False, "float"),
    Variant("dynamic", "dynamic-range quantization: int8 weights, float activations", "float", False, "float"),
    Variant("int8_ptq", "full-integer int8, the converter's post-training quantization (nearest rounding)",
            "float", True, None),
    Variant("int8_gptq", "full-integer int8, post-training quantization with each kernel rounded to reconstruct "
                         "its layer's float output and bias correction (quantize.rounding)", "float", True, None,
            rounding="gptq"),
    Variant("int8_gptq_act", "full-integer int8 like int8_gptq, but each kernel rounded layer by layer on the inputs "
                             "the int8 model really gives it (earlier kernels and activations already rounded), so "
                             "that it also makes up for their rounding: more faithful, a few minutes per model "
                             "(quantize.rounding, docs/INT8.md)", "float", True, None, rounding="gptq_act"),
    Variant("int8_qat", "full-integer int8 from quantization-aware training", "qat", True, None),
    Variant("int8", "the int8 model to ship: the full-integer candidate (int8_ptq, int8_gptq, int8_gptq_act, int8_qat) that "
                    "agrees best with the float model on validation", "int8", True, None),
    Variant("int8_uint8", "the shipped int8 model with uint8 input and output and a batch of 1, for MediaPipe "
                          "Tasks and LiteRT.js in the browser (both refuse int8 inputs)", "int8", True, "uint8", batch=1),
    Variant("int8_ptq_selective", "int8 post-training quantization with named layers kept in float (--selective)",
            "float", True, "float", selectable=False),
)}
# Full-integer variants converted from a model of their own, among which export chooses `int8`.
INT8_CANDIDATES = ("int8_ptq", "int8_gptq", "int8_gptq_act", "int8_qat")
SELECTABLE = tuple(name for name, v in VARIANTS.items() if v.selectable)


def io_type(variant: str, int8_io: str) -> str:
    """The input/output type a variant is exported with, given config export.int8_io."""
    v = VARIANTS[variant]
    return v.io or (int8_io if v.integer else "float")
