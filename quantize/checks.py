"""What a .tflite really computes in: every op with the types of its tensors, read from the
model's flatbuffer (the LiteRT schema), and the check that an int8 export is integer only.

An op "runs as" the types of its activation tensors (inputs and outputs that are not constant
weights): int8 for a fully quantized op, float32 for a float op, "hybrid" when float
activations meet int8 weights (dynamic-range quantization). QUANTIZE and DEQUANTIZE are the
conversions at a float model boundary: in an int8-I/O export they must not touch float at all.
"""

from __future__ import annotations

from collections import Counter

from ai_edge_litert import schema_py_generated as schema

from edge_runtime.errors import ModelError

TYPE_NAMES = {value: name.lower() for name, value in vars(schema.TensorType).items() if not name.startswith("_")}
OP_NAMES = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
FLOAT_TYPES = {"float32", "float16", "float64"}
INTEGER_ACTIVATIONS = {"int8", "uint8", "int16"}
BOUNDARY_OPS = {"QUANTIZE", "DEQUANTIZE"}


class FloatOpError(ModelError):
    """An export meant to be integer-only still computes something in float."""


def _op_name(model, op) -> str:
    code = model.OperatorCodes(op.OpcodeIndex())
    # The schema keeps the old 8-bit code for ops < 127 and the wide code for newer ones.
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    return code.CustomCode().decode() if builtin == schema.BuiltinOperator.CUSTOM else OP_NAMES.get(builtin, str(builtin))


def _is_constant(model, tensor) -> bool:
    buffer = model.Buffers(tensor.Buffer())
    return buffer is not None and (buffer.DataLength() > 0 or buffer.Offset() > 1)


def list_ops(model_bytes: bytes) -> list[dict]:
    """One row per op in execution order: name, activation input/output types, weight types, runs_as."""
    model = schema.Model.GetRootAs(model_bytes, 0)
    rows = []
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            inputs, weights = [], []
            for t in op.InputsAsNumpy() if op.InputsLength() else []:
                if t < 0:  # optional input left out
                    continue
                tensor = graph.Tensors(int(t))
                (weights if _is_constant(model, tensor) else inputs).append(TYPE_NAMES[tensor.Type()])
            outputs = [TYPE_NAMES[graph.Tensors(int(t)).Type()] for t in op.OutputsAsNumpy()]
            name = _op_name(model, op)
            rows.append({"subgraph": g, "index": i, "op": name, "inputs": inputs, "outputs": outputs,
                         "weights": weights, "runs_as": runs_as(name, inputs, outputs, weights)})
    return rows


def runs_as(op: str, inputs: list[str], outputs: list[str], weights: list[str]) -> str:
    activations = set(inputs) | set(outputs)
    if op in BOUNDARY_OPS:
        return f"{'/'.join(sorted(set(inputs)))}->{'/'.join(sorted(set(outputs)))}"
    if activations & FLOAT_TYPES:
        floats = "/".join(sorted(activations & FLOAT_TYPES))
        return "hybrid" if set(weights) & INTEGER_ACTIVATIONS else floats
    quantized = activations & INTEGER_ACTIVATIONS
    return "/".join(sorted(quantized)) if quantized else "/".join(sorted(activations)) or "none"


def op_summary(rows: list[dict]) -> list[dict]:
    """[{op, runs_as, count}] sorted by count: the table in the export report."""
    counts = Counter((row["op"], row["runs_as"]) for row in rows)
    return [{"op": op, "runs_as": kind, "count": n} for (op, kind), n in counts.most_common()]


def float_ops(rows: list[dict], float_io: bool = False) -> list[dict]:
    """Ops that compute in float. With float I/O the QUANTIZE/DEQUANTIZE at the edges are expected."""
    found = []
    for row in rows:
        touches_float = bool((set(row["inputs"]) | set(row["outputs"])) & FLOAT_TYPES)
        if touches_float and not (float_io and row["op"] in BOUNDARY_OPS):
            found.append(row)
    return found


def check_integer_only(model_bytes: bytes, name: str, float_io: bool = False, allow_float_ops: bool = False) -> list[dict]:
    """Raise FloatOpError naming the float ops of an int8 export, unless they are allowed; return them."""
    found = float_ops(list_ops(model_bytes), float_io=float_io)
    if found and not allow_float_ops:
        listed = ", ".join(f"{row['op']}#{row['index']} ({row['runs_as']})" for row in found[:8])
        more = f" and {len(found) - 8} more" if len(found) > 8 else ""
        raise FloatOpError(f"{name}: {len(found)} op(s) still run in float: {listed}{more}; "
                           "find the layer that does not quantize, or pass --allow-float-ops to keep them")
    return found


def format_op_table(summary: list[dict]) -> str:
    """Markdown table of op kinds."""
    lines = ["| op | runs as | count |", "| --- | --- | --- |"]
    lines += [f"| {row['op']} | {row['runs_as']} | {row['count']} |" for row in summary]
    return "\n".join(lines)
