"""`oncolite explain RUN_DIR IMAGE`: Grad-CAM of the float model, overlaid on the image.

Grad-CAM (Selvaraju et al., 2017): the gradient of the class score with respect to the last
convolutional feature map, averaged per channel, weights that map's channels; the positive
part of the weighted sum is where the evidence for the class lies. The image goes through the
one preprocessing, so the heatmap explains exactly what the model saw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from PIL import Image

from edge_runtime.console import add_output_flags, old_spelling, print_json, result
from edge_runtime.errors import EXIT_OK, OncoliteError
from edge_runtime.preprocess import normalize, open_image, resize
from .config import preprocessing
from .plots import pyplot, save_png
from .rundir import RunDir

if TYPE_CHECKING:
    import tf_keras as keras

DEFAULT_LAYER = "out_relu"  # MobileNetV2's last convolutional activation


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding models/float.keras and config.json")
    parser.add_argument("image", nargs="?", metavar="IMAGE", help="image file to explain")
    # The old spelling, `explain IMAGE --run RUN_DIR`: its one positional is the image.
    parser.add_argument("--run", dest="old_run", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/explain/<image name>.gradcam.png)")
    parser.add_argument("--layer", default=DEFAULT_LAYER, help=f"convolutional layer to explain (default: {DEFAULT_LAYER})")
    parser.add_argument("--class", dest="class_name", help="label to explain (default: the predicted one)")
    add_output_flags(parser)


def main(args) -> int:
    from .model import load_float_model  # TensorFlow: only when a heatmap is made, not for --help

    if args.old_run:
        if args.image:
            raise OncoliteError(f"--run {args.old_run}: give the run once, first: oncolite explain RUN_DIR IMAGE")
        old_spelling(args, f"explain {args.run_dir} --run {args.old_run}", f"oncolite explain {args.old_run} {args.run_dir}")
        args.run_dir, args.image = args.old_run, args.run_dir
    if not args.image:
        raise OncoliteError("oncolite explain: which image? oncolite explain RUN_DIR IMAGE")
    run = RunDir(args.run_dir)
    config = run.config()
    model = load_float_model(run.float_model)
    labels = run_labels(run.path)
    prep = preprocessing(config)
    pixels = resize(open_image(args.image), prep)
    probs = model.predict(normalize(pixels, prep)[None], verbose=0)[0]
    if args.class_name is not None and args.class_name not in labels:
        raise OncoliteError(f"--class {args.class_name!r}: not one of the run's labels {labels}")
    index = labels.index(args.class_name) if args.class_name else int(np.argmax(probs))
    heatmap = gradcam(model, normalize(pixels, prep), index, args.layer)
    out = Path(args.out or run.explain_dir / f"{Path(args.image).name}.gradcam.png")
    title = f"{labels[index]} p={probs[index]:.3f}  (Grad-CAM, layer {args.layer})"
    write_overlay(out, pixels, heatmap, title)
    if args.json:
        print_json({"image": str(args.image), "out": str(out), "label": labels[index], "probability": float(probs[index]),
                    "probabilities": dict(zip(labels, map(float, probs))), "layer": args.layer})
    result(args, f"{out}: Grad-CAM of {labels[index]} (p {probs[index]:.3f}) over {args.image}, layer {args.layer}")
    return EXIT_OK


def run_labels(run: Path) -> list[str]:
    path = RunDir(run).manifest_copy
    if not path.exists():
        raise OncoliteError(f"{path}: missing; {run} is not a training run directory")
    return list(json.loads(path.read_text(encoding="utf-8"))["labels"])


def gradcam(model: keras.Model, image: np.ndarray, class_index: int, layer: str = DEFAULT_LAYER) -> np.ndarray:
    """Heatmap in [0, 1] at the image's size (H, W) for one normalized float32 image (H, W, 3)."""
    import tensorflow as tf
    import tf_keras as keras

    try:
        features = model.get_layer(layer).output
    except ValueError:
        conv = [l.name for l in model.layers if len(getattr(l, "output_shape", ()) or ()) == 4][-3:]
        raise OncoliteError(f"--layer {layer!r}: no such layer in the model; try one of {conv}") from None
    # The class score is the logit, not the softmax probability: a confident model's
    # probability saturates at 1 and its gradient vanishes.
    dense = model.get_layer("predictions")
    grad_model = keras.Model(model.inputs, [features, dense.input])
    x = tf.convert_to_tensor(image[None], tf.float32)
    with tf.GradientTape() as tape:
        maps, hidden = grad_model(x, training=False)
        score = tf.matmul(hidden, dense.kernel[:, class_index:class_index + 1])[:, 0] + dense.bias[class_index]
    grads = tape.gradient(score, maps)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1))[0]
    cam = tf.image.resize(cam[..., None], image.shape[:2], method="bilinear")[..., 0]
    return (cam / (tf.reduce_max(cam) + 1e-12)).numpy()


def write_overlay(path: Path, pixels: np.ndarray, heatmap: np.ndarray, title: str, alpha: float = 0.45) -> None:
    """The image, the heatmap in matplotlib's jet colormap blended over it, side by side."""
    plt = pyplot()
    colored = (plt.colormaps["jet"](heatmap)[..., :3] * 255).astype(np.float32)
    blend = (pixels.astype(np.float32) * (1 - alpha) + colored * alpha).clip(0, 255).astype(np.uint8)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    for ax, im, name in zip(axes, (pixels, blend), ("input (as the model sees it)", "Grad-CAM")):
        ax.imshow(Image.fromarray(im))
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
