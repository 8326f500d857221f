"""The accuracy gate after export, TFLite's layer-wise quantization debugger, selective quantization.

Every exported variant runs through the edge runtime (the code a device runs) on the manifest's
validation side and is compared with the float Keras model: accuracy, MCC, top-1 agreement.
When an int8 variant loses more accuracy than the gate, `tf.lite.experimental.
QuantizationDebugger` compares each quantized tensor with its float value on validation images
and ranks the tensors by RMSE / scale (error in units of one quantization step: > ~0.3 means
the layer's int8 range is a poor fit). Those tensors can be kept in float with
`oncolite export --selective NAME,...`, which writes `int8_ptq_selective` (float I/O); its size
and accuracy sit in the same report, so the cost of each kept layer is visible.
"""

from __future__ import annotations

import csv
import io
import math
import shlex

import numpy as np
from sklearn.metrics import accuracy_score, matthews_corrcoef

import oncolite.train  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from edge_runtime.atomic import write_json, write_text
from edge_runtime.console import file_size
from edge_runtime.model import EdgeModel
from . import checks
from .rundir import Run
from oncolite.train.data import load_arrays
from oncolite.train.metrics import agreement
from oncolite.train.model import load_float_model

DEBUG_IMAGES = 32  # validation images the debugger runs; per-layer errors settle well before that
TOP_LAYERS = 10


def compare(probs: np.ndarray, float_probs: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy, MCC, top-1 agreement with float, and the largest probability change."""
    pred, ref = probs.argmax(1), float_probs.argmax(1)
    return {"accuracy": float(accuracy_score(y, pred)), "mcc": float(matthews_corrcoef(y, pred)),
            "agreement": agreement(pred, ref)["value"],
            "mean_abs_prob_diff": float(np.mean(np.abs(probs - float_probs))) if len(probs) else 0.0,
            "max_prob_diff": float(np.max(np.abs(probs - float_probs))) if len(probs) else 0.0}


def _float_converter(float_model, representative):
    converter = tf.lite.TFLiteConverter.from_keras_model(float_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    return converter


def _images(x: np.ndarray):
    def generate():
        for sample in x:
            yield [sample[None]]

    return generate


def layer_errors(float_model, representative, x_debug: np.ndarray) -> list[dict]:
    """Every quantized tensor of the PTQ model with its error against float, worst first."""
    debugger = tf.lite.experimental.QuantizationDebugger(converter=_float_converter(float_model, representative),
                                                         debug_dataset=_images(x_debug))
    debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    dump.seek(0)
    rows = []
    for row in csv.DictReader(dump):
        scale = float(row["scale"])
        rmse = math.sqrt(float(row["mean_squared_error"]))
        rows.append({"tensor": row["tensor_name"], "op": row["op_name"], "scale": scale,
                     "rmse": rmse, "rmse_per_scale": rmse / scale if scale else math.inf,
                     "max_abs_error": float(row["max_abs_error"]), "mean_error": float(row["mean_error"])})
    return sorted(rows, key=lambda r: r["rmse_per_scale"], reverse=True)


def selective_quantize(float_model, representative, denylisted_nodes: list[str]) -> bytes:
    """int8 PTQ with the named tensors (TFLite tensor names, as in the debugger table) left in
    float. The debugger's converter keeps float input and output."""
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(denylisted_nodes))
    debugger = tf.lite.experimental.QuantizationDebugger(converter=_float_converter(float_model, representative),
                                                         debug_dataset=representative, debug_options=options)
    return debugger.get_nondebug_quantized_model()


