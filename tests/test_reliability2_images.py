"""Issue 19, classes 1-3: one image costs bounded memory, any decoder failure is one line, and only
the allow-listed formats are ever opened.

1. A file's decode is bounded by what it really costs (`decode_cost`: size, mode, bit depth, the
   conversion to RGB), checked against MAX_DECODE_BYTES before a pixel is decoded; JPEGs decode at
   reduced size; the cost model is checked against peaks measured in fresh processes.
2. Whatever a Pillow plugin raises on a corrupt file becomes the one-line ImageError, in predict
   (the batch goes on) and in the server (400, not 500).
3. Only PNG, JPEG, BMP, TIFF, WebP and GIF are opened: an EPS never reaches Ghostscript.

The memory figures of docs/RELIABILITY.md come from the slow test at the end; with
ONCOLITE_WRITE_REPORTS=1 they go to reports/reliability/memory.json.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, PngImagePlugin

import badinputs
from edge_runtime.errors import ImageError
from edge_runtime.preprocess import (FORMATS, FORMATS_TEXT, MAX_DECODE_BYTES, Preprocessing, decode_cost, open_image,
                                     preprocess)

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
MB = 2**20
# Address-space cap for the children fed a memory bomb: the old code's 1.8 GB decode fails fast
# with MemoryError instead of taking the machine's memory.
ADDRESS_SPACE_CAP = 1536 * MB
# What a measured peak may exceed decode_cost by: decoder state and allocator rounding.
SLACK_MB = 3
REPORT = REPO_ROOT / "reports" / "reliability" / "memory.json"


def capped():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, ADDRESS_SPACE_CAP))


# Runs in a fresh process: decode one file and report the peak RSS it added (VmHWM after the
# decode minus VmRSS before it, the peak reset just before through /proc/self/clear_refs).
# Decoding a small image of the same format first loads the plugin and its native library.
MEASURE = r'''
import io, json, sys
from PIL import Image
from edge_runtime import preprocess as P

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

path, fmt, how = sys.argv[1], sys.argv[2], sys.argv[3]
small = io.BytesIO()
Image.new("RGB", (64, 64)).save(small, fmt)
P.open_image(small.getvalue())
with Image.open(path) as im:
    facts = {"size": list(im.size), "mode": im.mode, "format": im.format, "cost_mb": P.decode_cost(im, im.size) / 2**20}
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
if how == "open":
    P.open_image(path)
else:
    P.preprocess(path, P.Preprocessing(224, 224))
print(json.dumps({**facts, "peak_mb": (status("VmHWM:") - before) / 2**20}))
'''


def measure(path: Path, fmt: str, how: str = "open") -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, os.fspath(path), fmt, how], env=ENV, capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=300, preexec_fn=capped)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def pillow_image(folder: Path, name: str, fmt: str, size: int, mode: str = "RGB", exif_orientation=None, **options) -> Path:
    """A textured image (rows of noise repeated) saved by Pillow."""
    rows = np.random.default_rng(0).integers(0, 256, (16, size, 3), dtype=np.uint8)
    im = Image.fromarray(np.tile(rows, (size // 16, 1, 1))).convert(mode)
    if exif_orientation:
        exif = im.getexif()
        exif[badinputs.EXIF_ORIENTATION] = exif_orientation
        options["exif"] = exif.tobytes()
    path = folder / name
    im.save(path, fmt, **options)
    return path


def png_file(folder: Path, name: str, width: int, height: int, bit_depth: int, color_type: int, rotated=False) -> Path:
    chunks = [badinputs.exif_chunk(6)] if rotated else []
    if color_type == 3:  # palette with a transparent entry: converted through RGBA
        chunks += [(b"PLTE", bytes(range(256)) * 3), (b"tRNS", b"\x00" * 16)]
    path = folder / name
    path.write_bytes(badinputs.raw_png(width, height, bit_depth, color_type, chunks, level=1))
    return path


# --------------------------------------------------------------------- 1. bounded memory

def test_a_small_file_that_decodes_large_is_refused_before_decoding(tmp_path):
    data = badinputs.sixteen_bit_memory_bomb()
    assert len(data) < 200_000
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (8192, 8192) and im.mode == "I;16"  # under the pixel limit: only its cost refuses it
        assert decode_cost(im, im.size) > MAX_DECODE_BYTES
    path = tmp_path / "mammo16.png"
    path.write_bytes(data)
    with pytest.raises(ImageError) as caught:
        open_image(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert "16-bit gray needs" in message and "over the limit of 256 MB" in message and "px on its long side" in message


def test_memory_bomb_costs_one_line_in_predict_and_the_batch_goes_on(tmp_path):
    """In a process that cannot take 1.5 GB: the old decode died there with a MemoryError traceback."""
    import edge_models

    model = edge_models.model_file(tmp_path / "model", "int8")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a_bomb.png").write_bytes(badinputs.sixteen_bit_memory_bomb())
    good = badinputs.noise_png(folder / "b_good.png")
    done = subprocess.run([sys.executable, "-m", "edge_runtime", "predict", os.fspath(model), os.fspath(folder), "--json"],
                          env=ENV, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, preexec_fn=capped)
    assert "Traceback" not in done.stderr and done.returncode == 1, done.stderr[-2000:]
    records = {r.get("file"): r for r in map(json.loads, done.stdout.splitlines())}
    assert "MB to decode" in records[str(folder / "a_bomb.png")]["error"]
    assert records[str(good)]["type"] == "result"


def test_memory_bomb_upload_gets_400_from_a_server_that_cannot_take_it(tmp_path):
    """A real `serve` process under the same cap: the old decode answered 500 (MemoryError)."""
    import httpx

    import edge_models

    model = edge_models.model_file(tmp_path / "model", "fp32")
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "serve", os.fspath(model), "--port", "0", "--json",
                             "--quiet"], env=ENV, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=capped)
    try:
        text = ""
        for line in proc.stdout:
            text += line.decode()
            if line.rstrip() == b"}":
                break
        base = json.loads(text)["urls"][0].rstrip("/")
        with httpx.Client(base_url=base, timeout=60) as client:
            bomb = client.post("/api/predict", content=badinputs.sixteen_bit_memory_bomb())
            good = client.post("/api/predict", content=badinputs.good_png())
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert bomb.status_code == 400 and "MB to decode" in bomb.json()["error"], bomb.text
    assert good.status_code == 200


def test_jpeg_decodes_at_reduced_size_for_a_small_model_input(tmp_path):
    path = pillow_image(tmp_path, "photo.jpg", "JPEG", 1600)
    assert open_image(path).size == (1600, 1600)
    assert open_image(path, at_least=64).size == (200, 200)  # 1/8: still at least 64 on each side
    assert open_image(path, at_least=300).size == (400, 400)  # 1/4: 1/8 would give 200 < 300
    # The model input barely changes: both are area averages of the same photo.
    prep = Preprocessing(32, 32)
    full = (np.asarray(open_image(path).resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32) - 127.5) / 127.5
    assert np.abs(preprocess(path, prep) - full).mean() < 0.02


def test_a_jpeg_over_the_budget_is_decoded_smaller_instead_of_refused(tmp_path):
    path = pillow_image(tmp_path, "big.jpg", "JPEG", 2048)
    with Image.open(path) as im:
        assert decode_cost(im, im.size) > 16 * MB
    assert open_image(path, max_bytes=16 * MB).size == (1024, 1024)
    png = pillow_image(tmp_path, "big.png", "PNG", 2048, compress_level=1)
    with pytest.raises(ImageError, match="over the limit of 16 MB"):  # a PNG cannot decode smaller
        open_image(png, max_bytes=16 * MB)


COST_CASES = {
    "RGB PNG, EXIF-rotated": lambda d: (png_file(d, "rgb.png", 1536, 1536, 8, 2, rotated=True), "PNG"),
    "RGBA PNG": lambda d: (png_file(d, "rgba.png", 1536, 1536, 8, 6), "PNG"),
    "gray+alpha PNG": lambda d: (png_file(d, "la.png", 1536, 1536, 8, 4), "PNG"),
    "palette PNG with transparency": lambda d: (png_file(d, "p.png", 1536, 1536, 8, 3), "PNG"),
    "16-bit gray PNG": lambda d: (png_file(d, "g16.png", 1536, 1536, 16, 0), "PNG"),
    "progressive JPEG, EXIF-rotated": lambda d: (pillow_image(d, "prog.jpg", "JPEG", 1536, exif_orientation=6,
                                                              progressive=True), "JPEG"),
    "CMYK JPEG": lambda d: (pillow_image(d, "cmyk.jpg", "JPEG", 1536, mode="CMYK"), "JPEG"),
    "WebP": lambda d: (pillow_image(d, "rgb.webp", "WEBP", 1536, lossless=True, method=0), "WEBP"),
    "LZW TIFF": lambda d: (pillow_image(d, "lzw.tif", "TIFF", 1536, compression="tiff_lzw"), "TIFF"),
    "BMP": lambda d: (pillow_image(d, "rgb.bmp", "BMP", 1536), "BMP"),
    "GIF": lambda d: (pillow_image(d, "p.gif", "GIF", 1536, mode="P"), "GIF"),
}


@pytest.mark.parametrize("case", list(COST_CASES))
def test_decode_cost_bounds_the_measured_peak(case, tmp_path):
    path, fmt = COST_CASES[case](tmp_path)
    measured = measure(path, fmt)
    assert measured["peak_mb"] <= measured["cost_mb"] + SLACK_MB, measured
    # ... and is not a wild overestimate either (which would refuse images that fit).
    assert measured["peak_mb"] >= 0.4 * measured["cost_mb"], measured


# --------------------------------------------------------------------- 2. any decoder failure is one line

def test_a_decoder_raising_type_error_is_one_line():
    with pytest.raises(ImageError, match=r"^<uploaded image>: cannot decode \(TypeError: .*re-export it$"):
        open_image(badinputs.tiff_with_rational_strip_offsets())


@pytest.mark.parametrize("raised", [KeyError("tag"), IndexError("list index out of range"), ZeroDivisionError(),
                                    RuntimeError("decoder state"), AttributeError("tile")])
def test_whatever_a_plugin_raises_becomes_one_line(monkeypatch, raised):
    def broken(self):
        raise raised

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken)
    with pytest.raises(ImageError) as caught:
        open_image(badinputs.good_png())
    assert "cannot decode" in str(caught.value) and type(raised).__name__ in str(caught.value)
    assert "\n" not in str(caught.value)


def test_running_out_of_memory_in_a_decoder_costs_only_that_image(monkeypatch):
    def exhausted(self):
        raise MemoryError

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", exhausted)
    with pytest.raises(ImageError, match="out of memory while decoding"):
        open_image(badinputs.good_png())


def test_predict_lists_a_decoder_crash_and_classifies_the_rest(tmp_path):
    import edge_models

    model = edge_models.model_file(tmp_path / "model", "int8")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a_strips.tif").write_bytes(badinputs.tiff_with_rational_strip_offsets())
    good = [badinputs.noise_png(folder / f"b{k}.png", seed=k) for k in range(2)]
    done = subprocess.run([sys.executable, "-m", "edge_runtime", "predict", os.fspath(model), os.fspath(folder), "--json"],
                          env=ENV, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert "Traceback" not in done.stderr and done.returncode == 1, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["type"] for r in records] == ["model", "error", "result", "result", "summary"]
    assert "TypeError" in records[1]["error"] and records[1]["file"].endswith("a_strips.tif")
    assert [r["file"] for r in records[2:4]] == [str(p) for p in good]


def test_server_answers_400_not_500_to_a_decoder_crash():
    from starlette.testclient import TestClient

    from edge_runtime import server
    from test_server import FakeModel

    with TestClient(server.create_app(FakeModel()), raise_server_exceptions=False) as client:
        r = client.post("/api/predict", content=badinputs.tiff_with_rational_strip_offsets())
    assert r.status_code == 400 and "TypeError" in r.json()["error"]


# --------------------------------------------------------------------- 3. allow-listed formats only

def test_an_eps_upload_never_reaches_ghostscript(monkeypatch):
    from starlette.testclient import TestClient

    from edge_runtime import server
    from test_server import FakeModel

    called = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: called.append(a) or Image.new("RGB", (8, 8)).im)
    eps = badinputs.other_format("EPS")
    with pytest.raises(ImageError, match="not an image file in a supported format"):
        open_image(eps)
    with TestClient(server.create_app(FakeModel()), raise_server_exceptions=False) as client:
        assert client.post("/api/predict", content=eps).status_code == 400
    assert called == []


def test_only_the_allow_listed_formats_are_opened():
    Image.init()
    refused, decoded = [], []
    for fmt in sorted(Image.SAVE):
        buf = io.BytesIO()
        try:
            Image.new("RGB", (16, 16), badinputs.GREEN).save(buf, fmt)
        except Exception:  # noqa: BLE001 - formats Pillow cannot write RGB in (or at all here)
            continue
        try:
            open_image(buf.getvalue())
            decoded.append(fmt)
        except ImageError as e:
            assert "supported format" in str(e), (fmt, str(e))
            refused.append(fmt)
    # MPO is a JPEG with more pictures after the first: it opens as JPEG.
    assert set(decoded) == set(FORMATS) | {"MPO"}, decoded
    assert {"PPM", "EPS", "TGA", "PCX", "ICO", "SGI"} <= set(refused), refused


def test_help_names_the_formats(capsys):
    from edge_runtime.cli import main

    for command in ("predict", "serve"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert FORMATS_TEXT in capsys.readouterr().out, command


# --------------------------------------------------------------------- the figures for RELIABILITY.md

def _at_limit(per_pixel: float, extra: int = 0) -> int:
    """The largest square side whose decode_cost fits MAX_DECODE_BYTES, a multiple of 16."""
    return int(np.sqrt((MAX_DECODE_BYTES - extra) / per_pixel)) // 16 * 16


LIMIT_CASES = {
    # name: (make(folder, side), format, bytes per pixel decode_cost counts, constant)
    "RGB PNG, EXIF-rotated": (lambda d, n: png_file(d, "rgb.png", n, n, 8, 2, rotated=True), "PNG", 8, 0),
    "RGBA PNG": (lambda d, n: png_file(d, "rgba.png", n, n, 8, 6), "PNG", 9, 0),
    "gray+alpha PNG": (lambda d, n: png_file(d, "la.png", n, n, 8, 4), "PNG", 13, 0),
    "palette PNG with transparency": (lambda d, n: png_file(d, "p.png", n, n, 8, 3), "PNG", 10, 0),
    "16-bit gray PNG": (lambda d, n: png_file(d, "g16.png", n, n, 16, 0), "PNG", 7, 8 * MB),
    "WebP": (lambda d, n: pillow_image(d, "rgb.webp", "WEBP", n, lossless=True, method=0), "WEBP", 16, 0),
}


@pytest.mark.slow
def test_peak_memory_of_the_largest_accepted_images(tmp_path):
    """Each kind of image at the largest size the budget accepts, decoded in a fresh process: the
    peak stays within MAX_DECODE_BYTES (+ SLACK_MB). Also the same through predict's path (model
    input 224) and the server's (one request, body and multipart copy included)."""
    figures = {"command": "ONCOLITE_WRITE_REPORTS=1 pytest tests/test_reliability2_images.py -k peak_memory",
               "budget_mb": MAX_DECODE_BYTES / MB, "slack_mb": SLACK_MB, "images": {}}
    for name, (make, fmt, per_pixel, extra) in LIMIT_CASES.items():
        side = _at_limit(per_pixel, extra)
        path = make(tmp_path, side)
        measured = measure(path, fmt)
        figures["images"][name] = {"size": f"{side}x{side}", "file_kb": round(path.stat().st_size / 1024),
                                   "cost_mb": round(measured["cost_mb"], 1), "peak_mb": round(measured["peak_mb"], 1)}
        assert measured["cost_mb"] <= MAX_DECODE_BYTES / MB and measured["peak_mb"] <= MAX_DECODE_BYTES / MB + SLACK_MB, (name, measured)
        path.unlink()
    photo = pillow_image(tmp_path, "photo48mp.jpg", "JPEG", 6928, exif_orientation=6, progressive=True, quality=90)
    for how in ("open", "preprocess"):
        measured = measure(photo, "JPEG", how)
        figures["images"][f"48 MP progressive phone JPEG, EXIF-rotated ({how})"] = {
            "size": "6928x6928", "file_kb": round(photo.stat().st_size / 1024), "peak_mb": round(measured["peak_mb"], 1)}
        assert measured["peak_mb"] <= MAX_DECODE_BYTES / MB + SLACK_MB, (how, measured)
    figures["server_request"] = server_request_peak(png_file(tmp_path, "upload.png", *(2 * [_at_limit(8)]), 8, 2, rotated=True))
    assert figures["server_request"]["peak_mb"] <= MAX_DECODE_BYTES / MB + 3 * figures["server_request"]["upload_mb"] + SLACK_MB
    bomb = tmp_path / "mammo16.png"
    bomb.write_bytes(badinputs.sixteen_bit_memory_bomb())
    refused = measure_refusal(bomb)
    figures["memory_bomb_16bit"] = {"file_kb": round(bomb.stat().st_size / 1024), **refused}
    assert refused["peak_mb"] < 16
    print(json.dumps(figures, indent=2))
    if os.environ.get("ONCOLITE_WRITE_REPORTS") == "1":
        from edge_runtime.atomic import write_json

        write_json(REPORT, figures)


