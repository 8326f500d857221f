"""The one image preprocessing of oncolite, used by training, calibration, evaluation and the device.

decode (any file or bytes) -> EXIF orientation -> RGB (L, LA, P, RGBA, CMYK, 16-bit, ...) ->
resize to the model's input -> normalize (x - mean) / std -> optionally quantize with the
model's input scale and zero point. Training and the edge runtime call the same functions, so
the float model and the int8 model see bit-identical inputs for the same file.

Decoding is bounded: only the formats in FORMATS are opened, a file's memory cost (its size,
mode and bit depth, and what the conversion to RGB adds: `decode_cost`) must fit
MAX_DECODE_BYTES before a pixel is decoded, a JPEG is decoded at reduced size when that loses
nothing the model sees (or when its full size would not fit), and whatever a decoder raises
becomes one ImageError naming the file.
"""

from __future__ import annotations

import errno
import io
import math
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edge_runtime.errors import ImageError

# Decompression-bomb guard on the size a header declares: a PNG header can claim 100000x100000
# pixels in a few bytes. 8192x8192 is far above any ultrasound frame or histology tile we expect,
# and bounds the decoding time of a JPEG decoded at reduced size.
MAX_PIXELS = 8192 * 8192

# The memory one image may take to decode and convert to RGB, as `decode_cost` counts it: a
# 6000x6000 16-bit mammogram, a 5700x5700 RGB scan or a 48 MP phone JPEG (decoded at half size)
# fit. Measured peaks are in docs/RELIABILITY.md.
MAX_DECODE_BYTES = 256 * 2**20

# Formats medical devices and phones produce (an MPO phone photo opens as JPEG: its first
# picture). Every other Pillow plugin stays off: some hand the file to an external interpreter
# through a temporary file (EPS through Ghostscript), and an upload must never reach the disk.
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
FORMATS_TEXT = "PNG, JPEG, BMP, TIFF, WebP or GIF"

# What the one preprocessing treats as an image file when it walks folders (predict, datasets).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# MobileNetV2's convention: x / 127.5 - 1 maps [0, 255] to [-1, 1].
MOBILENET_MEAN = (127.5, 127.5, 127.5)
MOBILENET_STD = (127.5, 127.5, 127.5)

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST, "area": Image.Resampling.BOX}

_HIGH_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_MODE_NAMES = {"1": "1-bit", "L": "8-bit gray", "P": "palette", "LA": "gray+alpha", "PA": "palette+alpha",
               "I;16": "16-bit gray", "I;16B": "16-bit gray", "I;16L": "16-bit gray", "I;16N": "16-bit gray",
               "I": "32-bit gray", "F": "floating-point"}
_ALPHA = ("RGBA", "LA", "La", "PA", "RGBa")
# 16/32-bit images become 8-bit in bands of this many pixels: one float64 band, not the image.
_BAND_PIXELS = 2**20
# The largest image `resize` checks for gray (2048 x 2048): its three bands and two copies, ~20 MB.
_GRAY_CHECK_PIXELS = 2**22


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


def open_image(source, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_DECODE_BYTES,
               at_least: int | None = None) -> Image.Image:
    """Decode a file path or bytes into an RGB image with its EXIF orientation applied.

    `at_least`: the side length the caller needs; a JPEG is then decoded at 1/2, 1/4 or 1/8
    scale as long as both sides stay at least that long. Raises ImageError (one line, naming
    the file) for anything unreadable, unsafe or over the memory budget `max_bytes`.
    """
    name = _name(source)
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise ImageError(f"{name}: empty file (0 bytes); send the image again")
            return _decode(io.BytesIO(bytes(source)), name, max_pixels, max_bytes, at_least)
        _check_regular_file(Path(source), name)
        with open(source, "rb") as fp:
            return _decode(fp, name, max_pixels, max_bytes, at_least)
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found; check the path") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied; make the file readable") from None
    except OSError as e:  # opening it: an I/O error of the disk or the network share
        raise ImageError(f"{name}: cannot read ({e.strerror or e}); copy the file again") from None


