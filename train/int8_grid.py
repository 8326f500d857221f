"""The int8 grid the TFLite converter puts a kernel on, in Keras terms.

The converter folds every BatchNormalization into the convolution before it and rounds the
folded kernel to int8 per output channel (scale = max |w| / 127, q = round(w / scale)). These
helpers compute that folded kernel and its grid for a Keras layer and write a folded kernel
back: training snaps chosen layers onto the grid with them (config `int8_grid_layers`),
quantize.rounding chooses the integers and benchmarks.int8_study ablates them.
"""

from __future__ import annotations

import numpy as np

import oncolite.train  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tf_keras as keras

QMAX = 127  # TFLite's symmetric int8 weight range is [-127, 127]


def weight_layers(model: keras.Model) -> list[tuple]:
    """(layer, the BatchNormalization folded into it or None) for every Conv2D, DepthwiseConv2D
    and Dense layer of a flat model, in graph order: the layers whose kernels the converter
    quantizes per output channel."""
    layers, found = model.layers, []
    for i, layer in enumerate(layers):
        if isinstance(layer, keras.layers.Conv2D) and getattr(layer, "groups", 1) != 1:
            continue  # grouped convolutions: the converter's layout is another story; left to nearest rounding
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            after = layers[i + 1] if i + 1 < len(layers) else None
            consumers = [node.outbound_layer for node in layer.outbound_nodes]
            bn = after if isinstance(after, keras.layers.BatchNormalization) and consumers == [after] else None
            found.append((layer, bn))
    return found

def bn_scale(bn) -> np.ndarray:
    """The per-channel factor the converter multiplies into the kernel when it folds `bn`."""
    gamma, _, _, variance = [np.asarray(w, np.float32) for w in bn.get_weights()]
    return gamma / np.sqrt(variance + np.float32(bn.epsilon))

def folded_kernel(layer, bn) -> np.ndarray:
    """The kernel as the converter quantizes it, as rows: [out channels, inputs per output]."""
    kernel = np.asarray(layer.get_weights()[0], np.float32)
    depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
    # Conv2D (h, w, in, out) -> [out, h*w*in]; DepthwiseConv2D (h, w, in, 1) -> [in, h*w]; Dense (in, out) -> [out, in].
    rows = kernel.reshape(-1, kernel.shape[2]).T if depthwise else kernel.reshape(-1, kernel.shape[-1]).T
    return rows * (bn_scale(bn)[:, None] if bn is not None else 1.0)

def grid_step(rows: np.ndarray) -> np.ndarray:
    """The converter's per-channel scale: max |w| / 127 (1 for an all-zero channel)."""
    step = np.abs(rows).max(axis=1) / QMAX
    return np.where(step > 0, step, 1.0).astype(np.float32)

def round_nearest(rows: np.ndarray, step: np.ndarray) -> np.ndarray:
    return np.clip(np.round(rows / step[:, None]), -QMAX, QMAX)

def write_kernel(layer, bn, rows: np.ndarray) -> None:
    """Store folded rows back as the layer's kernel (divided by the BatchNorm factor)."""
    weights = layer.get_weights()
    kernel = weights[0]
    unfolded = rows / (bn_scale(bn)[:, None] if bn is not None else 1.0)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw, channels, mult = kernel.shape
        new = unfolded.T.reshape(kh, kw, channels, mult)
    else:
        new = unfolded.T.reshape(kernel.shape)
    layer.set_weights([new.astype(kernel.dtype), *weights[1:]])