SERVE_ONE = r'''
import json, sys
from starlette.testclient import TestClient
from edge_runtime import server
from edge_runtime.model import EdgeModel

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

model, upload = sys.argv[1], open(sys.argv[2], "rb").read()
with TestClient(server.create_app(EdgeModel.load(model), max_upload_bytes=64 * 2**20)) as client:
    assert client.post("/api/predict", files={"image": ("warm.png", open(sys.argv[3], "rb").read(), "image/png")}).status_code == 200
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    r = client.post("/api/predict", files={"image": ("upload.png", upload, "image/png")})
    print(json.dumps({"status": r.status_code, "peak_mb": (status("VmHWM:") - before) / 2**20, "upload_mb": len(upload) / 2**20}))
'''


def server_request_peak(upload: Path) -> dict:
    """Peak RSS one request adds to a server process (in-process client: its copy of the upload counts too)."""
    import edge_models

    model = edge_models.model_file(upload.parent / "model", "int8")
    warm = badinputs.noise_png(upload.parent / "warm.png")
    done = subprocess.run([sys.executable, "-c", SERVE_ONE, os.fspath(model), os.fspath(upload), os.fspath(warm)],
                          env=ENV, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, preexec_fn=capped)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["status"] == 200, result
    return {"upload": f"{upload.name}, worst-case RGB PNG at the limit", **{k: round(v, 2) for k, v in result.items() if k != "status"}}


REFUSE = r'''
import json, sys
from edge_runtime import preprocess as P

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
try:
    P.open_image(sys.argv[1])
    result = "decoded"
except P.ImageError as e:
    result = str(e).split(": ", 1)[1]
print(json.dumps({"result": result, "peak_mb": round((status("VmHWM:") - before) / 2**20, 1)}))
'''


def measure_refusal(path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", REFUSE, os.fspath(path)], env=ENV, capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120, preexec_fn=capped)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)
