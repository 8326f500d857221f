"""snap_to_int8_grid: the converter's int8 rounding of a snapped layer is exact."""

import numpy as np
import pytest

import oncolite.train  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from oncolite.train.model import snap_to_int8_grid

from test_rounding import SIZE, tiny_model  # the seeded tiny MobileNetV2 with non-trivial BatchNorm statistics


def folded_conv1(model: keras.Model) -> np.ndarray:
    """Conv1's kernel with bn_Conv1 folded in, in TFLite's layout (out, h, w, in)."""
    gamma, _, _, var = model.get_layer("bn_Conv1").get_weights()
    kernel = model.get_layer("Conv1").get_weights()[0] * (gamma / np.sqrt(var + model.get_layer("bn_Conv1").epsilon))
    return np.transpose(kernel, (3, 0, 1, 2))


def int8_conv1(model: keras.Model) -> np.ndarray:
    """Conv1's kernel as the int8 TFLite model stores it, dequantized."""
    rng = np.random.default_rng(0)

    def representative():
        for _ in range(8):
            yield [rng.uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    interpreter = tf.lite.Interpreter(model_content=converter.convert(), experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    target = folded_conv1(model).shape
    for detail in interpreter.get_tensor_details():
        if detail["dtype"] == np.int8 and tuple(detail["shape"]) == target:
            q = detail["quantization_parameters"]
            values = interpreter.get_tensor(detail["index"]).astype(np.float64)
            return (values - q["zero_points"].reshape(-1, 1, 1, 1)) * q["scales"].reshape(-1, 1, 1, 1)
    pytest.fail(f"no int8 tensor of shape {target} in the converted model")


def test_snapped_layer_converts_to_int8_without_rounding_error():
    plain, snapped = tiny_model(1), tiny_model(1)
    assert snap_to_int8_grid(snapped, ["Conv1"]) == ["Conv1"]
    plain_error = np.abs(int8_conv1(plain) - folded_conv1(plain)).max()
    snapped_error = np.abs(int8_conv1(snapped) - folded_conv1(snapped)).max()
    step = np.abs(folded_conv1(plain)).max() / 127
    assert plain_error > 0.05 * step  # ordinary rounding: a visible fraction of a step
    assert snapped_error < 1e-4 * step  # snapped: float noise only


def test_snapping_moves_weights_by_at_most_half_a_step_and_refuses_unknown_layers():
    model = tiny_model(2)
    before = folded_conv1(model)
    snap_to_int8_grid(model, ["Conv1", "expanded_conv_depthwise"])
    step = np.abs(before).max(axis=(1, 2, 3), keepdims=True) / 127
    assert np.all(np.abs(folded_conv1(model) - before) <= 0.5 * step + 1e-6)
    with pytest.raises(ValueError, match="no_such_layer"):
        snap_to_int8_grid(model, ["no_such_layer"])
