"""The bad-input corpus: every kind of file a field user or a dataset download can hand us.

`image_corpus(folder)` writes the images (good-but-odd ones that must decode, bad ones that
must be refused with one line naming the file); `special_files(folder)` the things that are
not regular files (a directory named like an image, a FIFO, a file symlink loop, a symlink to
a character device, an unreadable file); `symlink_loop(folder)` a folder symlinked back into
its own tree; `model_corpus(folder, good)` broken `.tflite` files, `special_models(folder)` a
FIFO and a device named .tflite, `unhashed_sidecar_models` sidecars a model must not trust;
`manifest_with_missing_file(folder)`. Everything is tiny and generated on the spot
(struct/zlib for the hand-made PNG and TIFF headers); `raw_png` writes PNGs of any size in
constant memory, for the memory-bound tests.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edge_runtime.atomic import write_json

# Colours planted in the odd images, checked after decoding.
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
NON_UTF8_NAME = b"scan_\xff\xfe_caf\xe9.png"  # Latin-1 bytes: not valid UTF-8
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Sample:
    name: str  # short id used in test ids and reports
    path: Path  # str-like; a non-UTF-8 name is the surrogate-escaped str of its bytes
    decodes: bool  # True: must decode to RGB; False: must be refused (ImageError naming the file)
    what: str  # one line for the reliability report


def noise_png(path: Path, size: int = 24, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _png_bytes(im: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def _jpeg_bytes(im: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int = 8, color_type: int = 2, chunks=(), level: int = 9) -> bytes:
    """A PNG of width x height zero pixels (color_type 0 gray, 2 RGB, 3 palette, 4 gray+alpha,
    6 RGBA), `chunks` [(kind, data)] before the pixels. Written row by row: memory and time stay
    small for any size, and the pixels compress ~1000:1 (8192x8192 16-bit gray is ~130 KB)."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    row = b"\x00" * (1 + -(-width * channels * bit_depth // 8))
    rows_per_call = max(1, 2**20 // len(row))
    packer = zlib.compressobj(level)
    pixels = [packer.compress(row * min(rows_per_call, height - y)) for y in range(0, height, rows_per_call)]
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + b"".join(_chunk(k, d) for k, d in chunks)
            + _chunk(b"IDAT", b"".join(pixels) + packer.flush()) + _chunk(b"IEND", b""))


def exif_chunk(orientation: int) -> tuple[bytes, bytes]:
    """A PNG eXIf chunk with this EXIF orientation (6: shown rotated 90 degrees)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return b"eXIf", exif.tobytes()[len(b"Exif\x00\x00"):]


def sixteen_bit_memory_bomb() -> bytes:
    """~130 KB that decode to 8192x8192 16-bit gray: under the pixel limit, but 128 MB decoded and
    far more to convert (the old code peaked near 2 GB and took seconds in one decode)."""
    return raw_png(8192, 8192, bit_depth=16, color_type=0)


def tiff_with_rational_strip_offsets() -> bytes:
    """A TIFF whose StripOffsets tag is typed RATIONAL: Pillow's TIFF decoder raises TypeError,
    an exception outside OSError/ValueError/SyntaxError/EOFError."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), BLUE).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * k
        tag, _, count, value = struct.unpack_from("<HHII", data, at)
        if tag == 273:  # StripOffsets
            struct.pack_into("<HHII", data, at, tag, 5, count, value)  # 5: RATIONAL
    return bytes(data)


def other_format(fmt: str) -> bytes:
    """An image in a format outside the allow-list (PPM, EPS, ...), as Pillow writes it."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), GREEN).save(buf, fmt)
    return buf.getvalue()


def mpo_photo() -> bytes:
    """A phone photo with a second picture (MPO: depth map, stereo); its first picture is the image."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), GREEN).save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (16, 16), RED)])
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking PNG whose header claims width x height 8-bit RGB pixels; ~70 bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


def exif_rotated_jpeg() -> bytes:
    """Stored 40 wide x 20 high, red block in the stored top-left, EXIF orientation 6 (the
    camera was turned: display rotated 90 degrees clockwise). Shown right, it is 20 x 40 with
    the red block in the top-right corner."""
    pixels = np.full((20, 40, 3), 128, dtype=np.uint8)
    pixels[:8, :8] = RED
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[EXIF_ORIENTATION] = 6
    return _jpeg_bytes(im, exif=exif.tobytes())


def sixteen_bit_png() -> bytes:
    """16-bit grayscale: left half 65535 (white), right half 32768 (mid grey)."""
    values = np.full((8, 8), 32768, dtype=np.uint16)
    values[:, :4] = 65535
    return _png_bytes(Image.fromarray(values))  # uint16 -> mode I;16


def palette_png_with_transparency() -> bytes:
    """Palette image: index 0 transparent (left half), index 1 opaque green (right half)."""
    im = Image.new("P", (8, 8), 0)
    im.putpalette([255, 255, 255, 0, 255, 0] + [0] * (256 * 3 - 6))
    for x in range(4, 8):
        for y in range(8):
            im.putpixel((x, y), 1)
    return _png_bytes(im, transparency=0)


