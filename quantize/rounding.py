"""Int8 weight rounding that keeps each layer's output, not each weight, closest to float.

The TFLite converter folds every BatchNormalization into the convolution before it and rounds
the folded kernel to int8 per output channel (scale = max |w| / 127, q = round(w / scale)).
Rounding each weight to its nearest grid point is best weight by weight, but not for what the
layer computes: the rounding errors of a kernel add up over its inputs. On BUSI they add up
coherently, because the inputs are smooth, mostly dark grayscale images (the three colour
channels are equal, so Conv1's effective kernel is the *sum* of three ImageNet colour kernels
that largely cancel) and the early BatchNorm scales are large. That is where most int8-vs-float
flips come from (docs/INT8.md: the first four layers hold half of them).

`reconstruct_weights` chooses, for every conv and dense kernel, the grid point of each weight so that the
layer's output on calibration images stays closest to float: min_Q E||(W - Q) x||^2 over Q on
the converter's own grid, solved weight by weight with second-order error feedback (GPTQ:
Frantar et al., ICLR 2023, the greedy solver of the objective that AdaRound, Nagel et al., ICML
2020, optimizes by gradient descent). The remaining mean error of each output channel moves into
its bias (empirical bias correction, Nagel et al., ICCV 2019). The chosen kernel is written back
into a copy of the float model divided by the BatchNorm scale, so that the converter's own
folding and rounding land on exactly the chosen integers: the .tflite is a plain LiteRT model,
and the float model that everything is compared with is left untouched.
"""

from __future__ import annotations

import numpy as np

import oncolite.train  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tf_keras as keras

from oncolite.train.int8_grid import QMAX, bn_scale, folded_kernel, grid_step, round_nearest, weight_layers, write_kernel

DAMPING = 0.01  # added to the input second moments, relative to their mean diagonal (as in GPTQ)
METHODS = ("nearest", "gptq")
# What export records as the rounding of int8_gptq: a change to the recipe below re-exports it.
RECIPE = "gptq-3 (one pass on float inputs, bias correction, nearest where calibration is too small)"
# Reconstruction needs far more calibration samples than inputs per output (kernel size):
# with fewer, E[x x^T] is rank-deficient and the solver cancels errors along directions the
# calibration images never take, which new images do (the classifier head: 200 pooled feature
# vectors for 1280 inputs). Such layers keep the converter's nearest rounding.
MIN_SAMPLES_PER_INPUT = 10
# Sequential rounding computes the inputs of this many consecutive layers (about one inverted
# residual block) per pass through the partly rounded copy: 18 passes instead of 53 for MobileNetV2.
SEQUENTIAL_GROUP = 3


def patches(layer, x: tf.Tensor) -> np.ndarray:
    """The layer's input as the rows its kernel sees, with the layer's own padding and strides:
    [positions, h*w*in] for Conv2D, [positions, h*w, channels] for DepthwiseConv2D."""
    channels = int(x.shape[-1])
    if isinstance(layer, keras.layers.Dense):
        return np.asarray(x).reshape(-1, channels)
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    if (kh, kw, sh, sw) == (1, 1, 1, 1):
        flat = np.asarray(x).reshape(-1, channels)
    else:
        dh, dw = layer.dilation_rate
        flat = tf.image.extract_patches(tf.convert_to_tensor(x), sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1], rates=[1, dh, dw, 1],
                                        padding=layer.padding.upper()).numpy().reshape(-1, kh * kw * channels)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return flat.reshape(-1, kh * kw, channels)
    return flat


class InputMoments:
    """Running E[x x^T] and E[x] of one layer's kernel inputs (per channel for depthwise)."""

    def __init__(self, layer):
        self.depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        self.gram = self.total = None
        self.count = 0

    def add(self, p: np.ndarray) -> None:
        p = p.astype(np.float64)
        gram = np.einsum("mkc,mlc->ckl", p, p) if self.depthwise else p.T @ p
        total = p.sum(axis=0).T if self.depthwise else p.sum(axis=0)  # depthwise: [channels, h*w]
        self.gram = gram if self.gram is None else self.gram + gram
        self.total = total if self.total is None else self.total + total
        self.count += p.shape[0]

    def second(self) -> np.ndarray:
        return self.gram / self.count

    def mean(self) -> np.ndarray:
        return self.total / self.count