def _decode(fp, name: str, max_pixels: int, max_bytes: int, at_least: int | None) -> Image.Image:
    try:
        im = Image.open(fp, formats=FORMATS)
        width, height = im.size
        if width * height > max_pixels:
            raise ImageError(f"{name}: {width}x{height} pixels is over the limit of {max_pixels} "
                             "(decompression-bomb guard); resize the image first")
        if width < 1 or height < 1:
            raise ImageError(f"{name}: image has no pixels; replace the file")
        im.seek(0)  # animated GIF/PNG/WebP, multi-page TIFF: the first frame
        _reduce(im, at_least, max_bytes)
        need = decode_cost(im, (width, height))
        if need > max_bytes:
            side = int(max(width, height) * math.sqrt(max_bytes / need)) // 100 * 100
            raise ImageError(f"{name}: {width}x{height} {_MODE_NAMES.get(im.mode, im.mode)} needs "
                             f"{need / 2**20:.0f} MB to decode, over the limit of {max_bytes / 2**20:.0f} MB; "
                             f"resize it to at most {side} px on its long side first")
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
        return to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file in a supported format ({FORMATS_TEXT}); "
                         "remove it or convert it to PNG/JPEG") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {e}; resize the image first") from None
    except MemoryError:
        raise ImageError(f"{name}: out of memory while decoding; resize the image, or free memory "
                         "on this machine") from None
    except Exception as e:  # noqa: BLE001 - a decoder parses untrusted bytes: whatever it raises, only this file is bad
        raise ImageError(f"{name}: cannot decode ({_reason(e)}); the file is truncated or corrupt, re-export it") from None


def _reason(e: Exception) -> str:
    """A decoder's exception as a short single line; its type where the message alone says little."""
    text = " ".join(str(e).split())[:160]
    if isinstance(e, (OSError, SyntaxError, ValueError, EOFError)) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _reduce(im: Image.Image, at_least: int | None, max_bytes: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling: nearly free, and far less
    memory): as far as keeps both sides >= `at_least`, and further if the full size would not
    fit `max_bytes`. Other formats cannot decode at reduced size."""
    if im.format not in ("JPEG", "MPO"):
        return
    width, height = im.size
    scale = 1
    while scale < 8 and at_least and -(-min(width, height) // (2 * scale)) >= at_least:
        scale *= 2
    while scale < 8 and decode_cost(im, (width, height), (-(-width // scale), -(-height // scale))) > max_bytes:
        scale *= 2
    if scale > 1:
        # Pillow picks the largest scale whose result is at least the size asked for: exactly `scale`.
        im.draft(im.mode, (max(1, width // scale), max(1, height // scale)))


def pixel_bytes(mode: str) -> int:
    """Bytes per pixel of an image of this mode in Pillow's memory (RGB is stored as 4)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def decode_cost(im: Image.Image, full_size: tuple[int, int], size: tuple[int, int] | None = None) -> int:
    """Bytes `open_image` holds at its peak for this opened (not yet decoded) image.

    The decoded image, plus the larger of a second copy (EXIF rotation) and what `to_rgb` holds
    beside it: the RGB result (4 bytes a pixel); for 16/32-bit images an array copy, the 8-bit
    result and one float64 band; for images with alpha an RGBA copy, its alpha channel and the
    RGB result. A progressive JPEG also keeps libjpeg's coefficients of the full image (2 bytes
    per sample) and a WebP goes through two full-size copies in Pillow's decoder. `size`
    (default im.size) is the size it will be decoded at. Checked against measured peaks in
    tests/test_reliability2_images.py.
    """
    width, height = size or im.size
    mode = im.mode
    own = pixel_bytes(mode)
    if mode == "RGB":
        convert = 0
    elif mode in _HIGH_BIT:
        convert = max(own + 1, 1 + 4)  # the array copy and 8-bit result, then the 8-bit and RGB images
    elif mode == "RGBA":
        convert = 1 + 4
    elif mode in _ALPHA or (mode == "P" and "transparency" in im.info):
        convert = 4 + 1 + 4
    else:
        convert = 4
    cost = width * height * (own + max(own, convert))
    if mode in _HIGH_BIT:
        cost += min(width * height, _BAND_PIXELS) * 8
    if im.format in ("JPEG", "MPO") and im.info.get("progressive"):
        cost += 2 * _jpeg_samples(im, full_size)
    if im.format == "WEBP":
        cost += width * height * 2 * 4
    return cost


