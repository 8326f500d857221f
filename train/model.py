"""MobileNetV2 classifier, built as one flat tf-keras model so tfmot can quantize it as it is.

No Rescaling layer: pixel normalization happens in edge_runtime.preprocess, the one
preprocessing shared by training and the device (tfmot cannot quantize Rescaling either).
"""

from __future__ import annotations

from pathlib import Path
import tf_keras as keras

from edge_runtime.errors import ModelError
from .config import HEADS, resolve_weights


def build_classifier(num_classes: int, height: int = 224, width: int = 224, alpha: float = 1.0,
                     head: str = "compact", dropout: float = 0.2, dense_units: int = 0,
                     weights: str | None = "imagenet") -> keras.Model:
    """MobileNetV2 backbone + classification head, flat (every layer at the top level).

    head="compact": global average pooling, dropout, [dense_units ReLU], softmax dense; small and
    int8-friendly. head="reference": the reference study's Flatten, Dense 1024, Dropout 0.5, Dense.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    resolved = resolve_weights(alpha, weights)
    base = keras.applications.MobileNetV2(input_shape=(height, width, 3), alpha=alpha, include_top=False, weights=None)
    if resolved:
        try:
            # by_name would silently skip mismatches; the shipped file matches layer for layer.
            base.load_weights(resolved)
        except (ValueError, OSError) as e:
            raise ModelError(f"{resolved}: not MobileNetV2 alpha {alpha} backbone weights without the top "
                             f"({str(e).splitlines()[0]}); give a matching file, or --set weights=null") from None
    x = base.output
    if head == "compact":
        x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
        if dense_units:
            x = keras.layers.Dense(dense_units, activation="relu", name="head_dense")(x)
            x = keras.layers.Dropout(dropout, name="head_dropout_2")(x)
    else:
        x = keras.layers.Flatten(name="head_flatten")(x)
        x = keras.layers.Dense(dense_units or 1024, activation="relu", name="head_dense")(x)
        x = keras.layers.Dropout(0.5, name="head_dropout")(x)
    # float32 output even under mixed precision: softmax in float16 loses small probabilities.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(base.input, outputs, name=f"mobilenetv2_{head}")


def snap_to_int8_grid(model: keras.Model, layer_names) -> list[str]:
    """Put the BatchNorm-folded kernels of the named conv layers exactly on their int8 grid.

    The TFLite converter folds each BatchNormalization into the conv before it and rounds the
    kernel to int8 per output channel (scale = max |w| / 127). On BUSI, that rounding in the
    first two layers (Conv1, expanded_conv_depthwise) alone caused most of the int8-vs-float
    flips (docs/INT8.md). These layers stay frozen during fine-tuning, so snapping them once
    before training gives a float model whose int8 conversion rounds them without error.
    Returns the names of the layers snapped.
    """
    from .int8_grid import folded_kernel, grid_step, round_nearest, weight_layers, write_kernel

    folded = {layer.name: (layer, bn) for layer, bn in weight_layers(model) if bn is not None}
    missing = set(layer_names) - set(folded)
    if missing:
        raise ValueError(f"int8_grid_layers: no conv layer followed by BatchNormalization named {sorted(missing)}")
    snapped = [name for name in folded if name in set(layer_names)]
    for name in snapped:
        layer, bn = folded[name]
        rows = folded_kernel(layer, bn)
        step = grid_step(rows)
        write_kernel(layer, bn, round_nearest(rows, step) * step[:, None])
    return snapped


def load_float_model(path) -> keras.Model:
    """A run's models/float.keras, loaded in Keras' safe mode (no arbitrary code from the file)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no float model; train one with `oncolite train {path.parent.parent} --manifest M`")
    return keras.models.load_model(path, compile=False, safe_mode=True)


def head_layers(model: keras.Model) -> list:
    return [layer for layer in model.layers if layer.name.startswith("head_") or layer.name == "predictions"]


def backbone_layers(model: keras.Model) -> list:
    heads = {id(layer) for layer in head_layers(model)}
    return [layer for layer in model.layers if id(layer) not in heads and not isinstance(layer, keras.layers.InputLayer)]


def set_trainable_depth(model: keras.Model, depth: int | None, train_batchnorm: bool = False) -> None:
    """Freeze the backbone except its top `depth` layers (0: all frozen; None: all trainable).

    BatchNormalization layers stay frozen (inference mode) unless `train_batchnorm`: with a
    few hundred images pretrained statistics would drift (docs/STACK.md: momentum 0.999 collapses
    to one class). A backbone trained from scratch (weights=None) has no statistics worth
    keeping: pass train_batchnorm=True for it.
    """
    backbone = backbone_layers(model)
    cut = 0 if depth is None else max(0, len(backbone) - depth)
    for i, layer in enumerate(backbone):
        layer.trainable = i >= cut and (train_batchnorm or not isinstance(layer, keras.layers.BatchNormalization))
    for layer in head_layers(model):
        layer.trainable = True


def head_summary(model: keras.Model) -> dict:
    """Parameter count and float32 size of the head, for the report."""
    params = sum(int(w.shape.num_elements()) for layer in head_layers(model) for w in layer.weights)
    return {"head_params": params, "head_bytes_fp32": params * 4, "total_params": int(model.count_params())}


def is_flat(model: keras.Model) -> bool:
    return not any(isinstance(layer, keras.Model) for layer in model.layers)


def flatten(model: keras.Model) -> keras.Model:
    """Rebuild a model with nested sub-models as one flat graph and copy the weights.

    Handles the common transfer-learning shape `Sequential/Functional([backbone, head...])`
    where the backbone is a functional sub-model applied once.
    """
    if is_flat(model):
        return model
    inputs = keras.Input(shape=model.input_shape[1:], name="input")
    x = inputs
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            sub = flatten(layer)
            x = _apply_functional(sub, x)
        else:
            clone = layer.__class__.from_config(layer.get_config())
            x = clone(x)
            clone.set_weights(layer.get_weights())
    flat = keras.Model(inputs, x, name=f"{model.name}_flat")
    return flat


def _apply_functional(sub: keras.Model, tensor):
    """Re-apply each layer of a functional model on `tensor` with fresh copies of its layers."""
    cloned = keras.models.clone_model(sub, input_tensors=tensor)
    cloned.set_weights(sub.get_weights())
    return cloned.output
