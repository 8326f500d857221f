"""TFLite interpreter backends, tried in order: ai-edge-litert, tflite-runtime, tf.lite.

ai-edge-litert is the maintained runtime and runs every variant we export. tflite-runtime 2.14
(the last release, numpy<2) runs fp32, fp16 and full-integer int8 models but not the
dynamic-range models of current converters (their FULLY_CONNECTED/CONV ops have versions it
does not know). tf.lite works everywhere TensorFlow does and is deprecated: the last resort,
and the only place the edge runtime may import TensorFlow.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from edge_runtime.console import native_log_level, native_stderr_filtered
from edge_runtime.errors import ModelError, OncoliteError
from edge_runtime.flatbuf import model_kind

BACKENDS = ("ai-edge-litert", "tflite-runtime", "tf.lite")
RESOLVERS = ("default", "reference")

# What each backend cannot run: checked before loading, so the user reads why instead of an op-version error.
CANNOT_RUN = {"tflite-runtime": {"dynamic"}}


class BackendError(OncoliteError):
    """A requested interpreter backend that is not installed or cannot run the model."""


def installed_backends() -> list[str]:
    return [name for name in BACKENDS if _module_available(name)]


def _module_available(name: str) -> bool:
    module = {"ai-edge-litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime", "tf.lite": "tensorflow"}[name]
    return importlib.util.find_spec(module) is not None


def _interpreter_module(name: str):
    if name == "ai-edge-litert":
        return importlib.import_module("ai_edge_litert.interpreter")
    if name == "tflite-runtime":
        return importlib.import_module("tflite_runtime.interpreter")
    tf = importlib.import_module("tensorflow")
    return tf.lite


def make_interpreter(model, backend: str | None = None, threads: int | None = None, resolver: str = "default",
                     name: str | None = None):
    """(allocated interpreter, backend name) for a model path or bytes.

    `name`: how errors name the model (default: the path, or "<model bytes>").

    `backend` forces one of BACKENDS; otherwise the first installed one that can run the model.
    `resolver="reference"` uses the reference kernels (BUILTIN_REF): slower, but bit-identical
    across CPUs, which is what cross-device comparisons need.
    """
    if resolver not in RESOLVERS:
        raise BackendError(f"resolver must be one of {', '.join(RESOLVERS)}, got {resolver!r}")
    model_bytes = model if isinstance(model, (bytes, bytearray)) else Path(model).read_bytes()
    name = name or (os.fsdecode(model) if isinstance(model, (str, os.PathLike)) else "<model bytes>")
    kind = model_kind(model_bytes)
    for candidate in _candidates(backend):
        if kind in CANNOT_RUN.get(candidate, ()):
            if backend:
                raise BackendError(f"{name}: {candidate} cannot run {kind}-range models from current converters "
                                   "(op versions it does not know); use --backend ai-edge-litert or an int8/fp32 variant")
            continue
        return _build(candidate, bytes(model_bytes), threads, resolver, name), candidate
    raise BackendError(f"{name}: no installed interpreter can run this {kind} model; pip install ai-edge-litert")


def _candidates(backend: str | None) -> list[str]:
    if backend is None:
        found = installed_backends()
        if not found:
            raise BackendError("no TFLite interpreter installed; pip install ai-edge-litert "
                               "(or tflite-runtime on older devices)")
        return found
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not _module_available(backend):
        hint = {"tf.lite": "tensorflow"}.get(backend, backend)
        raise BackendError(f"backend {backend} is not installed; pip install {hint}, or drop --backend")
    return [backend]


def _build(backend: str, model_bytes: bytes, threads: int | None, resolver: str, name: str):
    module = _interpreter_module(backend)
    resolvers = module.experimental.OpResolverType if backend == "tf.lite" else module.OpResolverType
    kind = resolvers.BUILTIN_REF if resolver == "reference" else resolvers.AUTO
    try:
        # The runtime announces its CPU delegate on stderr while the interpreter is built.
        with native_stderr_filtered(native_log_level()):
            interpreter = module.Interpreter(model_content=model_bytes, num_threads=threads,
                                             experimental_op_resolver_type=kind)
            interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{name}: {backend} cannot load the model ({reason}); "
                         "re-export it or try another --backend") from None
    return interpreter