def _jpeg_samples(im: Image.Image, full_size: tuple[int, int]) -> int:
    """Samples in all components of a JPEG at full size, chroma subsampling counted."""
    width, height = full_size
    layers = getattr(im, "layer", None) or [(None, 1, 1, None)] * len(im.getbands())
    h_max = max(layer[1] for layer in layers)
    v_max = max(layer[2] for layer in layers)
    return sum(-(-width * h // h_max) * -(-height * v // v_max) for _, h, v, _ in layers)


def _check_regular_file(path: Path, name: str) -> None:
    # Opening a FIFO (or a device) for reading blocks until a writer comes: refuse it from its stat.
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(f"{name}: symlink loop; fix the link") from None
        raise  # not found, permission denied: reported by open_image
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{name}: is a folder, not an image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{name}: not a regular file; remove it")
    if st.st_size == 0:
        raise ImageError(f"{name}: empty file (0 bytes); copy the image again")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Transparent pixels go onto black (the background of ultrasound).

    Memory: at most the RGB result, an RGBA copy and one alpha channel beside `im` (decode_cost).
    """
    if im.mode in _HIGH_BIT:
        im = _to_8_bit(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        # Pasting through the alpha channel onto black gives alpha_composite's exact values
        # without its two extra RGBA images.
        rgb = Image.new("RGB", im.size)
        rgb.paste(im, mask=im.getchannel("A"))
        return rgb
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def _to_8_bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float images -> 8-bit L, band by band (one float64 band, not the image)."""
    arr = np.asarray(im)
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
    out = np.empty(arr.shape, dtype=np.uint8)
    rows = max(1, _BAND_PIXELS // max(1, arr.shape[1]))
    for start in range(0, arr.shape[0], rows):
        band = arr[start:start + rows].astype(np.float64)
        band /= top
        band *= 255.0
        np.clip(band, 0, 255, out=band)
        out[start:start + rows] = np.round(band, out=band)
    return Image.fromarray(out)


def resize(im: Image.Image, prep: Preprocessing) -> np.ndarray:
    """RGB image -> uint8 array (height, width, 3) at the model's input size.

    A gray image stored as RGB (an ultrasound frame, nearly always) is resized as its one band:
    Pillow resamples every band with the same arithmetic, so the pixels are the same, in less
    time than the RGB resize (Pillow works on RGB as four bytes a pixel; a BUSI frame in the
    device's loop: 0.77 against 0.90 ms, reports/experiments/image-to-answer). Only up to
    _GRAY_CHECK_PIXELS: the check holds the three bands, which a large image's memory budget
    (MAX_DECODE_BYTES) has no room for."""
    size = (prep.width, prep.height)
    if im.size == size:
        return np.asarray(im, dtype=np.uint8)
    resample = _RESAMPLE[prep.resample]
    band = _gray_band(im) if im.width * im.height <= _GRAY_CHECK_PIXELS else None
    if band is not None:
        gray = band.resize(size, resample)
        im = Image.merge("RGB", (gray, gray, gray))
    else:
        im = im.resize(size, resample)
    return np.asarray(im, dtype=np.uint8)


def _gray_band(im: Image.Image) -> Image.Image | None:
    """The one band of an RGB image whose three bands are equal, else None."""
    def equal_bands(image):
        red, green, blue = image.split()
        return red if red.tobytes() == green.tobytes() == blue.tobytes() else None

    # A colour image is nearly always told by its middle rows: no full split for it.
    middle = im.height // 2
    if equal_bands(im.crop((0, middle, im.width, min(im.height, middle + 8)))) is None:
        return None
    return equal_bands(im)


def normalize(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 pixels -> float32 model input, (x - mean) / std per channel."""
    mean = np.asarray(prep.mean, dtype=np.float32)
    std = np.asarray(prep.std, dtype=np.float32)
    return (pixels.astype(np.float32) - mean) / std


def decode_image(source, prep: Preprocessing) -> Image.Image:
    """File path or bytes -> RGB image, decoded for a model of this input size.

    A JPEG at least twice the input's size on both sides is decoded at reduced size (kept at
    least twice the input, so the resize still averages over every input pixel), in training
    and on the device alike.
    """
    return open_image(source, at_least=2 * max(prep.height, prep.width))


def input_pixels(source, prep: Preprocessing) -> np.ndarray:
    """File path or bytes -> uint8 (height, width, 3) at the model's input size: `preprocess`
    before `normalize`."""
    return resize(decode_image(source, prep), prep)


def preprocess(source, prep: Preprocessing) -> np.ndarray:
    """File path or bytes -> float32 array (height, width, 3): the model's input for one image."""
    return normalize(input_pixels(source, prep), prep)


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    """Float -> integer tensor with a TFLite tensor's affine parameters, saturating."""
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, dtype=np.float64) / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((np.asarray(q, dtype=np.float64) - zero_point) * scale).astype(np.float32)
