"""The bad-input corpus: every kind of file a field user or a dataset download can hand us.

`image_corpus(folder)` writes the images (good-but-odd ones that must decode, bad ones that
must be refused with one line naming the file); `special_files(folder)` the things that are
not regular files (a directory named like an image, a FIFO, a file symlink loop, an
unreadable file); `symlink_loop(folder)` a folder symlinked back into its own tree;
`model_corpus(folder, good)` broken `.tflite` files; `manifest_with_missing_file(folder)`.
Everything is tiny and generated on the spot (struct/zlib for the hand-made PNG header).
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
    ]
    bad = [
        ("zero_bytes", "empty.png", b"", "zero-byte file"),
        ("truncated_png", "truncated.png", png[: len(png) // 2], "PNG cut in half"),
        ("truncated_jpeg", "truncated.jpg", jpeg[: len(jpeg) // 2], "JPEG cut in half"),
        ("text_as_png", "notes.png", b"patient notes, not an image\n" * 4, "text file renamed .png"),
        ("bomb_png", "bomb.png", bomb_png(), "PNG header claiming 100000x100000 pixels (decompression bomb)"),
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
    from train.manifest import write_manifest

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
