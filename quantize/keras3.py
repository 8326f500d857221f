"""A Keras 3 model as its tf-keras twin, so a model saved by today's `import keras` goes through
the kit like one saved by tf-keras.

The kit's quantization works on tf-keras models (the TFLite converter's Keras path, tfmot, and
quantize.rounding's walk over tf-keras' graph), and tf-keras cannot read a Keras 3 file. So the
Keras 3 model is loaded with Keras 3 and rebuilt layer by layer in tf-keras: each layer from its
own config (the arguments tf-keras knows; initializers, regularizers and constraints are left out,
since the weights are copied and nothing trains), called on the same inputs in the order of the
Keras 3 graph (nested models rebuilt the same way), then every layer's weights copied by name.
The twin must compute what the original does: both are run on the same random images and a
difference beyond float rounding is refused, so an argument the twin could not take can never
change a result silently.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from edge_runtime.errors import ModelError

# What tf-keras' base Layer takes through **kwargs (tf_keras.layers.Layer.__init__).
_BASE_KWARGS = {"name", "dtype", "trainable", "dynamic", "input_dim", "input_shape", "batch_input_shape",
                "batch_size", "weights", "activity_regularizer", "autocast", "implementation"}
_UNUSED = ("_initializer", "_regularizer", "_constraint")
# Arguments Keras 3 renamed: its name -> tf-keras' (per layer class).
_RENAMED = {"LeakyReLU": {"negative_slope": "alpha"}}
TOLERANCE = 1e-4  # of the outputs, absolute, plus the same relative: float32 rounding, not a changed layer
PROBE_SIDE = 224  # the side a model of free input size is checked at


def load_keras3(path: Path):
    """The model in a Keras 3 file (.keras or .h5), or None if Keras 3 cannot read it either."""
    try:
        import keras
    except ImportError:
        return None
    if not str(getattr(keras, "__version__", "0")).startswith("3"):
        return None
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception:  # noqa: BLE001 - not a Keras 3 file either: the caller reports tf-keras' reason
        return None


def tf_keras_twin(model, where):
    """The tf-keras model computing what the Keras 3 `model` computes (ModelError if it cannot)."""
    inputs, outputs = model.inputs, model.outputs
    if not isinstance(inputs, (list, tuple)) or len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"{where}: {len(inputs)} inputs and {len(outputs)} outputs; give an image classifier "
                         "with one image input and one class output")
    twin = _rebuild(model, where)
    _copy_weights(model, twin, where)
    # Probed on both input ranges a classifier may take (normalized, raw pixels); a free size at 224.
    shape = [2] + [PROBE_SIDE if d is None else d for d in inputs[0].shape[1:]]
    rng = np.random.default_rng(0)
    for low, high in ((-1.0, 1.0), (0.0, 255.0)):
        x = rng.uniform(low, high, shape).astype(np.float32)
        try:
            want = np.asarray(model(x, training=False))
            got = np.asarray(twin(x, training=False))
        except Exception as e:  # noqa: BLE001 - whatever a forward pass raises, only this model is unusable
            raise ModelError(f"{where}: cannot run it on {shape[1:]} inputs ({_reason(e)})") from None
        if want.shape != got.shape or np.abs(want - got).max() > TOLERANCE * (1 + np.abs(want).max()):
            raise ModelError(f"{where}: its tf-keras twin computes other outputs than the Keras 3 model "
                             "(a layer argument tf-keras does not have); save it from tf-keras instead")
    return twin


def _rebuild(model, where):
    import keras
    import tf_keras

    if isinstance(model, keras.Sequential):
        x = inputs = tf_keras.Input(batch_shape=tuple(model.inputs[0].shape), dtype=model.inputs[0].dtype)
        for layer in model.layers:
            x = _twin(layer, where)(x)
        return tf_keras.Model(inputs, x, name=model.name)
    config = model.get_config()
    tensors, twins, pending = {}, {}, []

    def resolve(value):
        # A Keras 3 node's arguments: its tensors named by keras_history (layer, node, index).
        if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
            return tensors[tuple(value["config"]["keras_history"])]
        if isinstance(value, (list, tuple)):
            return [resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    for entry in config["layers"]:
        name = entry["name"]
        if entry["class_name"] == "InputLayer":
            batch_shape = entry["config"].get("batch_shape") or entry["config"].get("batch_input_shape")
            tensors[(name, 0, 0)] = tf_keras.Input(batch_shape=tuple(batch_shape), dtype=entry["config"].get("dtype"),
                                                   name=name)
            continue
        try:
            layer = model.get_layer(name)
        except ValueError:  # a Keras 3 op (x * 2, keras.ops.mean) in the graph, not a layer
            raise ModelError(f"{where}: {name!r} is a Keras 3 operation, not a layer; write it as a layer "
                             "(e.g. Rescaling, Multiply) or save the model from tf-keras") from None
        twins[name] = _twin(layer, where)
        pending += [(name, index, node) for index, node in enumerate(entry["inbound_nodes"])]
    # Each node once its inputs exist (resolve finds them all): a shared layer's later call may
    # take a later layer's output.
    while pending:
        waiting = []
        for name, index, node in pending:
            # `training` is the saved call's (True for augmentation layers while building): not inference's.
            kwargs = {k: v for k, v in node["kwargs"].items() if k not in ("training", "mask")}
            try:
                args, kwargs = resolve(node["args"]), resolve(kwargs)
            except KeyError:
                waiting.append((name, index, node))
                continue
            out = twins[name](*args, **kwargs)
            for i, tensor in enumerate(out if isinstance(out, (list, tuple)) else [out]):
                tensors[(name, index, i)] = tensor
        if len(waiting) == len(pending):
            raise ModelError(f"{where}: cannot order its graph (node of {waiting[0][0]!r}); save it from tf-keras")
        pending = waiting

    def ends(key):
        found = config[key]
        triples = [found] if found and isinstance(found[0], str) else found
        return [tensors[tuple(t)] for t in triples]

    inputs, outputs = ends("input_layers"), ends("output_layers")
    return tf_keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs if len(outputs) > 1 else outputs[0],
                          name=model.name)


def _twin(layer, where):
    """A nested model rebuilt, a layer twinned."""
    import keras

    return _rebuild(layer, where) if isinstance(layer, keras.Model) else _twin_layer(layer, where)


def _twin_layer(layer, where):
    import tf_keras

    kind = type(layer).__name__
    cls = getattr(tf_keras.layers, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, tf_keras.layers.Layer)):
        raise ModelError(f"{where}: layer {layer.name!r} is a {kind}, which tf-keras does not have; "
                         "save the model from tf-keras, or with built-in layers only")
    accepted = set(inspect.signature(cls.__init__).parameters) | _BASE_KWARGS
    renamed = _RENAMED.get(kind, {})
    config = {}
    for key, value in layer.get_config().items():
        key = renamed.get(key, key)
        if key.endswith(_UNUSED) or key not in accepted:
            continue
        if key == "dtype" and isinstance(value, dict):  # a Keras 3 DTypePolicy: its name ("float32", "mixed_float16")
            value = value.get("config", {}).get("name", "float32")
        config[key] = value
    try:
        return cls.from_config(config)
    except Exception as e:  # noqa: BLE001 - a config tf-keras reads otherwise
        raise ModelError(f"{where}: layer {layer.name!r} ({kind}) cannot be rebuilt in tf-keras "
                         f"({_reason(e)}); save the model from tf-keras") from None


def _reason(e: Exception) -> str:
    """An exception in one line: its end, where Keras says what it could not do (its start is
    often the whole config)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else "…" + text[-160:]


def _copy_weights(source, twin, where) -> None:
    for layer in source.layers:
        target = twin.get_layer(layer.name)
        if hasattr(layer, "layers") and layer.layers:
            _copy_weights(layer, target, where)
            continue
        weights = [np.asarray(w) for w in layer.get_weights()]
        try:
            target.set_weights(weights)
        except ValueError as e:
            raise ModelError(f"{where}: layer {layer.name!r}'s weights do not fit its tf-keras twin "
                             f"({_reason(e)}); save the model from tf-keras") from None