def gate_report(run: Run, results: dict, gate: float = 0.01, representative=None, quiet: bool = True) -> dict:
    """Each exported variant against the float model on validation; the debugger for int8 variants over the gate."""
    x_val, y_val = load_arrays(run.sides()["val"], run.labels, run.prep, quiet=quiet, desc="validation images")
    float_model = load_float_model(run.dir.float_model)
    float_probs = float_model.predict(x_val, batch_size=32, verbose=0)
    reference = compare(float_probs, float_probs, y_val)
    fp32_size = results.get("fp32", {}).get("sidecar", {}).get("size_bytes")
    variants, warnings, over_gate = {}, [], []
    for name, result in results.items():
        probs = EdgeModel.load(run.dir.variant(name)).predict(x_val)
        side = result["sidecar"]
        row = {**compare(probs, float_probs, y_val), "size_bytes": side["size_bytes"],
               "size_vs_fp32": side["size_bytes"] / fp32_size if fp32_size else None,
               "io": side["input"]["dtype"], "status": result["status"], "ops": result["ops"],
               "float_ops": result["float_ops"], "selective": side["options"]["selective"],
               "uncertain_margin": side.get("uncertain_margin")}
        row["accuracy_loss"] = reference["accuracy"] - row["accuracy"]
        variants[name] = row
        if name.startswith("int8") and row["accuracy_loss"] > gate:
            over_gate.append(name)
    shipped = None
    if "int8" in results:
        loss = variants["int8"]["accuracy_loss"]
        shipped = {**results["int8"]["selection"], "accuracy_loss": loss, "over_gate": loss > gate}
        if shipped["over_gate"]:
            warnings.append(f"the shipped int8 model ({shipped['from']}, the most faithful candidate) still loses "
                            f"{loss:.1%} accuracy against float on validation, more than the gate of {gate:.1%}; "
                            "see the debugger table in export_report.md")
    else:
        warnings += [f"{name} loses {variants[name]['accuracy_loss']:.1%} accuracy against float on validation "
                     f"(gate {gate:.1%}); see the debugger table in export_report.md" for name in over_gate]
    # With a shipped int8 model only its own loss matters: the other candidates are comparisons.
    if shipped is not None:
        over_gate = [shipped["from"]] if shipped["over_gate"] else []
    debugger = None
    if over_gate and representative is not None:
        layers = layer_errors(float_model, representative, x_val[:DEBUG_IMAGES])
        worst = [row["tensor"] for row in layers[:3]]
        debugger = {"triggered_by": over_gate, "images": int(min(len(x_val), DEBUG_IMAGES)),
                    "layers": layers[:TOP_LAYERS],
                    # Tensor names hold ';' and spaces: quoted, so the printed command works when pasted.
                    "suggestion": f"oncolite export {shlex.quote(str(run.path))} --selective {shlex.quote(','.join(worst))}"}
    return {"run": str(run.path), "gate": gate, "n_val": int(len(y_val)),
            "float": {"accuracy": reference["accuracy"], "mcc": reference["mcc"]},
            "variants": variants, "int8": shipped, "debugger": debugger, "warnings": warnings}


def report_markdown(report: dict) -> str:
    lines = ["# Export report", "",
             f"Validation side: {report['n_val']} images. Float Keras model: accuracy {report['float']['accuracy']:.3f}, "
             f"MCC {report['float']['mcc']:.3f}. Agreement = same top-1 as the float model. "
             f"Gate: an int8 variant may lose {report['gate']:.1%} accuracy.", "",
             "| variant | size | x fp32 | I/O | accuracy | MCC | agreement | mean abs Δp | max abs Δp | uncertain band | float ops |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in report["variants"].items():
        ratio = f"{row['size_vs_fp32']:.2f}" if row["size_vs_fp32"] else "-"
        band = "-" if row.get("uncertain_margin") is None else f"{row['uncertain_margin']:.3f}"
        lines.append(f"| {name} | {file_size(row['size_bytes'])} | {ratio} | {row['io']} | {row['accuracy']:.3f} | "
                     f"{row['mcc']:.3f} | {row['agreement']:.1%} | {row.get('mean_abs_prob_diff', 0):.4f} | "
                     f"{row['max_prob_diff']:.4f} | {band} | {len(row['float_ops'])} |")
    shipped = report.get("int8")
    if shipped:
        lines += ["", f"**Shipped as `int8`: {shipped['from']}** ({shipped['rule']}). Candidates on validation:", "",
                  "| candidate | agreement | mean abs Δp |", "| --- | --- | --- |"]
        lines += [f"| {name} | {c['agreement']:.1%} | {c['mean_abs_prob_diff']:.4f} |" for name, c in shipped["candidates"].items()]
        lines += ["", "Uncertain band: an integer model's answer is flagged when its decision margin (top-1 minus "
                  "top-2 probability, or the distance to the threshold) is below the largest margin change it "
                  "showed against float on validation."]
    for warning in report["warnings"]:
        lines += ["", f"**Warning:** {warning}"]
    for name, row in report["variants"].items():
        lines += ["", f"## Ops of {name}", "", checks.format_op_table(row["ops"])]
        if row["selective"]:
            lines += ["", f"Kept in float: {', '.join(row['selective'])}."]
    debugger = report["debugger"]
    if debugger:
        lines += ["", "## Quantization debugger (PTQ of the float model)", "",
                  f"Triggered by {', '.join(debugger['triggered_by'])}; {debugger['images']} validation images. "
                  "RMSE / scale is the error in quantization steps.", "",
                  "| tensor | op | RMSE / scale | RMSE | max abs error |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| `{r['tensor']}` | {r['op']} | {r['rmse_per_scale']:.3f} | {r['rmse']:.4f} | {r['max_abs_error']:.4f} |"
                  for r in debugger["layers"]]
        lines += ["", "To keep the worst tensors in float (selective quantization; the size and accuracy of "
                  "`int8_ptq_selective` then appear above):", "", f"    {debugger['suggestion']}"]
    return "\n".join(lines) + "\n"


def write_report(run: Run, report: dict) -> None:
    write_json(run.dir.export_report, report)
    write_text(run.dir.export_report_md, report_markdown(report))
