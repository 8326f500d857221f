"""QAT with BatchNorm folded simulates the converted int8 model: every kernel the converter rounds
is fake-quantized in training (tfmot alone leaves a conv that a ReLU follows in float)."""

import numpy as np
import pytest

import oncolite.train  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from oncolite.quantize.qat import quantize_float_model, settle_ranges
from oncolite.train.int8_grid import weight_layers
from test_rounding import convert, gray_images, outputs, tiny_model

KERNEL_LAYERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)




def test_every_kernel_the_converter_rounds_is_fake_quantized():
    model = tiny_model()
    q = quantize_float_model(model, freeze_bn=True)
    kernels = {w.layer.name: bool(w.quantize_config.get_weights_and_quantizers(w.layer))
               for w in q.layers if isinstance(getattr(w, "layer", None), KERNEL_LAYERS)}
    assert set(kernels) == {layer.name for layer, _ in weight_layers(model)}
    assert all(kernels.values()), [name for name, quantized in kernels.items() if not quantized]
    # Per channel, as the converter: one range per depthwise channel, not one for the kernel.
    for wrapper in q.layers:
        if isinstance(getattr(wrapper, "layer", None), keras.layers.DepthwiseConv2D):
            channels = wrapper.layer.depthwise_kernel.shape[2]
            ranges = [v for v in wrapper.weights if "depthwise_kernel_min" in v.name or "depthwise_kernel_max" in v.name]
            assert ranges and all(tuple(v.shape) == (channels,) for v in ranges), (wrapper.name, [v.shape for v in ranges])
    # No fake-quant between a conv and the ReLU6 the converter fuses into it.
    relu_fed = {layer.name for layer in q.layers if isinstance(getattr(layer, "layer", None), keras.layers.ReLU)
                for node in layer.inbound_nodes for inbound in tf.nest.flatten(node.inbound_layers)
                if isinstance(getattr(inbound, "layer", None), KERNEL_LAYERS)}
    assert relu_fed, "the tiny MobileNetV2 has conv + ReLU6 pairs"
    for layer in q.layers:
        inner = getattr(layer, "layer", None)
        if isinstance(inner, keras.layers.ReLU) and layer.name in relu_fed:
            producer = tf.nest.flatten(layer.inbound_nodes[0].inbound_layers)[0].layer
            assert type(producer.activation.activation).__name__ == "NoOpActivation", producer.name


@pytest.mark.slow
def test_the_converted_qat_model_computes_what_training_simulated():
    calib, held_out = gray_images(16, 0), gray_images(12, 1)
    model = tiny_model()
    q = quantize_float_model(model, freeze_bn=True)
    settle_ranges(q, tf.data.Dataset.from_tensor_slices((calib, np.zeros(len(calib)))).batch(4).repeat(), steps=8)
    # The pooled features, not the random tiny model's flat softmax: they show every kernel's rounding.
    features = keras.Model(q.input, q.get_layer("quant_head_pool").output)
    simulated = features.predict(held_out, verbose=0)
    converted = outputs(convert(features, calib), held_out)
    float_features = keras.Model(model.input, model.get_layer("head_pool").output).predict(held_out, verbose=0)
    # Only the int32 accumulation and the output grid separate them: a kernel left float in
    # training (or quantized per tensor) and rounded per channel by the converter moves the
    # features by as much as the whole quantization does.
    assert np.abs(simulated - converted).mean() < 0.25 * np.abs(float_features - converted).mean()