def collect_moments(model: keras.Model, layers: list, batches) -> list[InputMoments]:
    """One pass over the calibration batches through the float model, accumulating each layer's
    input moments (memory: one batch of activations, never the whole set)."""
    probe = keras.Model(model.input, [layer.input for layer in layers])
    moments = [InputMoments(layer) for layer in layers]
    for batch in batches:
        outputs = probe(batch, training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        for layer, m, x in zip(layers, moments, outputs):
            m.add(patches(layer, x))
    return moments


def gptq(rows: np.ndarray, second: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Integer kernel rows minimizing E||(W - step*Q) x||^2 greedily, weight by weight.

    `second` is E[x x^T], one [d, d] matrix shared by all rows (Conv2D) or one per row
    ([rows, d, d], depthwise). Each weight is rounded in turn and its error is pushed onto the
    weights not yet rounded along the inverse-Hessian direction that cancels it best."""
    w = rows.astype(np.float64).copy()
    n, d = w.shape
    h = second if second.ndim == 3 else second[None]
    eye = np.eye(d)
    diag = np.diagonal(h, axis1=1, axis2=2)
    h = h + (DAMPING * diag.mean(axis=1) + 1e-12)[:, None, None] * eye
    # Upper Cholesky factor of H^-1 (GPTQ's formulation): row i holds the feedback of weight i.
    upper = np.transpose(np.linalg.cholesky(np.linalg.inv(h)), (0, 2, 1))
    if upper.shape[0] == 1:
        upper = np.broadcast_to(upper, (n, d, d))
    q = np.zeros_like(w)
    scale = step.astype(np.float64)
    for i in range(d):
        q[:, i] = np.clip(np.round(w[:, i] / scale), -QMAX, QMAX)
        err = (w[:, i] - q[:, i] * scale) / upper[:, i, i]
        w[:, i:] -= err[:, None] * upper[:, i, i:]
    return keep_scale(q, rows, step)


def keep_scale(q: np.ndarray, rows: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Make each row's largest |q| exactly 127 at the float kernel's largest weight, so that the
    converter, which derives the scale from the largest weight, finds the same step."""
    q = q.copy()
    peak = np.abs(rows).argmax(axis=1)
    idx = np.arange(len(rows))
    q[idx, peak] = np.sign(rows[idx, peak]) * QMAX
    return np.clip(q, -QMAX, QMAX)


def reconstruct_weights(model: keras.Model, batches, method: str = "gptq", bias_correction: bool = True,
                        sequential: bool = False) -> tuple:
    """A copy of the float model whose kernels, once the converter folds and rounds them,
    are the chosen int8 kernels; returns (model, per-layer report rows).

    `batches`: preprocessed calibration batches (N x H x W x 3 float32), read more than once.
    "nearest" keeps the converter's own rounding (only the bias correction changes anything).
    `sequential`: each layer's inputs come from the copy with every earlier kernel already
    rounded, so a layer's rounding and bias also absorb what the layers before it changed
    (the mean of its float output is matched: E[W x_float] = E[Q x_rounded] + shift);
    otherwise every layer sees the float model's inputs (one pass, faster). On BUSI the one-pass
    rounding is the measured one (docs/INT8.md); the sequential variant made fold 0 worse and is
    kept for study (benchmarks.int8_study recipe gptq_seq), not used by export."""
    if method not in METHODS:
        raise ValueError(f"weight rounding must be one of {', '.join(METHODS)}, got {method!r}")
    batches = list(batches)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    pairs = weight_layers(clone)
    float_moments = collect_moments(model, [model.get_layer(layer.name) for layer, _ in pairs], batches)
    report, current = [], {}
    for index, ((layer, bn), float_m) in enumerate(zip(pairs, float_moments)):
        if sequential and index % SEQUENTIAL_GROUP == 0:
            # One pass serves the next few layers: inputs with every earlier group already rounded.
            group = [pair[0] for pair in pairs[index:index + SEQUENTIAL_GROUP]]
            current = dict(zip([g.name for g in group], collect_moments(clone, group, batches)))
        m = current[layer.name] if sequential else float_m
        rows = folded_kernel(layer, bn)
        step = grid_step(rows)
        nearest = round_nearest(rows, step)
        nearest_mse = _output_mse(rows - nearest * step[:, None], m)
        q, mse = nearest, nearest_mse
        if method == "gptq" and m.count >= MIN_SAMPLES_PER_INPUT * rows.shape[1]:
            # The greedy solver is not optimal: keep, per output channel, whichever rounding
            # reconstructs the calibration outputs better.
            candidate = gptq(rows, m.second(), step)
            candidate_mse = _output_mse(rows - candidate * step[:, None], m)
            better = candidate_mse < nearest_mse
            q, mse = np.where(better[:, None], candidate, nearest), np.where(better, candidate_mse, nearest_mse)
        chosen = (q * step[:, None]).astype(np.float32)
        # The mean output the float model has here, minus what the rounded copy gives.
        if m.depthwise:
            shift = np.sum(rows * float_m.mean() - chosen * m.mean(), axis=1)
        else:
            shift = rows @ float_m.mean() - chosen @ m.mean()
        report.append({"layer": layer.name, "output_mse": float(np.mean(mse)),
                       "output_mse_nearest": float(np.mean(nearest_mse)), "mean_shift": float(np.abs(shift).mean())})
        write_kernel(layer, bn, chosen)
        if bias_correction:
            correct_bias(layer, bn, shift.astype(np.float32))
    return clone, report


def _output_mse(delta: np.ndarray, m: InputMoments) -> np.ndarray:
    """E[((W - Q) x)^2] per output channel."""
    second = m.second()
    if m.depthwise:
        return np.einsum("ck,ckl,cl->c", delta, second, delta)
    return np.sum((delta @ second) * delta, axis=1)


def correct_bias(layer, bn, shift: np.ndarray) -> None:
    """Add the mean output error of the rounded kernel back: to BatchNorm's beta (the converter
    folds it into the bias unchanged) or to the layer's own bias."""
    if bn is not None:
        gamma, beta, mean, variance = bn.get_weights()
        bn.set_weights([gamma, beta + shift, mean, variance])
    elif getattr(layer, "use_bias", False):
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel, bias + shift])


