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

from pathlib import Path

import numpy as np

import oncolite.train  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tf_keras as keras

from oncolite.train.int8_grid import QMAX, bn_scale, folded_kernel, grid_step, round_nearest, weight_layers, write_kernel

DAMPING = 0.01  # added to the input second moments, relative to their mean diagonal (as in GPTQ)
METHODS = ("nearest", "gptq")
# What export records as the rounding of int8_gptq / int8_gptq_act: a change to a recipe below re-exports it.
RECIPES = {"gptq": "gptq-3 (one pass on float inputs, bias correction, nearest where calibration is too small)",
           "gptq_act": "gptq-act-1 (layer by layer on the int8 model's inputs, activations on int8_gptq's grids, "
                       "float output reconstructed, bias correction, nearest where calibration is too small)"}
# Reconstruction needs far more calibration samples than inputs per output (kernel size):
# with fewer, E[x x^T] is rank-deficient and the solver cancels errors along directions the
# calibration images never take, which new images do (the classifier head: 200 pooled feature
# vectors for 1280 inputs). Such layers keep the converter's nearest rounding.
MIN_SAMPLES_PER_INPUT = 10
# Calibration batches walked together by the one-pass recipe: bounded memory (~1 GB of
# activations for 64 images at 224 px) whatever export.calibration_images is.
ONE_PASS_BATCHES = 4


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
    """Running moments of one layer's kernel inputs x (per channel for depthwise): E[x x^T] and
    E[x]; with `reference` inputs (the float model's, for the same images and positions) also
    E[x_ref x^T], E[x_ref x_ref^T] and E[x_ref]. Without them the reference is x itself."""

    def __init__(self, layer):
        self.depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        self.sums: dict[str, np.ndarray] = {}
        self.count = 0

    def add(self, p: np.ndarray, reference: np.ndarray | None = None) -> None:
        p = p.astype(np.float64)
        self._add("gram", self._product(p, p))
        self._add("total", self._sum(p))
        if reference is not None:
            reference = reference.astype(np.float64)
            self._add("cross", self._product(reference, p))
            self._add("reference_gram", self._product(reference, reference))
            self._add("reference_total", self._sum(reference))
        self.count += p.shape[0]

    def _product(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """sum over positions of a b^T: [inputs, inputs], or [channels, h*w, h*w] for depthwise."""
        return np.einsum("mkc,mlc->ckl", a, b) if self.depthwise else a.T @ b

    def _sum(self, a: np.ndarray) -> np.ndarray:
        return a.sum(axis=0).T if self.depthwise else a.sum(axis=0)  # depthwise: [channels, h*w]

    def _add(self, key: str, value: np.ndarray) -> None:
        self.sums[key] = value if key not in self.sums else self.sums[key] + value

    def _mean(self, key: str, fallback: str | None = None) -> np.ndarray:
        return self.sums.get(key, self.sums[fallback or key]) / self.count

    def second(self) -> np.ndarray:
        return self._mean("gram")

    def mean(self) -> np.ndarray:
        return self._mean("total")

    def cross(self) -> np.ndarray:
        """E[x_ref x^T]."""
        return self._mean("cross", "gram")

    def reference_second(self) -> np.ndarray:
        return self._mean("reference_gram", "gram")

    def reference_mean(self) -> np.ndarray:
        return self._mean("reference_total", "total")

    @property
    def paired(self) -> bool:
        return "cross" in self.sums


def gptq(rows: np.ndarray, second: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Integer kernel rows minimizing E||(W - step*Q) x||^2 greedily, weight by weight.

    `second` is E[x x^T], one [d, d] matrix shared by all rows (Conv2D) or one per row
    ([rows, d, d], depthwise). Each weight is rounded in turn and its error is pushed onto the
    weights not yet rounded along the inverse-Hessian direction that cancels it best."""
    w = rows.astype(np.float64).copy()
    n, d = w.shape
    h = _damped(second)
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
                        sequential: bool = False, points: dict | None = None) -> tuple:
    """A copy of the float model whose kernels, once the converter folds and rounds them,
    are the chosen int8 kernels; returns (model, per-layer report rows).

    `batches`: preprocessed calibration batches (N x H x W x 3 float32). The sequential walk holds
    every batch's activations at the current layer, a layer's input and output at once, for the
    float model and the rounded copy: about 4 GB at MobileNetV2's widest layer for 200 images at
    224 px (the one pass holds ONE_PASS_BATCHES batches).
    "nearest" keeps the converter's own rounding (only the bias correction changes anything).
    One pass (the default, export's recipe): every layer's kernel reconstructs its float output
    from the float model's own inputs, min_Q E||(W - Q) x||^2.
    `sequential`: layers are rounded one at a time in graph order, each on the inputs x~ the
    partly rounded copy gives it (every earlier kernel rounded and, with `points` (activation_points of a
    converted model), every activation rounded on those int8 grids as the converted model rounds
    it), and the kernel reconstructs the *float* output from them, min_Q E||W x - Q x~||^2 (the
    objective of AdaRound and BRECQ): it also makes up for what the layers before it changed.
    That is GPTQ on the least-squares kernel V = W E[x x~^T] E[x~ x~^T]^-1 (damped towards W).
    The bias correction matches the float output's mean in both: E[W x] = E[Q x~] + shift."""
    if method not in METHODS:
        raise ValueError(f"weight rounding must be one of {', '.join(METHODS)}, got {method!r}")
    batches = list(batches)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    pairs = weight_layers(clone)
    if sequential:
        probe = clone
        if points:
            probe, switches = simulate_activations(clone, points)
            for switch in switches.values():
                switch.assign(1.0)
        steps = layer_moments(probe, pairs, batches, reference=model)
    else:
        steps = layer_moments(model, pairs, batches)
    report = []
    for (layer, bn), m in steps:
        rows = folded_kernel(layer, bn)
        step = grid_step(rows)
        nearest = round_nearest(rows, step) * step[:, None]
        nearest_mse = _output_mse(rows, nearest, m)
        chosen, mse = nearest, nearest_mse
        if method == "gptq" and m.count >= MIN_SAMPLES_PER_INPUT * rows.shape[1]:
            # The greedy solver is not optimal: keep, per output channel, whichever rounding
            # reconstructs the calibration outputs better.
            target = least_squares_kernel(rows, m) if m.paired else rows
            target_step = grid_step(target)
            candidate = gptq(target, m.second(), target_step) * target_step[:, None]
            candidate_mse = _output_mse(rows, candidate, m)
            better = candidate_mse < nearest_mse
            chosen, mse = np.where(better[:, None], candidate, nearest), np.where(better, candidate_mse, nearest_mse)
        chosen = chosen.astype(np.float32)
        # The mean output the float model has here, minus what the rounded copy gives.
        if m.depthwise:
            shift = np.sum(rows * m.reference_mean() - chosen * m.mean(), axis=1)
        else:
            shift = rows @ m.reference_mean() - chosen @ m.mean()
        report.append({"layer": layer.name, "output_mse": float(np.mean(mse)),
                       "output_mse_nearest": float(np.mean(nearest_mse)), "mean_shift": float(np.abs(shift).mean())})
        write_kernel(layer, bn, chosen)
        if bias_correction:
            correct_bias(layer, bn, shift.astype(np.float32))
    return clone, report


def layer_moments(model: keras.Model, pairs: list, batches: list, reference: keras.Model | None = None):
    """((layer, bn), the InputMoments of its inputs in `model`) for each weight layer of `pairs`.

    Without a `reference`, `model` is the float model, which nothing changes: its layers' inputs
    are read ONE_PASS_BATCHES batches at a time (bounded memory). With one (the float model),
    `model` is the copy being rounded: both are walked in lockstep over every batch, each layer's
    inputs paired with the float model's, and the walk applies a layer only when the next one is
    asked for, so a caller that rounds each layer in between reads every layer's inputs as the
    rounded layers before it make them. (Inputs read before the layer just in front of it changed
    would make its bias correction undo an upstream error that one had already undone: twice
    the correction, growing with depth.)"""
    pair_of = {layer.name: (layer, bn) for layer, bn in pairs}
    if reference is None:
        moments = {name: InputMoments(layer) for name, (layer, _) in pair_of.items()}
        for start in range(0, len(batches), ONE_PASS_BATCHES):
            for layer, inputs in walk(model, batches[start:start + ONE_PASS_BATCHES]):
                if layer.name in pair_of:
                    for x in inputs:  # batch by batch, in order: the sums do not depend on the chunking
                        moments[layer.name].add(patches(pair_of[layer.name][0], x))
        _check_reached(pair_of, {name for name, m in moments.items() if m.count})
        yield from ((pair, moments[pair[0].name]) for pair in pairs)
        return
    seen = set()
    for (layer, inputs), (float_layer, float_inputs) in zip(walk(model, batches), walk(reference, batches), strict=True):
        if float_layer.name != layer.name:
            raise ValueError(f"layer {layer.name} is {float_layer.name} in the float model: not the same graph")
        if layer.name in pair_of:
            own = pair_of[layer.name][0]
            m = InputMoments(own)
            for x, r in zip(inputs, float_inputs):
                m.add(patches(own, x), patches(own, r))
            seen.add(layer.name)
            yield pair_of[layer.name], m
    _check_reached(pair_of, seen)


def _check_reached(pair_of: dict, seen: set) -> None:
    if seen != set(pair_of):
        raise ValueError(f"layers {', '.join(sorted(set(pair_of) - seen))} are not on the path from the input to the output")


def walk(model: keras.Model, batches: list):
    """Run a functional model one layer at a time over every batch, yielding (layer, its input for
    each batch) just before the layer is applied, so that the caller may change its weights
    first. Only the outputs that later layers still read are kept: the whole sequential rounding
    is one pass through the network (probing each layer from the model's input was one per layer).
    The graph is walked as Keras's own Functional._run_internal_graph walks it (its nodes by
    depth, each tensor kept for as many readers as it has), batch by batch at every node."""
    if len(model.inputs) != 1:
        raise ValueError(f"weight rounding needs a model with one input, {model.name} has {len(model.inputs)}")
    if not batches:
        raise ValueError("weight rounding needs calibration images, got none")
    usage = model._tensor_usage_count
    states = [{str(id(x)): [tf.convert_to_tensor(batch)] * usage[str(id(x))] for x in model.inputs} for batch in batches]
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input or any(t not in states[0] for t in node.flat_input_ids):
                continue
            arguments = [node.map_arguments(state) for state in states]
            yield node.layer, [args[0] for args, _ in arguments]
            for state, (args, kwargs) in zip(states, arguments):
                outputs = node.layer(*args, **({"training": False} | kwargs))  # inference, unless the graph says
                for key, y in zip(node.flat_output_ids, tf.nest.flatten(outputs)):
                    state[key] = [y] * usage[key]


def _damped(second: np.ndarray) -> np.ndarray:
    """E[x x^T] plus DAMPING times its mean diagonal (per matrix)."""
    h = second if second.ndim == 3 else second[None]
    diag = np.diagonal(h, axis1=1, axis2=2)
    return h + (DAMPING * diag.mean(axis=1) + 1e-12)[:, None, None] * np.eye(h.shape[-1])


def least_squares_kernel(rows: np.ndarray, m: InputMoments) -> np.ndarray:
    """The float kernel V closest to giving the float output W x from the rounded inputs x~:
    argmin_V E||W x - V x~||^2 + d ||V - W||^2 = W (E[x x~^T] + d I) (E[x~ x~^T] + d I)^-1,
    with GPTQ's damping d (V = W when x~ = x)."""
    second, cross = m.second(), m.cross()
    damped = _damped(second)
    cross = (cross if cross.ndim == 3 else cross[None]) + (damped - (second if second.ndim == 3 else second[None]))
    # V damped = W cross, one solve per matrix (damped is symmetric): damped V^T = cross^T W^T.
    solved = np.linalg.solve(damped, np.transpose(cross, (0, 2, 1)))  # damped^-1 cross^T
    w = rows.astype(np.float64)
    if m.depthwise:
        return np.einsum("ckl,cl->ck", solved, w)  # row c: (damped_c^-1 cross_c^T w_c^T)^T
    return (solved[0] @ w.T).T


def _output_mse(rows: np.ndarray, chosen: np.ndarray, m: InputMoments) -> np.ndarray:
    """E[(W x - Q x~)^2] per output channel (x~ = x without reference inputs: E[((W - Q) x)^2])."""
    if not m.paired:
        delta, second = rows - chosen, m.second()
        if m.depthwise:
            return np.einsum("ck,ckl,cl->c", delta, second, delta)
        return np.sum((delta @ second) * delta, axis=1)
    if m.depthwise:
        return (np.einsum("ck,ckl,cl->c", rows, m.reference_second(), rows)
                - 2 * np.einsum("ck,ckl,cl->c", rows, m.cross(), chosen)
                + np.einsum("ck,ckl,cl->c", chosen, m.second(), chosen))
    return (np.sum((rows @ m.reference_second()) * rows, axis=1) - 2 * np.sum((rows @ m.cross()) * chosen, axis=1)
            + np.sum((chosen @ m.second()) * chosen, axis=1))


def activation_points(model: Path | bytes) -> dict:
    """Where the converted model rounds activations: Keras layer name -> (scale, zero point) of
    each op's int8 output (the op's fused last layer, e.g. `block_1_expand_relu` for
    conv + BatchNorm + ReLU6), plus "softmax" for the output. The input tensor is left out: with
    mean = std = 128 it is exact."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model) if isinstance(model, bytes) else Interpreter(model_path=str(model))
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    points = {}
    for op in interpreter._get_ops_details():
        if op["op_name"] in ("DELEGATE", "QUANTIZE", "DEQUANTIZE"):
            continue
        tensor = tensors[op["outputs"][0]]
        scale, zero_point = tensor["quantization"]
        if not scale:
            continue
        parts = tensor["name"].split(";")[0].split("/")
        points["softmax" if op["op_name"] == "SOFTMAX" else parts[1]] = (float(scale), int(zero_point))
    return points


def simulate_activations(model, points: dict):
    """A copy of `model` (sharing its weights) that rounds each point's output to its int8 grid
    when that point's switch is 1: returns (model, {point: tf.Variable switch}). The classifier
    layer's logits and its softmax output are rounded separately, as the converted model does."""
    switches = {name: tf.Variable(0.0, trainable=False, name=f"quantize_{name}") for name in points}

    def rounded(x, name):
        scale, zero_point = points[name]
        q = (tf.clip_by_value(tf.round(x / scale) + zero_point, -128.0, 127.0) - zero_point) * scale
        return x + switches[name] * (q - x)

    class Rounded(keras.layers.Layer):
        def __init__(self, inner):
            super().__init__(name=inner.name)
            self.inner = inner

        def call(self, inputs):
            if isinstance(self.inner, keras.layers.Dense) and self.inner.activation is keras.activations.softmax:
                logits = tf.matmul(inputs, self.inner.kernel) + self.inner.bias
                probs = tf.nn.softmax(rounded(logits, self.inner.name) if self.inner.name in points else logits)
                return rounded(probs, "softmax") if "softmax" in points else probs
            return rounded(self.inner(inputs), self.inner.name)

    def wrap(layer):
        return Rounded(layer) if layer.name in points or (layer is model.layers[-1] and "softmax" in points) else layer

    return keras.models.clone_model(model, clone_function=wrap), switches


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
