"""What decoding and resizing a BUSI image costs here, step by step, against the int8 invoke.

    .venv/bin/python reports/experiments/image-to-answer/measure.py [--runs 3] [--out DIR]

Issue 17 bounds image to answer at 1.5x the int8 invoke. This measures, on fold 0's test images
(the images of the committed benchmark) and the shipped int8 model, where the rest of the time
goes and what the floor of each step is on this machine: the PNG's deflate stream inflated by
the system zlib alone (the floor of any decoder linked to it, Pillow's included), Pillow's
decode (the one preprocessing), and, when they are installed, libspng (`pyspng`) and OpenCV
as other decoders; Pillow's resize of the RGB image against the one band of a gray image (what
`edge_runtime.preprocess.resize` does). Every step runs once per image between two untimed
int8 invokes, so the caches are as cold as in the device's loop. Writes report.md and
report.json into --out (default: beside this file).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))

from edge_runtime.atomic import write_json, write_text  # noqa: E402
from edge_runtime.bench import device_facts, latency_stats  # noqa: E402
from edge_runtime.model import EdgeModel  # noqa: E402
from edge_runtime.preprocess import _RESAMPLE, _gray_band, decode_image, resize  # noqa: E402

MODEL = REPO / "models" / "busi" / "int8.tflite"
MANIFEST = REPO / "reports" / "busi" / "manifest.json"
BOUND = 1.5


def idat(data: bytes) -> bytes:
    """The concatenated IDAT chunks of a PNG: its zlib stream."""
    pos, parts = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            parts.append(data[pos + 8:pos + 8 + length])
        pos += 12 + length
    return b"".join(parts)


def optional_decoders() -> dict:
    """Other PNG decoders, where installed (not dependencies of oncolite: see the report)."""
    from importlib.metadata import version

    out = {}
    try:
        import pyspng

        out[f"libspng (pyspng {version('pyspng')})"] = lambda data: pyspng.load(data)
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(1)
        out[f"OpenCV imdecode (opencv-python-headless {version('opencv-python-headless')})"] = (
            lambda data: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED))
    except ImportError:
        pass
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="passes over the images")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    manifest = json.loads(MANIFEST.read_text(encoding="utf-8"))
    root = (MANIFEST.parent / manifest["root"]).resolve()
    paths = [root / item["path"] for item in manifest["items"] if item["cv"][0] == "test"]
    files = {p: p.read_bytes() for p in paths}
    models = {t: EdgeModel.load(MODEL, threads=t) for t in (1, 2)}
    prep = models[1].prep
    x = models[1].input_tensor(paths[0])

    def pollute():  # what the device's loop does between two images
        models[1].run(x)

    from PIL import __version__ as pillow

    steps = {
        "read the file": lambda p: p.read_bytes(),
        f"zlib inflate alone (system zlib {zlib.ZLIB_RUNTIME_VERSION})": lambda p: zlib.decompress(idat(files[p])),
        f"Pillow {pillow} decode (the one preprocessing)": lambda p: decode_image(p, prep),
        **{name: (lambda p, f=f: f(files[p])) for name, f in optional_decoders().items()},
    }
    decoded = {p: decode_image(p, prep) for p in paths}
    size = (prep.width, prep.height)
    steps["Pillow resize, RGB"] = lambda p: decoded[p].resize(size, _RESAMPLE[prep.resample])
    steps["Pillow resize, as edge_runtime does (one band of a gray image)"] = lambda p: resize(decoded[p], prep)
    gray = sum(_gray_band(im) is not None for im in decoded.values())  # the test resize itself makes

    times = {name: [] for name in steps}
    for _ in range(args.runs):
        for p in paths:
            for name, step in steps.items():
                pollute()
                start = time.perf_counter()
                step(p)
                times[name].append((time.perf_counter() - start) * 1e3)
    invoke = {}
    for t, model in models.items():
        ms = []
        for _ in range(args.runs * len(paths)):
            start = time.perf_counter()
            model.run(x)
            ms.append((time.perf_counter() - start) * 1e3)
        invoke[t] = latency_stats(ms)
    result = {"images": len(paths), "gray_images": int(gray), "runs": args.runs, "model": str(MODEL.relative_to(REPO)),
              "steps": {name: latency_stats(ms) for name, ms in times.items()}, "invoke": invoke,
              "device": device_facts(), "command": " ".join(["python", *sys.argv]),
              "other_decoders": list(optional_decoders())}
    write_json(args.out / "report.json", result)
    write_text(args.out / "report.md", markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = [f"Made by: `{r['command']}` ({r['runs']} passes over fold 0's {r['images']} test images, "
             f"{r['gray_images']} of them gray stored as RGB; `{r['model']}`; {r['device'].get('cpu_model', '')}, "
             f"{r['device']['cpus']} CPUs)", "",
             "| step | p50 ms | p90 ms |", "| --- | --- | --- |"]
    for name, s in r["steps"].items():
        lines.append(f"| {name} | {s['p50']:.3f} | {s['p90']:.3f} |")
    lines += ["", "| int8 invoke | p50 ms | what 1.5x leaves for everything else (ms) |", "| --- | --- | --- |"]
    for t, s in r["invoke"].items():
        lines.append(f"| {t} thread(s) | {s['p50']:.3f} | {(BOUND - 1) * s['p50']:.3f} |")
    if r["other_decoders"]:
        lines += ["", "The other decoders were installed beside oncolite for this measurement only "
                  "(`pip install --target DIR pyspng opencv-python-headless`, the command run with `PYTHONPATH=DIR`); "
                  "neither is a dependency of the kit."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
