"""quantize.rounding: the converter lands on the chosen int8 kernels, and they reconstruct better."""

import numpy as np

import oncolite.train  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from oncolite.quantize.rounding import reconstruct_weights
from oncolite.train.int8_grid import folded_kernel, grid_step, weight_layers
from oncolite.train.model import build_classifier

SIZE = 32


def tiny_model(seed: int = 1) -> keras.Model:
    keras.utils.set_random_seed(seed)  # the kernels' random init too: the test sees the same model every run
    model = build_classifier(3, SIZE, SIZE, alpha=0.35, weights=None, dropout=0.0)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.2, 3, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.01, 4, var.shape)])
    return model


def gray_images(n: int, seed: int) -> np.ndarray:
    """Smooth, dark, three-equal-channel images: the kind that makes nearest rounding add up."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(-1, -0.2, (n, 4, 4, 1)).astype(np.float32)
    smooth = tf.image.resize(base, (SIZE, SIZE), method="bilinear").numpy()
    return np.repeat(smooth, 3, axis=-1)


def convert(model, images) -> bytes:
    def representative():
        for x in images:
            yield [x[None]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    return converter.convert()


def int8_tensors(model_bytes: bytes) -> list[np.ndarray]:
    interpreter = tf.lite.Interpreter(model_content=model_bytes, experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_tensor_details()
            if d["dtype"] == np.int8 and len(d["shape"]) in (2, 4) and d["quantization_parameters"]["scales"].size > 1]


def outputs(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    interpreter = tf.lite.Interpreter(model_content=model_bytes)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    rows = []
    for sample in x:
        s, z = inp["quantization"]
        info = np.iinfo(inp["dtype"])
        interpreter.set_tensor(inp["index"], np.clip(np.round(sample[None] / s + z), info.min, info.max).astype(inp["dtype"]))
        interpreter.invoke()
        s, z = out["quantization"]
        rows.append((interpreter.get_tensor(out["index"])[0].astype(np.float64) - z) * s)
    return np.array(rows)


def test_converter_lands_on_every_chosen_kernel_exactly():
    model, calib = tiny_model(), gray_images(16, 0)
    rounded, _ = reconstruct_weights(model, [calib[:8], calib[8:]], method="gptq")
    stored = int8_tensors(convert(rounded, calib))
    chosen = []
    for layer, bn in weight_layers(rounded):
        rows = folded_kernel(layer, bn)
        q = rows / grid_step(rows)[:, None]
        assert np.abs(q - np.round(q)).max() < 1e-3, f"{layer.name}: kernel is not on its int8 grid"
        chosen.append(np.round(q).astype(np.int8))
    # TFLite stores each kernel as (out, h, w, in) for Conv2D, (1, h, w, channels) for depthwise
    # and (out, in) for fully connected.
    flat_stored = [t.reshape(t.shape[0], -1) if t.shape[0] > 1 else t.reshape(-1, t.shape[-1]).T for t in stored]
    for layer_q, (layer, _) in zip(chosen, weight_layers(rounded)):
        hits = [t for t in flat_stored if t.shape == layer_q.shape and np.array_equal(np.sort(t, axis=None), np.sort(layer_q, axis=None))]
        assert hits, f"{layer.name}: the converter did not keep the chosen integers"


def test_reconstruction_beats_nearest_rounding_per_layer_and_end_to_end():
    model, calib, held_out = tiny_model(), gray_images(16, 0), gray_images(12, 1)
    _, nearest_rows = reconstruct_weights(model, [calib], method="nearest", bias_correction=False)
    rounded, rows = reconstruct_weights(model, [calib], method="gptq", bias_correction=True)
    for row in rows:
        assert row["output_mse"] <= row["output_mse_nearest"] * (1 + 1e-6), row
    assert sum(r["output_mse"] for r in rows) < 0.9 * sum(r["output_mse_nearest"] for r in rows)
    # End to end on held-out images: the network's features with the reconstructed kernels stay
    # closer to float than with nearest rounding (float activations, so only the weights differ;
    # the tiny random model's softmax is too flat to compare).
    nearest, _ = reconstruct_weights(model, [calib], method="nearest", bias_correction=False)

    def features(m):
        return keras.Model(m.input, m.get_layer("out_relu").output).predict(held_out, verbose=0)

    reference = features(model)
    assert np.abs(features(rounded) - reference).mean() < np.abs(features(nearest) - reference).mean()


def test_activation_simulation_is_the_converted_model(tmp_path):
    """benchmarks.int8_study's activation ablation rounds each op output on the converted model's
    own grid: with every switch on it must be the .tflite (up to the int32 arithmetic), with
    every switch off the Keras model itself."""
    from oncolite.quantize.rounding import activation_points, simulate_activations

    model, calib, held_out = tiny_model(), gray_images(16, 0), gray_images(12, 1)
    rounded, _ = reconstruct_weights(model, [calib], method="gptq", bias_correction=True)
    path = tmp_path / "int8.tflite"
    path.write_bytes(convert(rounded, calib))
    points = activation_points(path)
    assert {"Conv1_relu", "expanded_conv_project_BN", "head_pool", "predictions", "softmax"} <= set(points)
    simulated, switches = simulate_activations(rounded, points)
    keras_out = rounded.predict(held_out, verbose=0)
    assert np.array_equal(simulated.predict(held_out, verbose=0), keras_out)
    for switch in switches.values():
        switch.assign(1.0)
    device = outputs(path.read_bytes(), held_out)
    sim = simulated.predict(held_out, verbose=0)
    # The simulation reproduces what rounding the activations does to the output: far closer to
    # the device than the float-activation model is.
    assert np.abs(sim - device).mean() < 0.5 * np.abs(keras_out - device).mean()


def test_litert_quantizer_recipes_are_integer_models_of_the_same_network():
    """benchmarks.int8_study's litert-quantizer backends: integer I/O of the asked width, and
    outputs that follow the Keras model (pooled features, where kernel rounding shows)."""
    from oncolite.benchmarks.int8_study import litert_quantize
    from ai_edge_litert.interpreter import Interpreter

    model, calib, held_out = tiny_model(), gray_images(16, 0), gray_images(12, 1)
    features = keras.Model(model.input, model.get_layer("head_pool").output)
    fp32 = tf.lite.TFLiteConverter.from_keras_model(features).convert()
    reference = features.predict(held_out, verbose=0)
    errors = {}
    for bits, dtype in ((8, np.int8), (16, np.int16)):
        model_bytes = litert_quantize(fp32, calib, activation_bits=bits)
        assert Interpreter(model_content=model_bytes).get_input_details()[0]["dtype"] == dtype
        errors[bits] = np.abs(outputs(model_bytes, held_out) - reference).mean()
    scale = np.abs(reference).mean()
    assert errors[8] < 0.1 * scale and errors[16] < errors[8], (errors, scale)


def test_sequential_reconstruction_makes_up_for_what_the_rounded_inputs_changed():
    """The sequential recipes reconstruct the float output W x from the rounded copy's inputs x~:
    the least-squares kernel V is W itself when x~ = x, and undoes a known change of the inputs
    (x~ = x / 2, one channel offset) up to the damping."""
    from oncolite.quantize.rounding import InputMoments, least_squares_kernel

    rng = np.random.default_rng(0)
    conv, depthwise = keras.layers.Conv2D(4, 1), keras.layers.DepthwiseConv2D(3)
    for layer, x in ((conv, rng.normal(size=(500, 6))), (depthwise, rng.normal(size=(500, 9, 5)))):
        w = rng.normal(size=(4 if layer is conv else 5, x.shape[1]))
        same = InputMoments(layer)
        same.add(x, reference=x)
        assert np.allclose(least_squares_kernel(w, same), w)
        changed = InputMoments(layer)
        changed.add(x / 2, reference=x)
        assert np.allclose(least_squares_kernel(w, changed), 2 * w, rtol=0.05)
    # A whole sequential reconstruction: every layer's bias correction is computed on inputs that
    # carry every earlier layer's change, so on the calibration images each layer's output mean
    # is the float model's (inputs read before the layer in front of it changed would correct
    # an upstream error twice, and the means would drift apart with depth); and each layer's
    # kernel never loses to nearest rounding on the error against the float output.
    model, calib = tiny_model(), gray_images(16, 0)
    rounded, rows = reconstruct_weights(model, [calib[:8], calib[8:]], method="gptq", sequential=True)
    for row in rows:
        assert row["output_mse"] <= row["output_mse_nearest"] * (1 + 1e-6) + 1e-12, row
    names = [(bn or layer).name for layer, bn in weight_layers(model) if not isinstance(layer, keras.layers.Dense)]
    means = [keras.Model(m.input, [m.get_layer(n).output for n in names]).predict(calib, verbose=0) for m in (model, rounded)]
    for name, reference, got in zip(names, *means):
        axes = tuple(range(reference.ndim - 1))
        drift = np.abs(got.mean(axis=axes) - reference.mean(axis=axes)).max()
        assert drift < 2e-5 * max(1.0, np.abs(reference).mean()), f"{name}: output mean {drift:.2e} off float's"


def test_the_walk_computes_what_the_model_computes_and_applies_a_layer_only_when_asked():
    """Sequential rounding walks the network once, layer by layer over every batch: each layer's
    input is what the model itself gives that layer (residual adds included), and a kernel the
    caller changes at its turn is the one the walk then applies."""
    from oncolite.quantize.rounding import walk

    model, calib = tiny_model(), gray_images(6, 1)
    batches = [calib[:4], calib[4:]]
    seen = {}
    for layer, inputs in walk(model, batches):
        assert len(inputs) == len(batches)
        seen[layer.name] = inputs
    assert sorted(seen) == sorted(layer.name for layer in model.layers[1:])
    single = [n for n in seen if not isinstance(model.get_layer(n).input, list)]  # an add's two inputs: its output is read
    expected = keras.Model(model.input, [model.get_layer(n).input for n in single]).predict(calib, verbose=0)
    for name, want in zip(single, expected):
        np.testing.assert_allclose(np.concatenate([np.asarray(b) for b in seen[name]]), want, atol=1e-5, err_msg=name)
    # Zeroing the first conv's kernel at its turn: every later input is the zeroed model's.
    first = weight_layers(model)[0][0]
    for layer, inputs in walk(model, batches):
        if layer is first:
            first.set_weights([np.zeros_like(w) for w in first.get_weights()])
        if layer is model.layers[-1]:
            head_input = np.concatenate([np.asarray(b) for b in inputs])
    assert np.allclose(head_input, head_input[0])  # every image gives the same (constant) features
