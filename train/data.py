"""tf.data input pipeline: the one preprocessing, then (for training) augmentation and shuffling.

Images are decoded, resized and normalized by `edge_runtime.preprocess.preprocess`, the same
function the device runs, so the float model trains on exactly what the int8 model will see.
Augmentation runs afterwards, on normalized tensors, in the pipeline (never inside the exported
model): geometric transforms commute with the per-pixel affine normalization, and the colour
jitter maps back to [0, 1] pixels first, where brightness and saturation mean what they say.
"""

from __future__ import annotations

import contextlib
import os
import re

import numpy as np
import tensorflow as tf
import tf_keras as keras
from sklearn.utils.class_weight import compute_class_weight

from edge_runtime.console import progress
from edge_runtime.errors import ImageError, ManifestError
from edge_runtime.preprocess import Preprocessing, preprocess

# Below this many pixels (images x height x width) the preprocessed set is cached in memory:
# BUSI at 224 px is ~0.4 GB of float32; the full IDC set would be ~30 GB, so it streams.
CACHE_LIMIT_PIXELS = 50_000_000


def label_indices(items: list[dict], labels: list[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({item["label"] for item in items} - index.keys())
    if unknown:
        raise ManifestError(f"labels {unknown} are not among the manifest's labels {labels}; fix the manifest")
    return np.array([index[item["label"]] for item in items], dtype=np.int32)


def load_arrays(items: list[dict], labels: list[str], prep: Preprocessing, quiet: bool = False,
                desc: str = "loading images") -> tuple[np.ndarray, np.ndarray]:
    """All images preprocessed into one float32 array (N, H, W, 3), with their label indices."""
    y = label_indices(items, labels)
    x = np.empty((len(items), prep.height, prep.width, 3), dtype=np.float32)
    for i, item in enumerate(progress(items, desc=desc, quiet=quiet, unit="img")):
        x[i] = preprocess(item["path"], prep)
    return x, y


def class_weights(y, n_classes: int) -> dict[int, float]:
    """Balanced class weights (n / (k * count)); classes absent from `y` get weight 1."""
    y = np.asarray(y)
    present = np.unique(y)
    weights = compute_class_weight("balanced", classes=present, y=y)
    result = {c: 1.0 for c in range(n_classes)}
    result.update({int(c): float(w) for c, w in zip(present, weights)})
    return result


def should_cache(n_items: int, prep: Preprocessing, cache) -> bool:
    if cache == "auto":
        return n_items * prep.height * prep.width <= CACHE_LIMIT_PIXELS
    return bool(cache)


def make_dataset(items: list[dict], labels: list[str], prep: Preprocessing, batch_size: int,
                 augment: dict | None = None, shuffle: bool = False, seed: int = 0, cache="auto",
                 oversample: bool = False, mixup: float = 0.0, cutmix: float = 0.0) -> tf.data.Dataset:
    """Batches of (float32 normalized image, int32 label index).

    cache: True keeps the preprocessed images in memory after the first pass, False streams
    them from disk every epoch, "auto" decides by size. oversample: every class drawn equally
    often (random oversampling of the minority classes); an epoch then holds
    n_classes x largest-class-count images. mixup, cutmix: Beta parameters of mixing each image
    with another of its batch (see `mixer`); labels then come as one-hot rows mixed like their images.
    """
    if not items:
        raise ManifestError("no images on this side of the manifest; check the split")
    y = label_indices(items, labels)
    # Bytes, not str: a file name that is not UTF-8 (surrogate escapes) cannot become a tf.string otherwise.
    paths = [os.fsencode(item["path"]) for item in items]
    ds = tf.data.Dataset.from_tensor_slices((paths, y))
    ds = ds.map(_preprocess_fn(prep), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if should_cache(len(items), prep, cache):
        ds = ds.cache()
    if oversample:
        ds = _oversampled(ds, y, len(labels), seed)
    if shuffle:
        ds = ds.shuffle(min(len(items), 10_000), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment and any(augment.values()):
        ds = ds.map(augmenter(augment, prep, seed), num_parallel_calls=tf.data.AUTOTUNE)
    if mixup or cutmix:
        ds = ds.map(mixer(len(labels), seed, mixup=mixup, cutmix=cutmix), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _preprocess_fn(prep: Preprocessing):
    def load(path):
        return preprocess(os.fsdecode(path), prep)

    def fn(path, label):
        image = tf.numpy_function(load, [path], tf.float32, stateful=False)
        image.set_shape((prep.height, prep.width, 3))
        return image, label

    return fn


@contextlib.contextmanager
def image_errors():
    """Around fit/predict/iteration of a dataset from make_dataset: a file that cannot be decoded
    comes out as its one-line ImageError instead of a TensorFlow UnknownError with a traceback.

    The ImageError is raised inside tf.numpy_function, where TensorFlow turns it into an OpError
    whose message embeds "ImageError: <file>: <reason>"; checking every file up front instead
    would decode a large dataset twice.
    """
    try:
        yield
    except tf.errors.OpError as e:
        found = _IMAGE_ERROR.search(e.message or "")
        if found is None:
            raise
        raise ImageError(found.group(1).strip()) from None


_IMAGE_ERROR = re.compile(r"\bImageError: ([^\n]+)")


def _oversampled(ds: tf.data.Dataset, y: np.ndarray, n_classes: int, seed: int) -> tf.data.Dataset:
    present = [c for c in range(n_classes) if np.any(y == c)]
    largest = max(int(np.sum(y == c)) for c in present)
    per_class = [ds.filter(lambda _, label, c=c: tf.equal(label, c)).repeat() for c in present]
    mixed = tf.data.Dataset.sample_from_datasets(per_class, weights=[1.0 / len(present)] * len(present), seed=seed)
    return mixed.take(largest * len(present))


def augmentation_layers(augment: dict, seed: int) -> list:
    """tf-keras preprocessing layers for the geometric part of `augment` (see configs/defaults.json)."""
    layers = []
    flip = {(True, True): "horizontal_and_vertical", (True, False): "horizontal", (False, True): "vertical"}
    mode = flip.get((bool(augment.get("hflip")), bool(augment.get("vflip"))))
    if mode:
        layers.append(keras.layers.RandomFlip(mode, seed=seed))
    if augment.get("rotation"):
        # RandomRotation takes a fraction of a full turn.
        layers.append(keras.layers.RandomRotation(augment["rotation"] / 360.0, fill_mode="reflect", seed=seed + 1))
    if augment.get("shift"):
        layers.append(keras.layers.RandomTranslation(augment["shift"], augment["shift"], fill_mode="reflect", seed=seed + 2))
    if augment.get("zoom"):
        layers.append(keras.layers.RandomZoom(augment["zoom"], augment["zoom"], fill_mode="reflect", seed=seed + 3))
    return layers


def augmenter(augment: dict, prep: Preprocessing, seed: int = 0):
    """A batched (images, labels) -> (images, labels) function applying `augment` per image."""
    layers = augmentation_layers(augment, seed)
    rng = tf.random.Generator.from_seed(seed)

    def fn(images, labels):
        for layer in layers:
            images = layer(images, training=True)
        if augment.get("shear"):
            images = random_shear(images, augment["shear"], rng)
        if augment.get("elastic"):
            images = elastic_deformation(images, augment["elastic"], rng)
        if augment.get("rot90"):
            images = random_transpose(images, rng)
        if augment.get("color_jitter"):
            images = color_jitter(images, augment["color_jitter"], prep, rng)
        if augment.get("gamma") or augment.get("speckle"):
            images = gamma_and_speckle(images, augment.get("gamma", 0), augment.get("speckle", 0), prep, rng)
        return images, labels

    return fn


def mixer(n_classes: int, seed: int = 0, mixup: float = 0.0, cutmix: float = 0.0):
    """A batched (images, label indices) -> (images, one-hot targets) function: every image mixed
    with another image of its batch, its target by the same share. mixup (Zhang et al., ICLR 2018)
    blends the two by a weight drawn from Beta(mixup, mixup); cutmix (Yun et al., ICCV 2019)
    pastes a box of the other image over a share drawn from Beta(cutmix, cutmix), the target
    weighted by the area really kept (a box is clipped at the border). With both, each batch takes
    one of the two by a fair coin, as timm's Mixup does."""
    rng = tf.random.Generator.from_seed(seed + 7)

    def beta(alpha: float, batch):
        # Beta(a, a) as G1 / (G1 + G2) with two Gamma(a) draws (tf.random has no Beta sampler).
        g = tf.random.stateless_gamma((2, batch), seed=rng.make_seeds(1)[:, 0], alpha=alpha)
        return g[0] / (g[0] + g[1] + 1e-12)

    def shuffled(images):
        return tf.argsort(rng.uniform((tf.shape(images)[0],)))

    def blended(images):
        weight = beta(mixup, tf.shape(images)[0])  # drawn before the partners: mixup's earlier runs reproduce
        partner = shuffled(images)
        w = tf.reshape(weight, (-1, 1, 1, 1))
        return w * images + (1.0 - w) * tf.gather(images, partner), weight, partner

    def pasted(images):
        batch, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
        partner = shuffled(images)
        h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
        side = tf.sqrt(1.0 - beta(cutmix, batch))  # the box's side as a share of the image's
        cy, cx = rng.uniform((batch,)) * h, rng.uniform((batch,)) * w
        y0, y1 = tf.clip_by_value(cy - side * h / 2, 0, h), tf.clip_by_value(cy + side * h / 2, 0, h)
        x0, x1 = tf.clip_by_value(cx - side * w / 2, 0, w), tf.clip_by_value(cx + side * w / 2, 0, w)
        rows, cols = tf.range(h)[None, :] + 0.5, tf.range(w)[None, :] + 0.5  # pixel centres
        box = (((rows >= y0[:, None]) & (rows < y1[:, None]))[:, :, None]
               & ((cols >= x0[:, None]) & (cols < x1[:, None]))[:, None, :])
        kept = 1.0 - tf.reduce_mean(tf.cast(box, tf.float32), axis=[1, 2])
        return tf.where(box[..., None], tf.gather(images, partner), images), kept, partner

    def fn(images, labels):
        if mixup and cutmix:
            images, weight, partner = tf.cond(rng.uniform(()) < 0.5, lambda: pasted(images), lambda: blended(images))
        else:
            images, weight, partner = pasted(images) if cutmix else blended(images)
        targets = tf.one_hot(labels, n_classes)
        w = tf.reshape(weight, (-1, 1))
        return images, w * targets + (1.0 - w) * tf.gather(targets, partner)

    return fn


def random_shear(images: tf.Tensor, intensity: float, rng: tf.random.Generator) -> tf.Tensor:
    """Horizontal shear by an angle in [-intensity, intensity] radians about the image centre
    (the convention of Keras' ImageDataGenerator, which the reference study used)."""
    batch = tf.shape(images)[0]
    height = tf.cast(tf.shape(images)[1], tf.float32)
    shear = tf.tan(rng.uniform((batch,), -intensity, intensity))
    zeros, ones = tf.zeros_like(shear), tf.ones_like(shear)
    # Output pixel (x, y) samples input (x + shear * (y - cy), y): an affine map per image.
    transforms = tf.stack([ones, shear, -shear * height / 2.0, zeros, ones, zeros, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT")


def elastic_deformation(images: tf.Tensor, strength: float, rng: tf.random.Generator, grid: int = 5) -> tf.Tensor:
    """Bend each image by a smooth random displacement field (Simard et al., ICDAR 2003): the
    control points of a `grid` x `grid` lattice move by up to `strength` of the image's side in
    each direction, bicubic interpolation spreads that over every pixel, and the image is read
    bilinearly at the displaced points (mirrored at the border, as the other geometric changes)."""
    batch, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    control = rng.uniform((batch, grid, grid, 2), -strength, strength)
    smooth = tf.image.resize(control, (height, width), method="bicubic")
    field = tf.clip_by_value(smooth, -strength, strength) * tf.stack([h, w])  # bicubic overshoots a little
    rows, cols = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")

    def mirrored(c, size):  # a point past the border reads its mirror image inside
        c = tf.abs(c)
        return tf.clip_by_value(tf.where(c > size - 1, 2 * (size - 1) - c, c), 0.0, size - 1)

    y, x = mirrored(rows[None] + field[..., 0], h), mirrored(cols[None] + field[..., 1], w)
    y0, x0 = tf.floor(y), tf.floor(x)
    wy, wx = (y - y0)[..., None], (x - x0)[..., None]
    y0, x0 = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
    y1, x1 = tf.minimum(y0 + 1, height - 1), tf.minimum(x0 + 1, width - 1)

    def at(yi, xi):
        return tf.gather_nd(images, tf.stack([yi, xi], axis=-1), batch_dims=1)

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def random_transpose(images: tf.Tensor, rng: tf.random.Generator) -> tf.Tensor:
    """Transpose half of the (square) images: with the random flips, all eight 90-degree
    rotations and reflections become equally likely."""
    flip = rng.uniform((tf.shape(images)[0], 1, 1, 1)) < 0.5
    return tf.where(flip, tf.transpose(images, (0, 2, 1, 3)), images)


def color_jitter(images: tf.Tensor, strength: float, prep: Preprocessing, rng: tf.random.Generator) -> tf.Tensor:
    """Per-image brightness, contrast and saturation changes of up to +-strength (stain variation)."""
    mean = tf.constant(prep.mean, tf.float32) / 255.0
    std = tf.constant(prep.std, tf.float32) / 255.0
    pixels = images * std + mean  # back to [0, 1]
    shape = (tf.shape(images)[0], 1, 1, 1)
    brightness = rng.uniform(shape, -strength, strength)
    contrast = rng.uniform(shape, 1.0 - strength, 1.0 + strength)
    saturation = rng.uniform(shape, 1.0 - strength, 1.0 + strength)
    pixels = pixels + brightness
    image_mean = tf.reduce_mean(pixels, axis=(1, 2, 3), keepdims=True)
    pixels = (pixels - image_mean) * contrast + image_mean
    gray = tf.reduce_mean(pixels, axis=3, keepdims=True)
    pixels = tf.clip_by_value((pixels - gray) * saturation + gray, 0.0, 1.0)
    return (pixels - mean) / std


def gamma_and_speckle(images: tf.Tensor, gamma: float, speckle: float, prep: Preprocessing,
                      rng: tf.random.Generator) -> tf.Tensor:
    """Ultrasound's own variation: a per-image gain curve (pixels ** g, g in [1 - gamma, 1 + gamma])
    and multiplicative speckle (each pixel times 1 + sd * N(0, 1), the same for the three channels
    of a grayscale scan, sd drawn per image up to `speckle`), on [0, 1] pixels."""
    mean = tf.constant(prep.mean, tf.float32) / 255.0
    std = tf.constant(prep.std, tf.float32) / 255.0
    pixels = tf.clip_by_value(images * std + mean, 0.0, 1.0)
    batch = tf.shape(images)[0]
    if gamma:
        g = rng.uniform((batch, 1, 1, 1), 1.0 - gamma, 1.0 + gamma)
        pixels = tf.pow(pixels, g)
    if speckle:
        sd = rng.uniform((batch, 1, 1, 1), 0.0, speckle)
        noise = rng.normal(tf.concat([tf.shape(images)[:3], [1]], axis=0))
        pixels = tf.clip_by_value(pixels * (1.0 + sd * noise), 0.0, 1.0)
    return (pixels - mean) / std
