"""The one image preprocessing of oncolite, used by training, calibration, evaluation and the device.

decode (any file or bytes) -> EXIF orientation -> RGB (L, LA, P, RGBA, CMYK, 16-bit, ...) ->
resize to the model's input -> normalize (x - mean) / std -> optionally quantize with the
model's input scale and zero point. Training and the edge runtime call the same functions, so
the float model and the int8 model see bit-identical inputs for the same file.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edge_runtime.errors import ImageError

# Decompression-bomb guard: a PNG header can claim 100000x100000 pixels in a few bytes.
# 8192x8192 is far above any ultrasound frame or histology tile we expect.
MAX_PIXELS = 8192 * 8192

# What the one preprocessing treats as an image file when it walks folders (predict, datasets).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# MobileNetV2's convention: x / 127.5 - 1 maps [0, 255] to [-1, 1].
MOBILENET_MEAN = (127.5, 127.5, 127.5)
MOBILENET_STD = (127.5, 127.5, 127.5)

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST, "area": Image.Resampling.BOX}


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of its input; carried in the model's metadata and sidecar."""

    height: int = 224
    width: int = 224
    mean: tuple[float, float, float] = MOBILENET_MEAN
    std: tuple[float, float, float] = MOBILENET_STD
    resample: str = "bilinear"

    def __post_init__(self):
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        # Metadata may carry one value for all channels; keep three so the arithmetic is uniform.
        object.__setattr__(self, "mean", _three(self.mean))
        object.__setattr__(self, "std", _three(self.std))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        keys = {"height", "width", "mean", "std", "resample"}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in keys})


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _three(values) -> tuple[float, float, float]:
    values = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"expected 1 or 3 channel values, got {len(values)}")
    return values


def _name(source) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<uploaded image>"
    return os.fsdecode(source) if isinstance(source, (str, os.PathLike)) else str(source)


def open_image(source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode a file path or bytes into an RGB image with its EXIF orientation applied.

    Raises ImageError (one line, naming the file) for anything unreadable or unsafe.
    """
    name = _name(source)
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            fp = io.BytesIO(bytes(source))
        else:
            fp = Path(source)
            _check_regular_file(fp, name)
        with Image.open(fp) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(f"{name}: {width}x{height} pixels is over the limit of {max_pixels} "
                                 "(decompression-bomb guard); resize the image first")
            if width < 1 or height < 1:
                raise ImageError(f"{name}: image has no pixels; replace the file")
            im.seek(0)  # animated GIF/PNG/TIFF: the first frame
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found; check the path") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied; make the file readable") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (or an unsupported format); remove it or convert it to PNG/JPEG") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {e}; resize the image first") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: cannot decode ({e}); the file is truncated or corrupt, re-export it") from None


def _check_regular_file(path: Path, name: str) -> None:
    # Opening a FIFO (or a device) for reading blocks until a writer comes: refuse it from its stat.
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(f"{name}: symlink loop; fix the link") from None
        raise  # not found, permission denied: reported by open_image
    if stat.S_ISDIR(mode):
        raise ImageError(f"{name}: is a folder, not an image")
    if not stat.S_ISREG(mode):
        raise ImageError(f"{name}: not a regular file; remove it")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Transparent pixels go onto black (the background of ultrasound)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        # Map the type's full range onto 0..255, not the image's own min/max, so the same tissue
        # gives the same value in every image: a dark 16-bit frame stays dark. Mode I (32-bit)
        # does not say its bit depth (decoders put 8- and 16-bit samples in it), so there only
        # the values can; F is taken as 0..255 floats.
        if im.mode.startswith("I;16"):
            top = 65535.0
        elif im.mode == "I":
            top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        else:
            top = 255.0
        arr = np.clip(arr / top * 255.0, 0, 255)
        im = Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def resize(im: Image.Image, prep: Preprocessing) -> np.ndarray:
    """RGB image -> uint8 array (height, width, 3) at the model's input size."""
    if im.size != (prep.width, prep.height):
        im = im.resize((prep.width, prep.height), _RESAMPLE[prep.resample])
    return np.asarray(im, dtype=np.uint8)


def normalize(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 pixels -> float32 model input, (x - mean) / std per channel."""
    mean = np.asarray(prep.mean, dtype=np.float32)
    std = np.asarray(prep.std, dtype=np.float32)
    return (pixels.astype(np.float32) - mean) / std


def preprocess(source, prep: Preprocessing) -> np.ndarray:
    """File path or bytes -> float32 array (height, width, 3): the model's input for one image."""
    return normalize(resize(open_image(source), prep), prep)


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    """Float -> integer tensor with a TFLite tensor's affine parameters, saturating."""
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, dtype=np.float64) / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((np.asarray(q, dtype=np.float64) - zero_point) * scale).astype(np.float32)