def cmyk_jpeg() -> bytes:
    """A CMYK JPEG of pure blue (C=255, M=255)."""
    return _jpeg_bytes(Image.new("CMYK", (16, 16), (255, 255, 0, 0)))


def animated_gif() -> bytes:
    """Two frames: the first blue, the second red. The first frame is the image."""
    frames = [Image.new("RGB", (8, 8), BLUE), Image.new("RGB", (8, 8), RED)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def good_png() -> bytes:
    return _png_bytes(Image.fromarray(np.random.default_rng(7).integers(0, 256, (32, 32, 3), dtype=np.uint8)))


def good_jpeg() -> bytes:
    return _jpeg_bytes(Image.fromarray(np.random.default_rng(8).integers(0, 256, (32, 32, 3), dtype=np.uint8)))


def _write(folder: Path, name: str | bytes, data: bytes) -> Path:
    raw = os.path.join(os.fsencode(folder), name if isinstance(name, bytes) else os.fsencode(name))
    with open(raw, "wb") as f:
        f.write(data)
    return Path(os.fsdecode(raw))


def image_corpus(folder) -> list[Sample]:
    """Regular files, good-but-odd and bad, written into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png, jpeg = good_png(), good_jpeg()
    good = [
        ("sixteen_bit_gray", "gray16.png", sixteen_bit_png(), "16-bit grayscale PNG"),
        ("palette_transparency", "palette_alpha.png", palette_png_with_transparency(), "palette PNG with a transparent colour"),
        ("cmyk_jpeg", "cmyk.jpg", cmyk_jpeg(), "CMYK JPEG"),
        ("exif_rotated", "exif6.jpg", exif_rotated_jpeg(), "JPEG with EXIF orientation 6 (rotated 90 degrees)"),
        ("animated_gif", "animated.gif", animated_gif(), "animated GIF (2 frames)"),
        ("one_pixel", "one_pixel.png", _png_bytes(Image.new("RGB", (1, 1), GREEN)), "1x1 image"),
        ("non_utf8_name", NON_UTF8_NAME, png, "PNG whose file name is not valid UTF-8"),
        ("mpo_photo", "phone.jpg", mpo_photo(), "phone JPEG with a second picture (MPO)"),
    ]
    bad = [
        ("zero_bytes", "empty.png", b"", "zero-byte file"),
        ("truncated_png", "truncated.png", png[: len(png) // 2], "PNG cut in half"),
        ("truncated_jpeg", "truncated.jpg", jpeg[: len(jpeg) // 2], "JPEG cut in half"),
        ("text_as_png", "notes.png", b"patient notes, not an image\n" * 4, "text file renamed .png"),
        ("bomb_png", "bomb.png", bomb_png(), "PNG header claiming 100000x100000 pixels (decompression bomb)"),
        ("memory_bomb_16bit", "mammo16.png", sixteen_bit_memory_bomb(),
         "130 KB PNG decoding to 8192x8192 16-bit gray (memory bomb under the pixel limit)"),
        ("tiff_decoder_type_error", "strips.tif", tiff_with_rational_strip_offsets(),
         "TIFF whose strip offsets are typed RATIONAL (the decoder raises TypeError)"),
        ("eps_as_png", "poster.png", other_format("EPS"), "EPS (PostScript) named .png: Pillow would run Ghostscript on it"),
        ("ppm_as_png", "scan.png", other_format("PPM"), "PPM named .png (a format outside the allow-list)"),
    ]
    return ([Sample(key, _write(folder, name, data), True, what) for key, name, data, what in good]
            + [Sample(key, _write(folder, name, data), False, what) for key, name, data, what in bad])


def special_files(folder) -> tuple[list[Sample], dict[str, str]]:
    """Not-regular files that must be refused: a folder named x.png, a FIFO, a symlink to itself,
    and a chmod-000 file. Returns (samples, skipped {name: reason}) — the unreadable file is
    skipped when we run as root, who can read it anyway."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    samples, skipped = [], {}
    (folder / "folder.png").mkdir()
    samples.append(Sample("folder_named_png", folder / "folder.png", False, "a folder named folder.png"))
    os.mkfifo(folder / "pipe.png")
    samples.append(Sample("fifo", folder / "pipe.png", False, "a FIFO named pipe.png (opening it for reading blocks)"))
    os.symlink("selfloop.png", folder / "selfloop.png")
    samples.append(Sample("symlink_self_loop", folder / "selfloop.png", False, "a symlink pointing at itself"))
    os.symlink("/dev/zero", folder / "zero.png")
    samples.append(Sample("char_device", folder / "zero.png", False, "a symlink to /dev/zero named zero.png (reads never end)"))
    locked = _write(folder, "locked.png", good_png())
    os.chmod(locked, 0)
    if os.access(locked, os.R_OK):  # root (CI containers) reads it anyway
        skipped["unreadable_chmod_000"] = "running as root: a chmod 000 file is still readable"
        os.chmod(locked, 0o644)
        locked.unlink()
    else:
        samples.append(Sample("unreadable_chmod_000", locked, False, "a file with mode 000"))
    return samples, skipped


def release_fifo(path) -> None:
    """Unblock a reader stuck opening the FIFO at `path` (open for writing, close: it reads EOF)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no reader waiting
        return
    os.close(fd)


def symlink_loop(folder) -> Path:
    """`folder/loop` -> `folder`'s parent: walking into it would go round forever."""
    link = Path(folder) / "loop"
    os.symlink("..", link)
    return link


def model_corpus(folder, good: Path) -> list[Sample]:
    """Broken copies of the good model `good` (a .tflite with metadata and sidecar)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    sidecar = json.loads(good.with_suffix(".json").read_text())
    out = []

    def model(name: str, body: bytes, facts: dict | None, what: str) -> None:
        path = _write(folder, f"{name}.tflite", body)
        if facts is not None:
            write_json(path.with_suffix(".json"), facts)
        out.append(Sample(name, path, False, what))

    rng = np.random.default_rng(0)
    model("random_bytes", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), None, "random bytes named .tflite")
    model("text_tflite", b"<html>404 not found</html>\n", None, "an HTML error page saved as .tflite")
    model("truncated", data[: len(data) // 2], None, "the first half of a valid model, no sidecar")
    model("truncated_with_sidecar", data[: len(data) // 2], sidecar, "the first half of a valid model beside the full model's sidecar")
    garbled = bytearray(data)
    for k in rng.choice(np.arange(64, len(data) // 2), 200, replace=False):
        garbled[int(k)] ^= 0xFF
    model("corrupt", bytes(garbled), None, "a valid model with 200 bytes flipped in its first half, no sidecar")
    model("wrong_sha", data, {**sidecar, "sha256": hashlib.sha256(b"other").hexdigest()}, "a valid model whose sidecar sha256 differs")
    return out


def special_models(folder) -> list[Sample]:
    """Not regular files, named .tflite: a FIFO (reading it blocks) and /dev/zero (never ends)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "pipe.tflite")
    os.symlink("/dev/zero", folder / "zero.tflite")
    return [Sample("fifo_model", folder / "pipe.tflite", False, "a FIFO named pipe.tflite"),
            Sample("device_model", folder / "zero.tflite", False, "a symlink to /dev/zero named zero.tflite")]