def fold_batchnorm(model: keras.Model) -> keras.Model:
    """The same network with every BatchNormalization folded into the kernel and bias of the
    conv before it, as the converter folds it. Quantization-aware training of this model
    fake-quantizes the very kernels the converter will round (tfmot quantizes the unfolded
    kernel and leaves the BatchNorm apart, so its simulation is not the converted model's)."""
    bn_of = {layer.name: bn for layer, bn in weight_layers(model) if bn is not None}
    into = {bn.name: conv for conv, bn in bn_of.items()}
    config = model.get_config()

    def rewire(node):  # an inbound reference to a folded BatchNorm now points at its conv
        if isinstance(node, list):
            if node and isinstance(node[0], str) and node[0] in into:
                return [into[node[0]], *node[1:]]
            return [rewire(n) for n in node]
        return node

    layers = []
    for entry in config["layers"]:
        if entry["name"] in into:
            continue
        entry = {**entry, "inbound_nodes": rewire(entry["inbound_nodes"])}
        if entry["name"] in bn_of:
            entry["config"] = {**entry["config"], "use_bias": True}
        layers.append(entry)
    config = {**config, "layers": layers, "output_layers": rewire(config["output_layers"])}
    folded = keras.Model.from_config(config)
    for layer in folded.layers:
        source, bn = model.get_layer(layer.name), bn_of.get(layer.name)
        if bn is None:
            layer.set_weights(source.get_weights())
            continue
        _, beta, mean, _ = [np.asarray(w, np.float32) for w in bn.get_weights()]
        factor = bn_scale(bn)
        bias = beta - mean * factor
        if len(source.get_weights()) > 1:  # a conv with its own bias before the BatchNorm
            bias = bias + source.get_weights()[1] * factor
        write_kernel(layer, None, folded_kernel(source, bn))  # the converter's folded kernel, in Keras layout
        layer.set_weights([layer.get_weights()[0], bias.astype(np.float32)])
    return folded