def unhashed_sidecar_models(folder, plain: bytes, labels: list[str]) -> list[Sample]:
    """A model without metadata (`plain`) whose sidecar does not name its sha256: once with the
    labels in training order, once reordered (nothing in the model can tell them apart)."""
    folder = Path(folder)
    out = []
    for name, order, what in (("unhashed_sidecar", list(labels), "model without metadata, sidecar without sha256"),
                              ("unhashed_reordered_sidecar", list(reversed(labels)),
                               "model without metadata, sidecar without sha256 and its labels reordered")):
        (folder / name).mkdir(parents=True, exist_ok=True)
        path = _write(folder / name, "model.tflite", plain)
        write_json(path.with_suffix(".json"), {"format": "oncolite-model/1", "labels": order})
        out.append(Sample(name, path, False, what))
    return out


def wrong_label_models(folder, plain: bytes, labels: list[str]) -> list[Sample]:
    """A model without metadata (`plain`, len(labels) outputs) whose sidecar has one label too many."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = _write(folder, "wrong_labels.tflite", plain)
    wrong = [*labels, "extra"]
    write_json(path.with_suffix(".json"), {"format": "oncolite-model/1", "labels": wrong,
                                           "sha256": hashlib.sha256(plain).hexdigest(), "size_bytes": len(plain)})
    return [Sample("wrong_label_count", path, False, f"{len(labels)}-output model, sidecar with {len(wrong)} labels")]


def manifest_with_missing_file(folder, labels=("benign", "malignant")) -> tuple[Path, str]:
    """A valid manifest over 4 images, then one image deleted. Returns (manifest, missing relative path)."""
    from edge_runtime.hashing import file_sha256
    from oncolite.train.manifest import write_manifest

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for k in range(4):
        path = noise_png(folder / "images" / f"img{k}.png", seed=k)
        items.append({"path": f"images/{path.name}", "sha256": file_sha256(path), "label": labels[k % 2],
                      "group": f"g{k}", "split": ("train", "train", "val", "test")[k], "meta": {}})
    manifest = folder / "manifest.json"
    write_manifest({"format": "oncolite-manifest/1", "root": str(folder), "labels": list(labels), "seed": 0,
                    "split": {"kind": "random", "folds": 1}, "items": items}, manifest)
    (folder / items[2]["path"]).unlink()
    return manifest, items[2]["path"]
